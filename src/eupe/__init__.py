"""EUPE: distil several large vision teachers into one small universal encoder."""

__version__ = "0.1.0"
