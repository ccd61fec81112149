"""The benchmark harness behind `tools/bench` (see docs/benchmarks.md).

Pure parts (fio job set and JSON parsing, ratios, targets, tables, profile summaries) live in
`jobs`, `report` and `profile`; everything that touches the machine (loop devices, mounts,
daemons, packages) lives in `system`, `setups` and `runner`.
"""
