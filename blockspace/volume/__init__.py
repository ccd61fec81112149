"""A volume: byte offset -> slab -> layout -> concurrent device I/O."""
