"""A grafted diffusers transformer back inside its pipeline: ``GraftedTransformer``.

    pipe = PixArtSigmaPipeline.from_pretrained("/models/pixart-sigma")        # a local folder
    pipe.transformer = graftfx.graft_transformer(pipe.transformer, "rules.toml")
    images = pipe(prompt_embeds=..., prompt_attention_mask=..., ...).images

``GraftedTransformer`` wraps a ``GraftedModule`` (the traced, spliced graph) and the base model
it was grafted from, and stands in for the base model wherever a pipeline calls it:

- the base class's ``forward`` signature (``inspect.signature(t.forward)``) and return type
  (``Transformer2DModelOutput(sample=...)``, or the tuple with ``return_dict=False``); any
  positional/keyword call is bound against the base's signature and normalised to the traced
  call structure: arguments equal to their default are the same as absent, ``return_dict`` is
  applied to the output, and ``added_cond_kwargs`` of only ``None`` values is the same as
  ``None`` (diffusers' ``AdaLayerNormSingle`` does the same);
- what pipelines read: ``config`` (the base model's ``FrozenDict``), ``dtype``, ``device``; it is a
  diffusers ``ModelMixin``, so ``register_modules``, ``pipe.to(...)`` and ``pipe.save_pretrained``
  (then ``DiffusionPipeline.from_pretrained``) treat it as a model component.

Several resolutions (and call structures) through one grafted model: a traced graph is fixed at
its spatial shapes, text length, input dtypes, device and parameter dtype (only the batch is
dynamic). A call that differs in any of these traces the base model again at that call (batch
2), selects with the same rules and splices, and every spliced operator *shares* its parameters
with the grafted operator of the same region path (the same ``Parameter`` objects; an operator
that stores a token grid gets the new region's grid); the untouched modules share the grafted
model's parameters too. Graphs are cached per call structure. This holds only when the rules
select the same region paths at every resolution (index or path selections do; a cost- or
shape-based selection may not): otherwise the call is a ``GraftError`` naming both sets.
Moving the model (``.to``, ``.half``) moves the base with it and drops the extra graphs (traced
graphs bake their device and dtype in); they are traced again on the next call.

``save_pretrained(folder)`` writes a diffusers-style folder: the base's ``config.json``, the
grafted model's full state as ``model.safetensors`` (the untouched parts included) and the
manifest ``graft.json`` of ``graftfx.export`` (the same format ``load_grafted`` reads), in one
folder rename. ``load_grafted_transformer(folder, base=None)`` (``GraftedTransformer.from_pretrained``)
restores it: ``base`` is the base model, a diffusers model folder, or None (the base class named
by ``config.json``, built from it with random weights; the saved state replaces them).
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path

import torch
import torch.nn as nn

from graftfx.errors import GraftError, first_line
from graftfx.io import atomic_write_text, temp_name

try:
    from diffusers.configuration_utils import ConfigMixin
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    from diffusers.models.modeling_utils import ModelMixin
except ImportError as e:  # pragma: no cover - diffusers is an optional dependency
    raise GraftError(f"graftfx.export.pipeline needs diffusers ({first_line(e)}); pip install 'graftfx[diffusers]'") \
        from None

from .export import MANIFEST, WEIGHTS, export_grafted, fingerprint, load_grafted, read_manifest, swap_folder

CONFIG = "config.json"
NONE_LIKE = ("added_cond_kwargs",)     # parameters where a dict of only None values means None
PIPELINE_FORMAT = 1


# ---------------------------------------------------------------------------------------------
# call structure
# ---------------------------------------------------------------------------------------------

def _is_none_like(name: str, value) -> bool:
    if value is None:
        return True
    return name in NONE_LIKE and isinstance(value, dict) and all(v is None for v in value.values())


def _describe(value, batch):
    """A hashable description of one input: tensors by (non-batch) shape and dtype."""
    if isinstance(value, torch.Tensor):
        shape = tuple(value.shape)
        if batch is not None and shape and shape[0] == batch:
            shape = ("B",) + shape[1:]
        return ("T", shape, str(value.dtype).replace("torch.", ""))
    if isinstance(value, dict):
        return ("D", tuple(sorted((str(k), _describe(v, batch)) for k, v in value.items())))
    if isinstance(value, (tuple, list)):
        return ("L", tuple(_describe(v, batch) for v in value))
    if value is None or isinstance(value, (bool, int, float, str)):
        return ("V", value)
    return ("R", repr(value))


def _describe_spec(entry: dict, batch):
    """The same description for an entry of ``describe_inputs`` (a traced call)."""
    if "tensor" in entry:
        shape = tuple(entry["tensor"])
        if batch is not None and shape and shape[0] == batch:
            shape = ("B",) + shape[1:]
        return ("T", shape, entry["dtype"])
    if "dict" in entry:
        return ("D", tuple(sorted((str(k), _describe_spec(v, batch)) for k, v in entry["dict"].items())))
    return _describe(entry["value"], batch)


def _first_batch(items) -> int | None:
    for value in items:
        if isinstance(value, torch.Tensor):
            return int(value.shape[0]) if value.dim() else None
        if isinstance(value, dict):
            found = _first_batch(value.values())
            if found is not None:
                return found
        if isinstance(value, (tuple, list)):
            found = _first_batch(value)
            if found is not None:
                return found
    return None


class _CallSpec:
    """How one traced graph is called: positional names, keyword names, traced constants, and
    the canonical description of the traced call (the cache key, less device and dtype)."""

    def __init__(self, grafted, signature: inspect.Signature):
        spec = grafted.input_spec
        params = [p for p in signature.parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        self.arg_names = [p.name for p in params[:len(spec["args"])]]
        entries = dict(zip(self.arg_names, spec["args"]))
        entries.update(spec.get("kwargs", {}))
        info = getattr(grafted.graph._codegen, "pytree_info", None)
        spec_tree = info.in_spec if info is not None else None
        kids = None if spec_tree is None else (spec_tree.children() if callable(getattr(spec_tree, "children", None))
                                                else spec_tree.children_specs)
        if kids is not None and len(kids) == 2:              # (args, kwargs): export's pytree call
            self.kw_names = list(kids[1].context or [])
        else:                                    # torch.fx graph: positional placeholders only
            self.kw_names = []
        self.constants = {k: e["value"] for k, e in entries.items() if "value" in e}
        self.return_dict = entries.get("return_dict", {}).get("value") if "return_dict" in entries else None
        canonical = {k: e for k, e in entries.items()
                     if k != "return_dict" and not ("value" in e and _is_default(signature, k, e["value"]))}
        order = [n for n in signature.parameters if n in canonical] + [n for n in canonical
                                                                         if n not in signature.parameters]
        batch = next((e["tensor"][0] for n in order for e in [canonical[n]] if "tensor" in e and e["tensor"]), None)
        self.key = tuple(sorted((k, _describe_spec(e, batch)) for k, e in canonical.items()))

    def call(self, graph, canonical: dict):
        """Run ``graph`` on a canonical call (names -> values) that has this spec's key."""
        def value(name):
            return canonical[name] if name in canonical else self.constants.get(name)
        return graph(*[value(n) for n in self.arg_names], **{n: value(n) for n in self.kw_names})


