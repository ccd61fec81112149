"""Blockspace: pooled storage with simple, mirror and parity volumes served through FUSE."""

__version__ = "0.1.0"
