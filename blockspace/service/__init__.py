"""The mounted daemon: FUSE adapter, control socket, request handlers."""
