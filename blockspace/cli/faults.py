"""`blockspace fault inject|clear|list`: drive the fault-injection layer of a mounted pool.

Every value is checked here, before the daemon is asked anything; the daemon checks the
disk and the ranges against the pool, and refuses everything unless the pool was mounted
with `--allow-fault-injection`. See docs/fault-injection.md.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path
from typing import Any

from blockspace.cli.common import OK, Parser, daemon_socket
from blockspace.cli.output import console, emit, table
from blockspace.disks.faults import FaultSpec, format_duration
from blockspace.errors import InvalidInput
from blockspace.service import control
from blockspace.units import parse_size

_PERCENT_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*%\s*$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(us|µs|ms|s|m)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


# ---- value parsers (each raises InvalidInput with a one-line message) -----------------------


def parse_percent(text: str, option: str) -> float:
    """'1%' -> 0.01, '0.5%' -> 0.005, '100%' -> 1.0."""
    match = _PERCENT_RE.match(str(text))
    value = float(match.group(1)) if match else -1.0
    if not match or not 0 <= value <= 100:
        raise InvalidInput(f"{option} takes a percentage like 1% or 0.5%, not {text!r}")
    return value / 100


def parse_duration(text: str, option: str, *, default_unit: str | None = None) -> float:
    """'20ms' -> 0.02, '1.5s' -> 1.5, '500us' -> 0.0005; a bare number needs `default_unit`."""
    match = _DURATION_RE.match(str(text))
    unit = (match.group(2) or default_unit) if match else None
    if not match or unit is None:
        example = "5 or 1.5s" if default_unit == "s" else "20ms or 1.5s"
        raise InvalidInput(f"{option} takes a duration like {example}, not {text!r}")
    seconds = float(match.group(1)) * _DURATION_UNITS[unit.lower()]
    if seconds > 86400:
        raise InvalidInput(f"{option} {text} is too long (at most a day)")
    return seconds


def parse_bandwidth(text: str) -> int:
    """'10M' or '10M/s' -> bytes per second."""
    body = str(text).strip()
    body = body[:-2] if body.lower().endswith("/s") else body
    try:
        value = parse_size(body)
    except InvalidInput:
        raise InvalidInput(f"--bandwidth takes bytes per second like 10M or 512K, "
                           f"not {text!r}") from None
    if value <= 0:
        raise InvalidInput("--bandwidth must be larger than zero")
    return value


def parse_range(text: str) -> tuple[int, int]:
    """'OFFSET:LENGTH' with sizes: '1G:4K' -> (1 GiB, 4096)."""
    offset_text, sep, length_text = str(text).partition(":")
    try:
        if not sep:
            raise InvalidInput("no colon")
        offset, length = parse_size(offset_text), parse_size(length_text)
    except InvalidInput:
        raise InvalidInput(f"--range takes OFFSET:LENGTH in bytes of the disk, like 1G:4K, "
                           f"not {text!r}") from None
    if length <= 0:
        raise InvalidInput(f"--range {text}: the length must be larger than zero")
    return offset, length


def parse_flakey(text: str) -> tuple[float, float]:
    """'UP:DOWN' in seconds (or with units): '5:1' -> (5.0, 1.0)."""
    up_text, sep, down_text = str(text).partition(":")
    try:
        if not sep:
            raise InvalidInput("no colon")
        up = parse_duration(up_text, "--flakey", default_unit="s")
        down = parse_duration(down_text, "--flakey", default_unit="s")
    except InvalidInput:
        raise InvalidInput(f"--flakey takes UP:DOWN in seconds, like 5:1 or 2.5:0.5, "
                           f"not {text!r}") from None
    if up <= 0 or down <= 0:
        raise InvalidInput(f"--flakey {text}: both periods must be longer than zero")
    return up, down


def parse_seed(text: str) -> int:
    try:
        seed = int(str(text).strip())
    except ValueError:
        seed = -1
    if not 0 <= seed < 2**63:
        raise InvalidInput(f"--seed takes a whole number >= 0, not {text!r}")
    return seed


def spec_from_args(args: argparse.Namespace) -> FaultSpec:
    """The FaultSpec that `fault inject`'s options describe; InvalidInput when they are bad."""
    values: dict[str, Any] = {}
    if args.read_error is not None:
        values["read_error"] = parse_percent(args.read_error, "--read-error")
    if args.write_error is not None:
        values["write_error"] = parse_percent(args.write_error, "--write-error")
    if args.range:
        values["ranges"] = tuple(parse_range(r) for r in args.range)
        if args.read_error is None and args.write_error is None:
            values["read_error"] = values["write_error"] = 1.0  # a bad range fails both
    if args.latency is not None:
        values["latency"] = parse_duration(args.latency, "--latency")
    if args.jitter is not None:
        values["jitter"] = parse_duration(args.jitter, "--jitter")
        if args.latency is None:
            raise InvalidInput("--jitter varies the --latency: give --latency too")
        if values["jitter"] > values["latency"]:
            raise InvalidInput(f"--jitter {args.jitter} cannot exceed --latency {args.latency}")
    if args.bandwidth is not None:
        values["bandwidth"] = parse_bandwidth(args.bandwidth)
    if args.bitflip is not None:
        values["bitflip"] = parse_percent(args.bitflip, "--bitflip")
    if args.flakey is not None:
        values["flakey_up"], values["flakey_down"] = parse_flakey(args.flakey)
    if args.drop_writes:
        values["drop_writes"] = True
    if args.seed is not None:
        values["seed"] = parse_seed(args.seed)
    if args.dead:
        others = [k for k in values if k != "seed"]
        if others:
            raise InvalidInput("--dead fails every request: it cannot be combined with "
                               "other faults")
        values["dead"] = True
    spec = FaultSpec(**values)
    if spec.empty:
        raise InvalidInput("fault inject needs at least one fault, e.g. --read-error 1%, "
                           "--latency 20ms or --dead")
    return spec


