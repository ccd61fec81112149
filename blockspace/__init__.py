"""Blockspace: pooled storage with simple, mirror and parity volumes served through FUSE."""

from blockspace import build

__version__ = "0.1.0"

# Compiled hot modules or their sources (BLOCKSPACE_PURE, a stale build): before any import.
build.choose_at_import()
