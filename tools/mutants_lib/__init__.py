"""tools/mutants: break each guarantee on purpose, in a scratch copy, and check a test notices."""
