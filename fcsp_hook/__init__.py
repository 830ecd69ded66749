"""FCSP host side: the OCI hook, the slot ABI mirror, fcspctl (and later the observer)."""

__version__ = "0.1.0"
