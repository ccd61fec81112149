"""Test tooling (crash simulator, memory disks): never imported by product code."""
