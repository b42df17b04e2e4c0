"""Timestep respacing: run a diffusion trained on T steps with a subsequence of them.

A respaced process keeps timesteps ``k_0 < k_1 < ... < k_{S-1}`` of the original and redefines
its betas so that the kept steps have exactly the original cumulative alphas:
``beta'_i = 1 - alphabar[k_i] / alphabar[k_{i-1}]`` (with ``alphabar[k_{-1}] = 1``). The model
is still called with the original timestep ``k_i`` (see ``GaussianDiffusion.timestep_map``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def space_timesteps(num_timesteps: int, spacing) -> list[int]:
    """The original timesteps a respaced diffusion keeps, ascending.

    ``spacing``:
      * ``None`` or ``""``: keep all ``num_timesteps`` steps.
      * ``N`` (int, or a string of digits): ``N`` steps spread evenly over ``[0, T-1]``, both ends
        kept (DiT's ``timestep_respacing="250"``).
      * ``"a,b,c"`` or ``[a, b, c]``: cut ``[0, T)`` into that many near-equal sections and keep
        ``a`` evenly spread steps of the first, ``b`` of the second, ...
      * ``"ddimN"``: the integer stride ``s`` with ``len(range(0, T, s)) == N``, i.e. ``0, s, 2s, ...``.
    """
    if spacing is None or spacing == "":
        return list(range(num_timesteps))
    if isinstance(spacing, str):
        text = spacing.strip()
        if text.startswith("ddim"):
            return _ddim_steps(num_timesteps, text)
        try:
            counts = [int(part) for part in text.split(",")]
        except ValueError:
            raise ValueError(
                f"timestep_respacing {spacing!r} is not understood: use an int, 'a,b,c' section counts or 'ddimN'"
            ) from None
    elif isinstance(spacing, bool):
        raise ValueError(f"timestep_respacing must be an int, a string or a list of ints, got {spacing!r}")
    elif isinstance(spacing, int):
        counts = [spacing]
    elif isinstance(spacing, Sequence) and all(isinstance(c, int) and not isinstance(c, bool) for c in spacing):
        counts = list(spacing)
    else:
        raise ValueError(f"timestep_respacing must be an int, a string or a list of ints, got {spacing!r}")
    return _section_steps(num_timesteps, counts)


def _ddim_steps(num_timesteps: int, text: str) -> list[int]:
    try:
        wanted = int(text[len("ddim"):])
    except ValueError:
        raise ValueError(f"timestep_respacing {text!r} is not understood: write 'ddimN' with N an integer") from None
    for stride in range(1, num_timesteps + 1):
        steps = list(range(0, num_timesteps, stride))
        if len(steps) == wanted:
            return steps
    raise ValueError(
        f"timestep_respacing {text!r}: no integer stride gives exactly {wanted} of {num_timesteps} steps; "
        "pick another N or use a plain step count"
    )


def _section_steps(num_timesteps: int, counts: list[int]) -> list[int]:
    if not counts or any(c < 0 for c in counts) or sum(counts) < 1:
        raise ValueError(f"timestep_respacing counts must be >= 0 and keep at least one step, got {counts}")
    if len(counts) > num_timesteps:
        raise ValueError(f"timestep_respacing asks for {len(counts)} sections of only {num_timesteps} steps")
    size, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for i, count in enumerate(counts):
        n = size + (1 if i < extra else 0)
        if count > n:
            raise ValueError(
                f"timestep_respacing asks for {count} steps from a section of {n} "
                f"(of {num_timesteps} steps in all); lower the count"
            )
        if count == 1:
            kept.append(start)
        elif count > 1:
            stride = (n - 1) / (count - 1)  # >= 1, so the rounded positions are distinct
            kept.extend(start + round(j * stride) for j in range(count))
        start += n
    return kept


def respaced_betas(alphas_cumprod: torch.Tensor, kept: list[int]) -> torch.Tensor:
    """Betas of the process that visits only ``kept`` but has the same cumulative alphas there."""
    acp = alphas_cumprod[torch.as_tensor(kept, dtype=torch.long)]
    prev = torch.cat([acp.new_ones(1), acp[:-1]])
    return 1.0 - acp / prev
