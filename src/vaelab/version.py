"""The package version: a leaf module, so the run-folder code can stamp files with it without
importing the package's `__init__` (which imports everything)."""

__version__ = "0.1.0"
