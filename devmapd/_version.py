"""The one place the version is written; every part reads it from here, not from the package root."""

__version__ = "0.1.0"
