"""The pool's event log, its command history and the hooks run per event (ZED's model)."""