def _is_default(signature: inspect.Signature, name: str, value) -> bool:
    if _is_none_like(name, value):
        return True
    p = signature.parameters.get(name)
    if p is None or p.default is p.empty or isinstance(value, torch.Tensor):
        return False
    default = p.default
    return type(default) is type(value) and isinstance(value, (bool, int, float, str)) and default == value


def _canonical(signature: inspect.Signature, args: tuple, kwargs: dict) -> tuple[dict, bool | None]:
    """Bind a call against the base's signature: (names -> values without defaults, return_dict)."""
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as e:
        raise GraftError(f"grafted transformer called with arguments its base model does not take ({e}); call it "
                         f"as the base model: forward{signature}") from None
    out, return_dict = {}, None
    for name, value in bound.arguments.items():
        p = signature.parameters[name]
        if p.kind == p.VAR_KEYWORD:
            items = value.items()
        elif p.kind == p.VAR_POSITIONAL:
            if value:
                raise GraftError(f"grafted transformer: extra positional arguments {len(value)} for *{name} are not "
                                 "supported; pass them by name")
            continue
        else:
            items = [(name, value)]
        for k, v in items:
            if k == "return_dict":
                return_dict = bool(v)
            elif not _is_default(signature, k, v):
                out[k] = v
    return out, return_dict


