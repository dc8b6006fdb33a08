"""The one version string of kdlib (setup.py reads it; `kdlib.__version__` re-exports it)."""

__version__ = "0.1.0"
