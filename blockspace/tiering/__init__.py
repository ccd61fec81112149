"""Tiered volumes: an ssd tier over an hdd tier, heat, the optimizer, administration."""
