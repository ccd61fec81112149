"""`blockspace iostat POOL [-v] [INTERVAL [COUNT]]`, like `zpool iostat -v`: operations/s,
bandwidth and latency per volume (and, with -v, per disk) from the daemon's counters (the
same ones the Prometheus endpoint exposes). The first report covers the time since the
mount; each further one the INTERVAL before it."""

import argparse
import time
from typing import Any

from blockspace.cli.common import OK, Parser, daemon_socket
from blockspace.cli.output import console, json_line, table
from blockspace.service import control
from blockspace.service.iostat import report
from blockspace.units import format_size


def interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.1 <= value <= 86400:
        raise argparse.ArgumentTypeError(f"takes seconds between 0.1 and 86400, not {text!r}")
    return value


def count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"takes a number of reports (1 or more), not {text!r}")
    return int(text)


def rate(value: float | None) -> str:
    return f"{format_size(int(value))}/s" if value else "0"


def ops(value: float | None) -> str:
    return f"{value:.0f}" if value and value >= 10 else f"{value or 0:.1f}"


def latency(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1e3:.2f}ms" if value < 1 else f"{value:.2f}s"


def print_report(data: dict[str, Any], verbose: bool) -> None:
    rows = [(v["name"], ops(v["read_ops"]), ops(v["write_ops"]), rate(v["read_bytes"]),
             rate(v["write_bytes"]), latency(v["read_latency"]), latency(v["write_latency"]))
            for v in data["volumes"]]
    total = data["total"]
    rows.append((f"{data['pool']} (all volumes)", ops(total["read_ops"]), ops(total["write_ops"]),
                 rate(total["read_bytes"]), rate(total["write_bytes"]), "", ""))
    if verbose:
        # A disk's latency is of all its requests that waited for it, reads and writes.
        rows += [(f"  disk {d['id']} {d['path']} ({d['state']})", ops(d["read_ops"]),
                  ops(d["write_ops"]), rate(d["read_bytes"]), rate(d["write_bytes"]),
                  latency(d["latency"]), "")
                 for d in data["disks"]]
    console.print(table(("", "read ops/s", "write ops/s", "read", "write", "read lat",
                         "write lat"), rows,
                        title=f"over {data['interval']:.1f}s"))


def cmd_iostat(args: argparse.Namespace) -> int:
    socket_path = daemon_socket(args, "iostat reads the daemon's counters")
    reports = args.count if args.count is not None else (1 if args.interval is None else 0)
    previous: dict[str, Any] | None = None
    done = 0
    while True:
        snapshot = control.request(socket_path, "iostat")
        data = report(snapshot, previous)
        data["time"] = time.time()
        if args.json:
            print(json_line(data), flush=True)  # one JSON line per report
        else:
            print_report(data, args.verbose)
        done += 1
        if reports and done >= reports:
            return OK
        previous = snapshot
        time.sleep(args.interval)


def add_commands(commands: Any, common: Parser) -> None:
    p = commands.add_parser("iostat", parents=[common],
                            help="I/O per volume and disk: operations/s, bandwidth, latency")
    p.add_argument("pool")
    p.add_argument("interval", nargs="?", type=interval,
                   help="seconds between reports (default: one report, since the mount)")
    p.add_argument("count", nargs="?", type=count, help="stop after this many reports")
    p.set_defaults(func=cmd_iostat)
