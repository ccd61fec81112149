"""A pool: its disks, the replicated metadata commit, checksum store, write-intent log."""
