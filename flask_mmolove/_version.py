"""The package's version, in a module nothing else depends on (flit reads it here too)."""

__version__ = "0.1.0"
