"""What the command line prints for a person: tables fold long paths instead of cutting
them, and a progress line shows one ETA."""

import io

from rich.console import Console

from blockspace.cli.output import make_progress, table

LONG = "/srv/" + "a-very-long-directory-name/" * 4 + "disk-image-number-0.img"


def test_a_long_path_is_folded_not_cut_at_80_columns() -> None:
    out = io.StringIO()
    Console(file=out, width=80).print(table(("id", "path", "media", "size", "state"),
                                            [("0", LONG, "hdd", "256M", "online")]))
    text = out.getvalue()
    assert "…" not in text
    cells = "".join(line.split("│")[2].strip() for line in text.splitlines()
                    if line.count("│") > 2)
    assert cells == LONG
    assert max(len(line) for line in text.splitlines()) <= 80


def test_the_progress_line_has_one_eta() -> None:
    out = io.StringIO()
    screen = Console(file=out, width=120)
    bar = make_progress(screen)
    task = bar.add_task("repair running 10M/s, ETA 12s", total=100)
    bar.update(task, completed=40)
    screen.print(bar.get_renderable())
    text = out.getvalue()
    assert "ETA 12s" in text
    assert "40%" in text
    assert "-:--:--" not in text
    assert "0:00:" not in text
