"""What the command line prints: `--json` documents or rich tables on stdout, progress bars on
stderr. Commands build one plain value (a dict or a list, the same for both forms) and hand it
to `emit` with the function that prints it for a person."""

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.table import Table

from blockspace.units import format_size

# Piped output (logs, CI) gets wide tables unless $COLUMNS says how wide; paths fold
# rather than being cut either way. Rich looks up sys.stdout at each print, so a caller
# that redirects stdout (tools/scenarios) captures it.
console = Console(width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160)

# Columns whose cells fold onto more lines instead of ending in "…": a cut path is useless.
FOLDED = frozenset({"path", "mounted at", "mountpoint", "command"})


# The version of the --json contract (README "JSON output"): every document that is an
# object carries it; it goes up only when a key is removed or changes meaning (new keys do
# not change it). A document that is a list stays a bare list: wrapping it would break
# every `for item in doc` consumer, and its items are the objects the contract describes.
JSON_VERSION = 1


def versioned(data: Any) -> Any:
    """`data` with "json_version" if it is an object (lists and scalars as they are)."""
    return {"json_version": JSON_VERSION, **data} if isinstance(data, dict) else data


def json_line(data: Any) -> str:
    """One line of a --json stream (events --follow, iostat): versioned like a document."""
    return json.dumps(versioned(data), sort_keys=True)


def emit(args: argparse.Namespace, data: Any, human: Callable[[Any], None]) -> None:
    """`data` as JSON with --json, else through `human`."""
    try:
        if args.json:
            print(json.dumps(versioned(data), indent=2, sort_keys=True))
        else:
            human(data)
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`blockspace ... --json | head`): exit 1 without a traceback,
        # as rich does for tables; stdout to /dev/null so the flush at exit cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        raise SystemExit(1) from None


def error_line(message: str) -> None:
    """The one line on stderr a failed command prints."""
    print(message, file=sys.stderr)


def table(columns: Sequence[str], rows: Sequence[Sequence[str]], title: str | None = None) -> Table:
    """A rich table of text cells (titled tables are left-justified, as in `pool status`)."""
    result = Table(title=title, title_justify="left") if title else Table()
    for column in columns:
        result.add_column(column, overflow="fold" if column in FOLDED else "ellipsis")
    for row in rows:
        result.add_row(*row)
    return result


def make_progress(out: Console) -> Any:
    """A rich Progress without rich's own time-remaining column: the description carries
    our ETA (from the job's own pace), and two ETAs that disagree help nobody."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                    TaskProgressColumn(), console=out)


@contextmanager
def progress_bar(args: argparse.Namespace, what: str) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A rich progress line (percent, bytes/s, ETA) on stderr while a person is watching;
    yields `update(progress)` for a progress dict of a rebuild or a scrub (a no-op when the
    output is JSON or stderr is not a terminal)."""
    if args.json or not sys.stderr.isatty():
        yield lambda progress: None
        return
    bar = make_progress(Console(stderr=True))
    bar.start()
    task = bar.add_task(what, total=100)

    def update(p: dict[str, Any]) -> None:
        speed = format_size(int(p["bytes_per_second"])) + "/s"
        eta = p["eta_seconds"]
        eta_text = f", ETA {eta:.0f}s" if eta is not None else ""
        bar.update(task, completed=p["percent"],
                   description=f"{what} {p['state']} {speed}{eta_text}")

    try:
        yield update
    finally:
        bar.stop()
