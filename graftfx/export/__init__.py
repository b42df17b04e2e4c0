from .export import export_grafted, fingerprint, load_grafted, preflight, read_manifest

__all__ = ["export_grafted", "load_grafted", "read_manifest", "fingerprint", "preflight"]