def _batch_of(value, batch: int) -> object:
    """``value`` at batch 2 (for tracing): tensors whose dim 0 is the call's batch."""
    if isinstance(value, torch.Tensor):
        if value.dim() and int(value.shape[0]) == batch:
            return value[:2].clone() if batch >= 2 else value.expand(2, *value.shape[1:]).clone()
        return value
    if isinstance(value, dict):
        return {k: _batch_of(v, batch) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_batch_of(v, batch) for v in value)
    return value


# ---------------------------------------------------------------------------------------------
# sharing tensors between graphs
# ---------------------------------------------------------------------------------------------

def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (module.get_submodule(path) if path else module), leaf


def _share(variant: nn.Module, primary: nn.Module, base: nn.Module, targets: list[str], *,
           base_is_random: bool = False) -> None:
    """Point every parameter of ``variant`` at ``primary``'s parameter of the same name (the same
    Parameter object), and its buffers of the base model's or a spliced operator's at the
    primary's; per-trace constants and resolution-dependent buffers stay its own. A base
    parameter only this call uses (none of the primary's) stays the base's own, unless the base
    was built with random weights (a model loaded without its base): then it is an error."""
    params = dict(primary.named_parameters(remove_duplicate=False))
    buffers = dict(primary.named_buffers(remove_duplicate=False))
    base_buffers = {n for n, _ in base.named_buffers(remove_duplicate=False)}
    for name, p in list(variant.named_parameters(remove_duplicate=False)):
        q = params.get(name)
        spliced = any(name.startswith(t + ".") for t in targets)
        if q is None and not spliced:
            if base_is_random:
                raise GraftError(f"grafted transformer: the call uses base parameter {name}, which the traced graph "
                                 "does not (so the saved state lacks it) and this model was loaded without its base; "
                                 "load it with load_grafted_transformer(folder, base=<the base model or its folder>)")
            continue
        if q is None or q.shape != p.shape:
            have = "none" if q is None else f"{tuple(q.shape)}"
            raise GraftError(f"grafted transformer: the graph traced at the new call has parameter {name} "
                             f"{tuple(p.shape)}, the grafted model {have}; the rules must replace the same regions "
                             "with the same operators at every resolution")
        owner, leaf = _owner(variant, name)
        owner._parameters[leaf] = q
    for name, b in list(variant.named_buffers(remove_duplicate=False)):
        q = buffers.get(name)
        ours = name in base_buffers or any(name.startswith(t + ".") for t in targets)
        if ours and q is not None and q.shape == b.shape and q.dtype == b.dtype:
            owner, leaf = _owner(variant, name)
            owner._buffers[leaf] = q


def _attach(base: nn.Module, grafted: nn.Module) -> None:
    """Point ``base``'s parameters and buffers at the grafted model's of the same name and shape
    (a base built here for a loaded model: its weights become the loaded ones, stored once)."""
    params = dict(grafted.named_parameters(remove_duplicate=False))
    buffers = dict(grafted.named_buffers(remove_duplicate=False))
    for name, p in list(base.named_parameters(remove_duplicate=False)):
        q = params.get(name)
        if q is not None and q.shape == p.shape and q.dtype == p.dtype:
            owner, leaf = _owner(base, name)
            owner._parameters[leaf] = q
    for name, b in list(base.named_buffers(remove_duplicate=False)):
        q = buffers.get(name)
        if q is not None and q.shape == b.shape and q.dtype == b.dtype:
            owner, leaf = _owner(base, name)
            owner._buffers[leaf] = q


def _grafts_of(grafted) -> list[tuple[str, str, str]]:
    """(rule, region path, target) of every graft: what must match between two resolutions."""
    return sorted((g.rule.name, g.region.path, g.target) for g in grafted.grafts)


def _device_dtype(module: nn.Module) -> tuple[str, str]:
    for p in module.parameters():
        return str(p.device), str(p.dtype).replace("torch.", "")
    return "cpu", "float32"


# ---------------------------------------------------------------------------------------------
# the pipeline component
# ---------------------------------------------------------------------------------------------

