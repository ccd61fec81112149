"""The PNG bar chart: one panel per job, one bar per setup, baselines and Blockspace in two
colours, each bar labelled with its figure."""

from __future__ import annotations

from typing import Any

from bench_lib.catalog import SETUPS_BY_NAME
from bench_lib.jobs import JOBS, format_value
from bench_lib.report import job_value, verified


def draw(results: dict[str, Any], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setups = [name for name, entry in results["setups"].items() if entry.get("jobs")]
    if not setups:
        return
    rows, cols = 2, 3
    height = max(4.5, 0.28 * len(setups) * rows + 1.5)
    fig, axes = plt.subplots(rows, cols, figsize=(13, height), sharey=True)
    colours = {"baseline": "#8c8c8c", "blockspace": "#e07b00"}
    positions = list(range(len(setups)))
    for ax, job in zip(axes.flat, JOBS, strict=False):
        values = [job_value(results, s, job.name) for s in setups]
        heights = [v or 0.0 for v in values]
        colour = [colours.get(getattr(SETUPS_BY_NAME.get(s), "group", ""), "#4c72b0")
                  for s in setups]
        bars = ax.barh(positions, heights, color=colour)
        for bar, setup in zip(bars, setups, strict=True):
            if verified(results["setups"][setup]).startswith("**NO**"):
                bar.set_hatch("///")
                bar.set_edgecolor("#c00000")
        top = max(heights) if any(heights) else 1.0
        for y, value in zip(positions, values, strict=True):
            text = format_value(value, job.metric) if value is not None else "n/a"
            ax.text((value or 0) + top * 0.01, y, text, va="center", fontsize=7)
        ax.set_title(f"{job.label}" + (" (IOPS)" if job.metric == "iops" else ""), fontsize=9)
        ax.set_xlim(0, top * 1.22)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(positions, setups, fontsize=8)
    axes[1][0].set_yticks(positions, setups, fontsize=8)
    axes[0][0].invert_yaxis()
    if any(verified(results["setups"][s]).startswith("**NO**") for s in setups):
        title += "\nhatched red: data did not read back intact (fio verify or mkfs trial)"
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
