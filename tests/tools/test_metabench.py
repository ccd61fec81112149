"""Smoke test of tools/metabench (issue 16's metadata benchmark): a --quick run on sparse
image files gives every figure, as JSON. No timing is asserted: figures go in
docs/benchmarks.md."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_metabench_quick_run_reports_every_figure(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, str(REPO / "tools" / "metabench"), "--quick", "--json",
         "--dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=True,
    )
    figures = json.loads(out.stdout)
    assert set(figures["allocation_ms"]) == {"100", "1000"}
    assert all(v > 0 for v in figures["allocation_ms"].values())
    reads = figures["read_while_allocating"]
    assert reads["reads"] > 0
    assert reads["p99_ms"] >= reads["p50_ms"] > 0
    opened = figures["open"]
    assert opened["slabs"] == 5000  # the mapped slabs, nothing lost on the way
    assert opened["bring_up_s"] > 0
    assert opened["bring_up_rss_mib"] > 0
    assert opened["offline_status_s"] > 0
    assert list(tmp_path.iterdir()) == []  # its scratch directory is gone
