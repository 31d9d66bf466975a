"""The package version (one place; every rank checks the driver's against its own)."""

__version__ = "0.1.0"
