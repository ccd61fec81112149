"""Smoke test of tools/volbench (issue 19's compiled-against-pure A/B): a tiny run of the pure
build gives every figure for each layout and says which build ran. No timing is asserted:
figures go in docs/benchmarks.md."""

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_a_tiny_pure_run_reports_every_figure_and_cleans_up(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "volbench"), "--requests", "20", "--rounds", "1",
         "--layouts", "mirror-2,parity-1", "--builds", "pure", "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=True, env=env,
    ).stdout
    for layout in ("mirror-2", "parity-1"):
        for op in ("write", "write cpu", "read", "read cpu"):
            line = next(x for x in out.splitlines() if x.startswith(f"{layout:9} 4K {op:9} "))
            assert " pure " in line
    assert list(tmp_path.iterdir()) == []  # its scratch directory is gone