def _disk_argument(text: str) -> str:
    """A disk id stays as it is; a path is made absolute (the daemon has another cwd)."""
    if text.isdigit() or os.sep not in text:
        return text
    return os.path.abspath(text)


# ---- commands -------------------------------------------------------------------------------


def _socket(args: argparse.Namespace) -> Path:
    return daemon_socket(args, "faults are injected into the running daemon (mount it with "
                               "--allow-fault-injection)")


def _stats_text(d: dict[str, Any]) -> str:
    s = d["statistics"]
    parts = [f"{s['injected_read_errors']}/{s['injected_write_errors']}/"
             f"{s['injected_flush_errors']} injected r/w/flush errors"]
    if s["dropped_writes"]:
        parts.append(f"{s['dropped_writes']} dropped writes")
    if s["bit_flips"]:
        parts.append(f"{s['bit_flips']} bit flips")
    if s["delay_seconds"] or s["throttle_seconds"]:
        parts.append(f"{format_duration(s['delay_seconds'] + s['throttle_seconds'])} delayed")
    return ", ".join(parts)


def cmd_fault_inject(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)  # every value checked before anything is asked
    socket_path = _socket(args)
    result = control.request(socket_path, "fault_inject", disk=_disk_argument(args.disk),
                             spec=spec.to_dict())
    emit(args, result, lambda d: console.print(
        f"disk {d['id']} ({d['path']}): {d['description']}"
        + (f" (seed {d['seed']})" if spec.seed is None and d.get("seed") is not None else "")))
    return OK


def cmd_fault_clear(args: argparse.Namespace) -> int:
    socket_path = _socket(args)
    fields: dict[str, Any] = {} if args.disk is None else {"disk": _disk_argument(args.disk)}
    result = control.request(socket_path, "fault_clear", **fields)

    def human(d: dict[str, Any]) -> None:
        if not d["cleared"]:
            console.print("no faults were injected" + (
                f" on disk {d['disks'][0]['id']}" if args.disk is not None else ""))
        for disk in d["disks"]:
            if disk["id"] in d["cleared"]:
                console.print(f"disk {disk['id']} ({disk['path']}): faults cleared "
                              f"(state {disk['state']})")

    emit(args, result, human)
    return OK


def cmd_fault_list(args: argparse.Namespace) -> int:
    socket_path = _socket(args)
    result = control.request(socket_path, "fault_list")

    def human(disks: list[dict[str, Any]]) -> None:
        console.print(table(("id", "path", "state", "faults", "phase", "injected"),
                            [(str(d["id"]), d["path"], d["state"], d["description"],
                              d["flakey_phase"] or "-", _stats_text(d)) for d in disks]))

    emit(args, result, human)
    return OK


# ---- parser ---------------------------------------------------------------------------------


def add_commands(commands: Any, common: Parser) -> None:
    """`fault inject|clear|list` under the top-level subcommands of `blockspace`."""
    fault = commands.add_parser(
        "fault", help="inject disk faults into a pool mounted with --allow-fault-injection",
    ).add_subparsers(dest="fault_command", required=True, parser_class=Parser)

    p = fault.add_parser(
        "inject", parents=[common], help="make one disk fail, slow down or corrupt reads",
        description="Replace the faults of one disk of a mounted pool (mounted with "
                    "--allow-fault-injection). Percentages are per request.",
    )
    p.add_argument("pool")
    p.add_argument("disk", metavar="DISK", help="disk id (as in `pool status`) or its path")
    p.add_argument("--read-error", metavar="P%", help="fail reads with EIO, e.g. 1%% or 100%%")
    p.add_argument("--write-error", metavar="P%", help="fail writes with EIO, e.g. 0.5%%")
    p.add_argument("--range", action="append", metavar="OFFSET:LENGTH",
                   help="errors only for I/O touching these disk bytes (repeatable); alone, "
                        "every read and write there fails")
    p.add_argument("--latency", metavar="TIME", help="added to every request, e.g. 20ms")
    p.add_argument("--jitter", metavar="TIME", help="latency varies by +- this, e.g. 5ms")
    p.add_argument("--bandwidth", metavar="BYTES", help="throughput cap per second, e.g. 10M")
    p.add_argument("--bitflip", metavar="P%",
                   help="flip one random bit in this share of reads (not on disk)")
    p.add_argument("--dead", action="store_true", help="every request fails until cleared")
    p.add_argument("--flakey", metavar="UP:DOWN",
                   help="seconds up, then seconds failing, repeating (dm-flakey)")
    p.add_argument("--drop-writes", action="store_true",
                   help="writes report success but never reach the disk (while --flakey is "
                        "down, or always)")
    p.add_argument("--seed", metavar="N", help="random seed, for a reproducible run")
    p.set_defaults(func=cmd_fault_inject)

    p = fault.add_parser("clear", parents=[common], help="undo injected faults")
    p.add_argument("pool")
    p.add_argument("disk", nargs="?", metavar="DISK", help="only this disk (default: all)")
    p.set_defaults(func=cmd_fault_clear)

    p = fault.add_parser("list", parents=[common], help="injected faults and their counters")
    p.add_argument("pool")
    p.set_defaults(func=cmd_fault_list)

