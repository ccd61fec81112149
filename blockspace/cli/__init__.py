"""The `blockspace` command: argument parsing and output, one module per command group."""