class GraftedTransformer(ModelMixin, ConfigMixin):
    """A grafted diffusers transformer that a pipeline takes in place of its base model.

    ``grafted``: ``graftfx.graft(base, rules, (), example_kwargs)`` (or ``load_grafted``);
    ``base``: the model it was grafted from (kept, unregistered, to trace other resolutions; it
    shares the untouched weights). ``grafted`` is registered as ``self.grafted``, so
    ``parameters()`` / ``state_dict()`` (keys prefixed ``grafted.``) are the grafted model's.
    """

    config_name = CONFIG

    def __init__(self, grafted, base: nn.Module, *, base_id: str = "", base_hash: str | None = None,
                 base_is_random: bool = False):
        super().__init__()
        from graftfx.splice.splice import GraftedModule

        if not isinstance(grafted, GraftedModule):
            raise GraftError(f"GraftedTransformer takes a grafted model (graftfx.graft(...)), not "
                             f"{type(grafted).__name__}")
        config = getattr(base, "config", None)
        if not isinstance(config, dict):
            raise GraftError(f"GraftedTransformer: the base model {type(base).__name__} has no diffusers config; "
                             "pass the diffusers model the graft was made from")
        self._internal_dict = config
        self.grafted = grafted
        object.__setattr__(self, "_base", base)      # not a submodule: its weights are not ours to list
        self.base_id = base_id or config.get("_name_or_path", "") or type(base).__name__
        self.base_hash = base_hash
        self._base_is_random = base_is_random
        self._signature = inspect.signature(base.forward)
        self._targets = [g.target for g in grafted.grafts]
        self._regions = _grafts_of(grafted)
        spec = _CallSpec(grafted, self._signature)
        self._graphs: dict = {(spec.key, *_device_dtype(grafted)): (grafted, spec)}

        def forward(*args, **kwargs):
            return self._forward(args, kwargs)

        forward.__signature__ = self._signature
        forward.__doc__ = getattr(base.forward, "__doc__", None)
        self.forward = forward

    def forward(self, *args, **kwargs):
        """The base model's forward (each instance carries the base's signature)."""
        return self._forward(args, kwargs)

    @property
    def base_model(self) -> nn.Module:
        return self._base

    @property
    def graphs(self) -> int:
        """How many call structures (resolutions, text lengths, ...) have a traced graph."""
        return len(self._graphs)

    def graph_for(self, *args, **kwargs):
        """The grafted graph a call with these arguments runs (traced now if new)."""
        canonical, _ = _canonical(self._signature, args, kwargs)
        return self._lookup(canonical)[0]

    def _forward(self, args, kwargs):
        canonical, return_dict = _canonical(self._signature, args, kwargs)
        graph, spec = self._lookup(canonical)
        if graph.training != self.training:
            graph.train(self.training)
        out = spec.call(graph, canonical)
        sample = out[0] if isinstance(out, (tuple, list)) else getattr(out, "sample", out)
        if return_dict is None:
            p = self._signature.parameters.get("return_dict")
            return_dict = bool(p.default) if p is not None and p.default is not p.empty else False
        if return_dict:
            return Transformer2DModelOutput(sample=sample)
        return tuple(out) if isinstance(out, (tuple, list)) else (sample,)

    def _lookup(self, canonical: dict):
        order = [n for n in self._signature.parameters if n in canonical] + [n for n in canonical
                                                                               if n not in self._signature.parameters]
        batch = _first_batch([canonical[n] for n in order])
        key = (tuple(sorted((k, _describe(v, batch)) for k, v in canonical.items())), *_device_dtype(self.grafted))
        found = self._graphs.get(key)
        if found is None:
            found = self._graphs[key] = self._retrace(canonical, order, batch)
        return found

    def _retrace(self, canonical: dict, order: list[str], batch: int | None):
        """Trace the base at this call (batch 2), select with the same rules, splice, share."""
        from graftfx.export.export import preflight
        from graftfx.select.select import select
        from graftfx.splice.splice import splice
        from graftfx.trace.tracer import trace

        primary = self.grafted
        first = next(iter(self._graphs.values()))[1]
        example = {n: _batch_of(canonical[n], batch) if batch else canonical[n] for n in order}
        positional = []
        for name in first.arg_names:
            if name not in example:
                break
            positional.append(example.pop(name))
        if "return_dict" in self._signature.parameters or "return_dict" in first.constants:
            example["return_dict"] = first.return_dict if first.return_dict is not None else False
        shapes = ", ".join(f"{k} {tuple(v.shape)}" for k, v in canonical.items() if isinstance(v, torch.Tensor))
        try:
            traced = trace(self._base, tuple(positional), example, tracer=primary.tracer)
        except GraftError as e:
            raise GraftError(f"grafted transformer: cannot trace the base model at the new call ({shapes}): {e}") \
                from None
        plan = select(traced, primary.rules)
        preflight(plan)
        graph = splice(plan)
        got = _grafts_of(graph)
        if got != self._regions:
            raise GraftError(f"grafted transformer: at the call ({shapes}) the rules select regions "
                             f"{[g[1] for g in got]}, not the grafted ones {[g[1] for g in self._regions]}; one grafted "
                             "model serves several resolutions only when its rules select the same region paths at "
                             "each: pin them (select = { paths = [...] }) or graft once per resolution")
        _share(graph, primary, self._base, self._targets, base_is_random=self._base_is_random)
        graph.train(self.training)
        return graph, _CallSpec(graph, self._signature)

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self._base._apply(fn, *args, **kwargs)          # the base traces the next graphs: keep it beside
        now = _device_dtype(self.grafted)
        kept = {}
        for key, (graph, spec) in self._graphs.items():   # graphs bake their device and dtype in
            if graph is self.grafted:
                kept[key] = (graph, spec)
            elif key[1:] == now:                          # (a move that changed neither)
                graph._apply(fn, *args, **kwargs)
                _share(graph, self.grafted, self._base, self._targets, base_is_random=self._base_is_random)
                kept[key] = (graph, spec)
        self._graphs = kept
        return self

    # ------------------------------------------------------------------ saving and loading

    def save_pretrained(self, save_directory, *, settings: dict | None = None, metrics: dict | None = None,
                        **_ignored) -> Path:
        """Write ``config.json`` (the base's), ``model.safetensors`` and ``graft.json`` into
        ``save_directory``, replaced as a whole in one rename (other files there are kept).
        Extra keywords (``safe_serialization``, ``variant``, ... from ``pipe.save_pretrained``)
        are accepted and ignored: the weights are always one safetensors file."""
        folder = Path(save_directory)
        if folder.exists() and not folder.is_dir():
            raise GraftError(f"save folder {folder} is a file; give a folder path")
        grafted = self.grafted
        spec = grafted.input_spec
        kept, dropped = {}, {}
        for k, e in spec.get("kwargs", {}).items():
            if "value" in e and not (e["value"] is None or isinstance(e["value"], (bool, int, float, str))):
                if not _is_none_like(k, e["value"]):
                    raise GraftError(f"cannot save: the graft was traced with {k}={e['value']!r}, which a manifest "
                                     "cannot record; graft with tensor or plain-number inputs")
                dropped[k] = e["value"]
            else:
                kept[k] = e
        if self.base_hash is None:     # the base's weights now (shared weights trained since change it)
            self.base_hash = fingerprint(self._base)
        info = {"format": PIPELINE_FORMAT, "class": type(self._base).__name__,
                "library": type(self._base).__module__.split(".")[0], "config": CONFIG,
                "same_as_none": sorted(dropped)}
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = temp_name(folder)
        grafted.input_spec = {"args": spec["args"], "kwargs": kept}   # what load_grafted traces at
        try:
            export_grafted(grafted, tmp, base_id=self.base_id, base_hash=self.base_hash,
                           settings={**(settings or {}), "pipeline": info}, metrics=metrics)
            atomic_write_text(tmp / CONFIG, self._base.to_json_string())
            swap_folder(tmp, folder, own=(WEIGHTS, MANIFEST, CONFIG))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            grafted.input_spec = spec
        return folder

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, base=None, *, check_hash: bool | None = None,
                        torch_dtype=None, **_ignored) -> GraftedTransformer:
        """``load_grafted_transformer``; also what ``DiffusionPipeline.from_pretrained`` calls for a
        saved pipeline whose transformer is a GraftedTransformer (``torch_dtype`` honoured)."""
        model = load_grafted_transformer(pretrained_model_name_or_path, base, check_hash=check_hash)
        return model.to(torch_dtype) if torch_dtype is not None else model


