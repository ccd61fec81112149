"""Several rounds of the whole matrix, merged into one entry per setup.

This machine's speed drifts over minutes (a baseline can read 1.1 or 2.7 GiB/s in two runs
an hour apart). `--repeat` runs a job N times back to back, so a setup measured in a slow
minute and its baseline in a fast one still give a skewed ratio. Rounds go through every
setup N times, in alternating order, and keep per job the round with the median figure: a
drift then has to last the whole run to skew a ratio. Pure logic: no I/O here.
"""

from __future__ import annotations

import copy
from typing import Any


def round_order(names: list[str], round_index: int) -> list[str]:
    """Setups in run order for one round: forwards, then backwards, and so on, so that no
    setup is always measured first or last."""
    return list(names) if round_index % 2 == 0 else list(reversed(names))


def merge_rounds(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """One setup's entries, one per round (the first one with the mkfs trial and profiles),
    as one entry: each job is the round with the median value, its figures in
    `round_values`; the daemon's CPU for a job comes from that same round; a data check
    that failed in any round counts as failed; what failed in a later round is listed in
    `problems`."""
    if not entries:
        raise ValueError("no rounds to merge")
    merged = copy.deepcopy(entries[0])
    if len(entries) == 1:
        return merged
    merged["rounds"] = len(entries)
    names = list(dict.fromkeys(job for entry in entries for job in entry.get("jobs", {})))
    for job in names:
        figures = [entry.get("jobs", {}).get(job, {}) for entry in entries]
        measured = [(figure["value"], index) for index, figure in enumerate(figures)
                    if figure.get("value") is not None]
        errors = {str(index + 1): figure["error"] for index, figure in enumerate(figures)
                  if figure.get("error")}
        if not measured:
            continue
        ordered = sorted(measured)
        _, chosen = ordered[(len(ordered) - 1) // 2]
        figure = copy.deepcopy(figures[chosen])
        figure["round_values"] = [value for value, _ in measured]
        figure["round"] = chosen + 1
        if errors:
            figure["round_errors"] = errors
        merged.setdefault("jobs", {})
        merged["jobs"][job] = figure
        cpu = ((entries[chosen].get("daemon") or {}).get("cpu") or {}).get(job)
        if cpu is not None and merged.get("daemon") is not None:
            merged["daemon"].setdefault("cpu", {})[job] = cpu
    for index, entry in enumerate(entries[1:], start=2):
        if entry.get("status", "ok") != "ok":
            merged.setdefault("problems", []).append(
                f"round {index}: {entry.get('status')}: {entry.get('reason', '')}".rstrip(": "))
        for check, outcome in (entry.get("verify") or {}).items():
            if outcome != "ok" and (merged.get("verify") or {}).get(check) == "ok":
                merged["verify"][check] = f"round {index}: {outcome}"
        for problem in entry.get("problems", []):
            merged.setdefault("problems", []).append(f"round {index}: {problem}")
    return merged
