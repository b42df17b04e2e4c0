"""The package version (one place: the package, the manifests and setup.py read it)."""
__version__ = "0.1.0"
