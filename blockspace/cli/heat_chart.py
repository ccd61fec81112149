"""`tier status --png`: the heat map of a tiered volume as a chart with a title, labelled
axes and a legend (matplotlib, drawn off-screen with the Agg canvas: no display needed).
matplotlib is an optional dependency (the `chart` extra); without it the command says so."""

from pathlib import Path
from typing import Any

from blockspace.errors import InvalidInput
from blockspace.units import format_size


def heat_figure(s: dict[str, Any]) -> Any:
    """The matplotlib Figure of a `tier status` document: heat per span of the volume
    over the share of each span held on the ssd tier, against the volume offset."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise InvalidInput("--png needs matplotlib (pip install 'blockspace[chart]' or "
                           "matplotlib)") from None
    heat = s["heat_map"]["heat"]
    fractions = s["heat_map"]["ssd_fraction"]
    span = s["size"] / max(1, len(heat)) / (1 << 20)  # MiB per bucket
    offsets = [i * span for i in range(len(heat))]
    figure = Figure(figsize=(10, 5), layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=(2, 1))
    top.bar(offsets, heat, width=span, align="edge", color="tab:red", label="heat (reads "
            "and writes, decayed)")
    if any(value > 0 for value in heat):
        top.set_yscale("symlog")
    top.set_ylabel("heat (log scale)")
    top.legend(loc="upper right")
    bottom.fill_between(offsets + [len(heat) * span], fractions + fractions[-1:],
                        step="post", color="tab:blue", alpha=0.7, label="share on ssd tier")
    bottom.set_ylim(0, 1)
    bottom.set_ylabel("on ssd")
    bottom.set_xlabel("volume offset (MiB)")
    bottom.legend(loc="upper right")
    figure.suptitle(f"tier heat of {s['name']} ({format_size(s['size'])}; ssd "
                    f"{s['ssd']['resiliency']}, hdd {s['hdd']['resiliency']})")
    return figure


def write_png(path: Path, s: dict[str, Any]) -> None:
    figure = heat_figure(s)
    try:
        figure.savefig(path, format="png", dpi=100)
    except OSError as error:
        raise InvalidInput(f"--png {path}: cannot be written: {error.strerror}") from None
