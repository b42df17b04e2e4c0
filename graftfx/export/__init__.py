from .export import export_grafted, fingerprint, load_grafted, preflight, read_manifest

__all__ = ["export_grafted", "load_grafted", "read_manifest", "fingerprint", "preflight", "GraftedTransformer",
           "load_grafted_transformer", "graft_transformer"]

_PIPELINE = ("GraftedTransformer", "load_grafted_transformer", "graft_transformer")


def __getattr__(name):   # graftfx.export.pipeline imports diffusers: only when asked for
    if name in _PIPELINE:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
