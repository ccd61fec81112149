"""`blockspace scrub POOL [VOLUME]` and its controls `--status|--pause|--resume|--cancel`.

A mounted pool scrubs in its daemon (in the background, or followed with --wait); an unmounted
one in this process, to the end. The controls act on the daemon's scrub: with the pool not
mounted they exit NOT_MOUNTED, and with no scrub in the state they act on (nothing running to
pause or cancel, nothing paused to resume) NOTHING_TO_DO, asking the daemon nothing."""

import argparse
import time
from pathlib import Path
from typing import Any

import trio

from blockspace.admin import offline
from blockspace.admin.config import load_config
from blockspace.cli.common import (
    DATA_AT_RISK,
    OK,
    NothingToDo,
    NotMounted,
    Parser,
    lease_options,
    pool_socket,
    rate,
)
from blockspace.cli.output import console, emit, progress_bar
from blockspace.service import control
from blockspace.units import format_size

# The scrub states each control acts on, and how the refusal names what is missing.
ACTS_ON = {
    "pause": (("running",), "running"),
    "resume": (("paused",), "paused"),
    "cancel": (("running", "paused"), "running or paused"),
}


def cmd_scrub(args: argparse.Namespace) -> int:
    action = args.action or "start"
    limit = rate(args.rate, load_config().scrub_rate)
    registry, socket_path = pool_socket(args)
    if socket_path is None:
        if action != "start":
            raise NotMounted(
                f"pool {args.pool!r} is not mounted: no scrub to {action} (a scrub of an "
                "unmounted pool runs in the `scrub` command itself; `pool status` shows the "
                "last one)"
            )
        with progress_bar(args, "scrub") as update:
            progress = trio.run(offline.scrub, registry, args.pool, args.volume, limit, update,
                                  lease_options(args))
    elif action == "start":
        progress = control.request(socket_path, "scrub_start", volume=args.volume, rate=limit)
        if args.wait:
            progress = wait_for_scrub(args, socket_path)
    elif action == "status":
        progress = control.request(socket_path, "scrub_status")
    else:
        states, wanted = ACTS_ON[action]
        state = control.request(socket_path, "scrub_status")["state"]
        if state not in states:
            raise NothingToDo(f"no scrub to {action}: pool {args.pool!r} has no {wanted} "
                              f"scrub (scrub state: {state})")
        progress = control.request(socket_path, f"scrub_{action}")
    emit(args, progress, print_progress)
    if progress["state"] == "done" and progress["report"]["unrecoverable"]:
        return DATA_AT_RISK
    return OK


def wait_for_scrub(args: argparse.Namespace, socket_path: Path) -> dict[str, Any]:
    with progress_bar(args, "scrub") as update:
        while True:
            progress = dict(control.request(socket_path, "scrub_status"))
            update(progress)
            if progress["state"] not in ("running", "paused"):
                return progress
            time.sleep(0.5)


def print_progress(p: dict[str, Any]) -> None:
    report = p["report"]
    console.print(
        f"scrub {p['state']}: {p['done_slabs']}/{p['total_slabs']} slabs ({p['percent']:.0f}%), "
        f"{format_size(report['bytes_checked'])} checked at "
        f"{format_size(int(p['bytes_per_second']))}/s"
    )
    console.print(
        f"checksum errors {report['checksum_errors']}, mismatches {report['mismatches']}, "
        f"repaired blocks {report['repaired_blocks']}, "
        f"unrecoverable ranges {len(report['unrecoverable'])}"
    )
    for item in report["unrecoverable"]:
        console.print(f"  unrecoverable: {item['volume']} bytes {item['offset']}"
                      f"+{item['length']}")
    for line in report.get("labels_repaired", []):
        console.print(f"  label repaired: {line}")


def add_commands(commands: Any, common: Parser) -> None:
    p = commands.add_parser("scrub", parents=[common],
                            help="verify every block and its redundancy, repair what it can")
    p.add_argument("pool")
    p.add_argument("volume", nargs="?", help="only this volume")
    p.add_argument("--wait", action="store_true", help="block until the scrub is done")
    p.add_argument("--rate", help="bandwidth limit, e.g. 100M (per second)")
    actions = p.add_mutually_exclusive_group()
    for action in ("status", "pause", "resume", "cancel"):
        actions.add_argument(f"--{action}", dest="action", action="store_const", const=action,
                             help=f"{action} the running scrub" if action != "status"
                             else "show the running or last scrub")
    p.set_defaults(func=cmd_scrub, action=None)