def _base_class(folder: Path):
    import diffusers

    path = folder / CONFIG
    if not path.is_file():
        raise GraftError(f"{folder} holds no {CONFIG}; save the grafted transformer with save_pretrained")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise GraftError(f"{path} is not valid JSON ({first_line(e)}); save the model again") from None
    name = config.get("_class_name") if isinstance(config, dict) else None
    cls = getattr(diffusers, name, None) if isinstance(name, str) else None
    if cls is None or not isinstance(cls, type) or not issubclass(cls, ModelMixin):
        raise GraftError(f"{path} names base class {name!r}, which is not a diffusers model class here; is "
                         "diffusers up to date?")
    return cls, config


def load_grafted_transformer(folder, base=None, *, check_hash: bool | None = None) -> GraftedTransformer:
    """A ``GraftedTransformer`` from a ``save_pretrained`` folder.

    ``base``: the base model instance (left unchanged: the grafted model gets its own copies), a
    diffusers model folder (``config.json`` + weights), or None: the class named by the folder's
    ``config.json`` built from it with random weights, which the saved state replaces (the
    folder alone restores the model). ``check_hash`` (default: when ``base`` is given) checks
    the base's weights against the manifest's fingerprint."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GraftError(f"grafted transformer folder {folder} not found; save one with save_pretrained")
    manifest = read_manifest(folder)
    cls, config = _base_class(folder)
    own = not isinstance(base, nn.Module)
    if base is None:
        model = cls.from_config(config)
    elif isinstance(base, (str, os.PathLike)):
        if not (Path(base) / CONFIG).is_file():
            raise GraftError(f"base model folder {base} holds no {CONFIG}; pass a saved diffusers model folder, "
                             "the model itself, or None")
        try:
            model = cls.from_pretrained(str(base), local_files_only=True)
        except (OSError, ValueError, EnvironmentError) as e:
            raise GraftError(f"base model folder {base} could not be loaded as {cls.__name__}: {first_line(e)}") \
                from None
    elif isinstance(base, nn.Module):
        if type(base).__name__ != cls.__name__:
            raise GraftError(f"{folder} was grafted onto a {cls.__name__}, not a {type(base).__name__}; pass the "
                             "same base model, a folder of one, or None")
        model = base
    else:
        raise GraftError(f"base must be a diffusers model, a model folder or None, not {type(base).__name__}")
    model = model.eval()
    if check_hash is None:
        check_hash = base is not None
    grafted = load_grafted(model, folder, check_hash=check_hash)
    if own:
        _attach(model, grafted)                     # one copy of the weights: the loaded ones
    base_info = manifest.get("base", {})
    return GraftedTransformer(grafted, model, base_id=base_info.get("id", ""), base_hash=base_info.get("hash") or None,
                              base_is_random=base is None)


# ---------------------------------------------------------------------------------------------
# grafting a pipeline's transformer
# ---------------------------------------------------------------------------------------------

def pipeline_example(model: nn.Module, *, batch: int = 2, height: int | None = None, width: int | None = None,
                     text_length: int = 300) -> dict:
    """Example keyword inputs shaped as the model's pipeline calls it (its adapter,
    ``graftfx.models.adapters``: PixArt's latents, text embeddings (B, ``text_length``,
    caption_channels) with an int64 mask and ``added_cond_kwargs``; DiT's latents, timesteps, class
    labels), at latent ``height`` x ``width`` (default: the config's ``sample_size``), on the model's
    device and in its dtype. Other models: pass example inputs yourself."""
    from graftfx.models.adapters import adapter_for

    cfg = model.config
    shape = (int(cfg.in_channels), int(height or cfg.sample_size), int(width or cfg.sample_size))
    try:
        adapter = adapter_for(model)
    except GraftError:
        raise GraftError(f"no pipeline-shaped example inputs for {type(model).__name__}; pass example_kwargs "
                         "(keyword inputs as its pipeline calls it, batch 2)") from None
    args, kwargs = adapter.example(model, batch, shape=shape, text_length=text_length)
    if args:
        raise GraftError(f"{type(model).__name__} is called positionally; pass example_kwargs")
    return kwargs


def graft_transformer(model: nn.Module, rules, example_kwargs: dict | None = None, *, height: int | None = None,
                      width: int | None = None, text_length: int = 300, **graft_options) -> GraftedTransformer:
    """``graftfx.graft`` a pipeline's transformer at pipeline-shaped inputs (``pipeline_example``,
    or ``example_kwargs``) and wrap it: ``pipe.transformer = graft_transformer(pipe.transformer, rules)``."""
    from graftfx.api import graft

    kwargs = example_kwargs if example_kwargs is not None else pipeline_example(
        model, height=height, width=width, text_length=text_length)
    return GraftedTransformer(graft(model, rules, (), kwargs, **graft_options), model)
