"""One-line verdicts, the table, and the JSON document of a scenario run."""

from __future__ import annotations

import platform
import time
from collections.abc import Sequence
from typing import Any

from .trials import Result

MiB = 1 << 20


def size(n: int) -> str:
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    if n >= 1024:
        return f"{n / 1024:.0f} KiB"
    return f"{n} B"


def verdict_line(r: Result) -> str:
    """scenario, layout, faults, bytes checked, verdict, seconds: on one line."""
    extra = ""
    if r.bytes_unreadable:
        extra += f", {size(r.bytes_unreadable)} EIO"
    extra += f", {size(r.bytes_wrong)} wrong" if r.bytes_wrong else ", 0 wrong"
    line = (f"{r.verdict.upper() if r.verdict == 'FAILED' else r.verdict:>16}  "
            f"{r.scenario} {r.layout}: {r.faults}; {size(r.bytes_checked)} checked "
            f"({r.files_acked} files){extra}; {r.seconds:.1f}s")
    if r.problems:
        line += " -- " + r.problems[0].splitlines()[0][:200]
    return line


COLUMNS = ("scenario", "layout", "faults", "files", "checked", "EIO", "wrong", "verdict",
           "seconds")


def rows(results: Sequence[Result]) -> list[list[str]]:
    return [[r.scenario, r.layout, r.faults, str(r.files_acked), size(r.bytes_checked),
             size(r.bytes_unreadable) if r.bytes_unreadable else "0",
             size(r.bytes_wrong) if r.bytes_wrong else "0", r.verdict, f"{r.seconds:.1f}"]
            for r in results]


def table(results: Sequence[Result], *, markdown: bool = False) -> str:
    body = rows(results)
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |",
                 "|" + "|".join("---" for _ in COLUMNS) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        return "\n".join(lines)
    widths = [max(len(c), *(len(row[i]) for row in body)) if body else len(c)
              for i, c in enumerate(COLUMNS)]
    right = {3, 4, 5, 6, 8}

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(cell.rjust(widths[i]) if i in right else cell.ljust(widths[i])
                         for i, cell in enumerate(row)).rstrip()

    lines = [fmt(COLUMNS), fmt(["-" * w for w in widths])]
    lines += [fmt(row) for row in body]
    return "\n".join(lines)


def summary(results: Sequence[Result], seconds: float) -> str:
    counts: dict[str, int] = {}
    for r in results:
        counts[r.verdict] = counts.get(r.verdict, 0) + 1
    parts = [f"{counts.get(v, 0)} {v}" for v in ("pass", "expected failure", "FAILED")]
    return (f"{len(results)} trials in {seconds:.0f}s: " + ", ".join(parts)
            + f"; {size(sum(r.bytes_checked for r in results))} of acknowledged data checked")


def document(results: Sequence[Result], *, mode: str, seed: int, seconds: float,
             interrupted: bool = False) -> dict[str, Any]:
    return {
        "mode": mode,
        "seed": seed,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": {"kernel": platform.release(), "python": platform.python_version()},
        "seconds": round(seconds, 1),
        "interrupted": interrupted,
        "ok": not interrupted and all(r.verdict != "FAILED" for r in results),
        "results": [r.to_dict() for r in results],
    }
