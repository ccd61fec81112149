"""Codecs of the on-disk structures: labels, pool metadata, block checksums. No I/O."""
