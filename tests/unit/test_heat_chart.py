"""`tier status --png`: a real PNG with a title, labelled axes and a legend on each plot."""

from pathlib import Path
from typing import Any

import pytest

from blockspace.cli.heat_chart import heat_figure, write_png
from blockspace.errors import InvalidInput

MiB = 1 << 20


def document(heat: list[float]) -> dict[str, Any]:
    return {"name": "fast", "size": 64 * MiB,
            "ssd": {"resiliency": "mirror-2"}, "hdd": {"resiliency": "parity-1"},
            "heat_map": {"buckets": len(heat), "heat": heat,
                         "ssd_fraction": [1.0 if h > 1 else 0.0 for h in heat]}}


def test_the_chart_has_a_title_axis_labels_and_legends() -> None:
    figure = heat_figure(document([0.0, 5.0, 300.0, 0.5]))
    assert figure.get_suptitle() == "tier heat of fast (64M; ssd mirror-2, hdd parity-1)"
    top, bottom = figure.axes
    assert top.get_ylabel() == "heat (log scale)"
    assert bottom.get_ylabel() == "on ssd"
    assert bottom.get_xlabel() == "volume offset (MiB)"
    for axes in (top, bottom):
        legend = axes.get_legend()
        assert legend is not None
        assert [t.get_text() for t in legend.get_texts()]
    assert bottom.get_xlim()[1] >= 64


@pytest.mark.parametrize("heat", [[0.0] * 8, [1.0, 2.0]])
def test_the_png_is_written_and_is_a_png(tmp_path: Path, heat: list[float]) -> None:
    path = tmp_path / "heat.png"
    write_png(path, document(heat))
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") == 1000  # 10 in at 100 dpi: a real chart


def test_an_unwritable_path_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as caught:
        write_png(tmp_path / "no" / "heat.png", document([1.0]))
    assert str(caught.value).startswith(f"--png {tmp_path / 'no' / 'heat.png'}: cannot be "
                                        "written: ")
