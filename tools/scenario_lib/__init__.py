"""The scenario suite behind tools/scenarios (docs/scenarios.md)."""
