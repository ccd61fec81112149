"""Pool and disk administration shared by the CLI and the daemon; the pool registry."""
