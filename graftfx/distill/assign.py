"""Which rank trains which region in stage 1, by cost, and what a run will spend (``--plan``).

Cost of a region per calibration sample: the bytes its cache fields take (read every step) and
the FLOPs of training its operator (forward + backward, about 3x the forward). Regions are dealt
to ranks by longest-processing-time: the costliest region first, each to the least loaded rank.
With more ranks than regions, every region gets a group of ranks that trains it data-parallel
(each rank a slice of the batch, gradients averaged in the group's process group): the extra
ranks go one by one to the group whose cost per rank is highest.

``plan_run`` estimates, before anything runs: per rank, its regions, the cache bytes it writes,
its peak host memory (one shard of its fields being assembled, plus the teacher's weights) and
device memory (the teacher forward at the recording batch, plus its operators with AdamW
state and one training batch), and the teacher FLOPs of recording.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from graftfx.match.cost import graph_flops

DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclass
class RegionCost:
    path: str
    cache_bytes: int          # per sample, at the cache dtype
    train_flops: int          # per sample, forward + backward of the operator
    params: int = 0           # the operator's parameters

    @property
    def cost(self) -> float:
        # an H100-class ratio of FLOPs to bytes (~300 FLOP per byte): either can dominate
        return self.train_flops / 300.0 + self.cache_bytes


@dataclass
class Assignment:
    """Rank -> regions, and region -> the ranks (a group) that train it."""

    world: int
    groups: dict[str, list[int]] = field(default_factory=dict)    # region path -> ranks, in order

    def regions_of(self, rank: int) -> list[str]:
        return [p for p, ranks in self.groups.items() if rank in ranks]

    def group_index(self, path: str, rank: int) -> tuple[int, int]:
        """(this rank's position in the region's group, the group's size)."""
        ranks = self.groups[path]
        return ranks.index(rank), len(ranks)


def region_costs(grafted, field_bytes: dict[str, int]) -> list[RegionCost]:
    """Per-region costs from the grafted model's operators and the cache fields' bytes per sample."""
    costs = []
    for g in grafted.grafts:
        op = grafted.get_submodule(g.target)
        tokens = g.region.tokens or 1
        try:
            flops = int(op.flops(tokens))
        except Exception:  # noqa: BLE001 - an operator without a FLOP count: its region's count
            flops = int(g.region.flops)
        costs.append(RegionCost(g.region.path, int(field_bytes.get(g.region.path, 0)), 3 * flops,
                                sum(p.numel() for p in op.parameters())))
    return costs


def assign(costs: list[RegionCost], world: int) -> Assignment:
    """Longest-processing-time assignment; groups when ``world`` exceeds the region count."""
    out = Assignment(world)
    if not costs:
        return out
    order = sorted(costs, key=lambda c: (-c.cost, c.path))
    if world <= len(costs):
        load = [0.0] * world
        for c in order:
            r = min(range(world), key=lambda i: (load[i], i))
            out.groups[c.path] = [r]
            load[r] += c.cost
        out.groups = {c.path: out.groups[c.path] for c in costs}
        return out
    sizes = {c.path: 1 for c in costs}
    for _ in range(world - len(costs)):
        worst = max(order, key=lambda c: (c.cost / sizes[c.path], c.path))
        sizes[worst.path] += 1
    rank = 0
    for c in costs:
        out.groups[c.path] = list(range(rank, rank + sizes[c.path]))
        rank += sizes[c.path]
    return out


def plan_run(traced, grafted, taps, samples: int, world: int, *, cache_dtype: str = "float16",
             shard_size: int = 256, record_batch: int = 32, train_batch: int = 8) -> dict:
    """The numbers ``graftfx distill --plan`` prints: nothing is recorded or trained."""
    from .cache import field_shapes

    size = DTYPE_BYTES[cache_dtype]
    shapes = field_shapes(traced, taps)
    per_sample = {p: size * sum(math.prod(s) for s in fields.values()) for p, fields in shapes.items()}
    costs = region_costs(grafted, per_sample)
    assignment = assign(costs, world)
    teacher_params = sum(p.numel() for p in traced.model.parameters())
    teacher_bytes = sum(p.numel() * p.element_size() for p in traced.model.parameters())
    teacher_flops = graph_flops(traced.gm, traced.batch_size) // max(traced.batch_size, 1)
    activations = max((s for s in per_sample.values()), default=0) * 8   # a block's live activations, roughly
    by_path = {c.path: c for c in costs}
    ranks = []
    for r in range(world):
        mine = assignment.regions_of(r)
        cache_bytes = sum(per_sample[p] for p in mine) * samples
        shard = sum(per_sample[p] for p in mine) * min(shard_size, samples) * 4 // size   # assembled in fp32
        op_params = sum(by_path[p].params for p in mine)
        train = sum(per_sample[p] * 4 // size for p in mine) * train_batch
        ranks.append({"rank": r, "regions": mine, "cache_bytes": cache_bytes,
                      "host_bytes": teacher_bytes + shard,
                      "device_bytes": teacher_bytes + activations * record_batch + op_params * 16 + train * 3,
                      "train_flops_per_step": sum(by_path[p].train_flops for p in mine) * train_batch
                      // max(len(assignment.groups[mine[0]]) if mine else 1, 1)})
    return {"world": world, "samples": samples, "cache_dtype": cache_dtype, "regions": len(costs),
            "teacher_params": teacher_params, "teacher_flops_per_sample": teacher_flops,
            "teacher_flops_total": teacher_flops * samples, "cache_bytes_total": sum(per_sample.values()) * samples,
            "groups": assignment.groups, "ranks": ranks}


def format_plan(plan: dict, model_id: str = "") -> str:
    """The plan as a table, one row per rank."""
    from .cache import human_bytes

    lines = [f"plan: {model_id or 'model'}: {plan['regions']} regions, {plan['samples']} samples "
             f"({plan['cache_dtype']}), {plan['world']} rank(s)",
             f"teacher: {plan['teacher_params'] / 1e6:.1f} M parameters, "
             f"{plan['teacher_flops_per_sample'] / 1e9:.2f} GFLOP per sample, "
             f"{plan['teacher_flops_total'] / 1e12:.2f} TFLOP per rank to record (every rank runs the teacher on "
             f"every sample and keeps its regions)",
             f"cache: {human_bytes(plan['cache_bytes_total'])} in all",
             "",
             "| rank | regions | cache on disk | peak host | peak device | train GFLOP/step |",
             "|---|---|---|---|---|---|"]
    for r in plan["ranks"]:
        names = ", ".join(r["regions"]) if len(r["regions"]) <= 3 else (
            ", ".join(r["regions"][:3]) + f" (+{len(r['regions']) - 3})")
        lines.append(f"| {r['rank']} | {names or '-'} | {human_bytes(r['cache_bytes'])} | {human_bytes(r['host_bytes'])} "
                     f"| {human_bytes(r['device_bytes'])} | {r['train_flops_per_step'] / 1e9:.1f} |")
    shared = {p: g for p, g in plan["groups"].items() if len(g) > 1}
    if shared:
        lines.append("")
        lines.append("data-parallel groups: " + "; ".join(f"{p}: ranks {g}" for p, g in shared.items()))
    return "\n".join(lines)
