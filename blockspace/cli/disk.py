"""`blockspace disk add|retire|remove|online|replace|clear|rebuild` and `pool
repair|rebalance`: through the daemon while the pool is mounted (`--wait` follows the
rebuild), else run to the end in this process (blockspace/admin/offline.py).

`disk rebuild POOL` shows the running extent job, `--cancel` stops it, `--rate` changes its
bandwidth limit; on an unmounted pool they act on the job a stop interrupted (the next mount
resumes it). With no job to act on they exit NOTHING_TO_DO."""

import argparse
import os
import time
from pathlib import Path
from typing import Any

import trio

from blockspace.admin import offline
from blockspace.admin.config import load_config
from blockspace.cli.common import (
    FAILED,
    OK,
    NothingToDo,
    Parser,
    lease_options,
    pool_socket,
    rate,
)
from blockspace.cli.output import console, emit, progress_bar
from blockspace.repair.rebuild import check_rate
from blockspace.service import control
from blockspace.units import format_size


def cmd_disk(args: argparse.Namespace) -> int:
    op, fields = request_of(args)
    registry, socket_path = pool_socket(args)
    if socket_path is not None:
        result = control.request(socket_path, op, **fields)
        if args.wait and op != "disk_add":
            result = wait_for_rebuild(args, socket_path)
    else:
        with progress_bar(args, "rebuild") as update:
            result = trio.run(offline.disk_job, registry, args.pool, op, fields, update,
                              lease_options(args))
    emit(args, result, print_result)
    failed = isinstance(result, dict) and result.get("state") == "failed"
    return FAILED if failed else OK


def cmd_clear(args: argparse.Namespace) -> int:
    registry, socket_path = pool_socket(args)
    if socket_path is not None:
        result = control.request(socket_path, "disk_clear", disk=args.disk)
    else:
        result = trio.run(offline.clear_disk_errors, registry, args.pool, args.disk)
    emit(args, result, lambda r: console.print(f"disk {r['cleared']}: error counters cleared"))
    return OK


def cmd_rebuild(args: argparse.Namespace) -> int:
    """The running extent job: show it, cancel it, change its rate (mounted); the interrupted
    one, resumed at the next mount (not mounted)."""
    limit = check_rate(rate(args.rate)) if args.rate is not None else None
    registry, socket_path = pool_socket(args)
    if socket_path is None:
        result = offline.interrupted_job(registry, args.pool, cancel=args.cancel, rate=limit)
        if result is None:
            raise NothingToDo(f"pool {args.pool!r} is not mounted and has no interrupted "
                              "rebuild to resume")
        emit(args, result, lambda r: console.print(
            f"rebuild {r['state']} ({r['reason']})"
            + (": it resumes at the next mount" if r["state"] == "interrupted" else
               ": it will not resume")))
        return OK
    progress = control.request(socket_path, "rebuild_status")
    if (args.cancel or limit is not None) and progress["state"] != "running":
        action = "cancel" if args.cancel else "change the rate of"
        raise NothingToDo(f"no rebuild to {action}: pool {args.pool!r} has none running "
                          f"(rebuild state: {progress['state']})")
    if args.cancel:
        progress = control.request(socket_path, "rebuild_cancel")
    elif limit is not None:
        progress = control.request(socket_path, "rebuild_rate", rate=limit)
    if args.wait:
        progress = wait_for_rebuild(args, socket_path)
    emit(args, progress, print_result)
    return FAILED if progress.get("state") == "failed" else OK


def request_of(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The daemon's request for the command line (every value checked)."""
    limit = check_rate(rate(getattr(args, "rate", None), load_config().rebuild_rate))
    command = args.disk_command if args.command == "disk" else args.pool_command
    if command == "add":
        paths = [os.path.abspath(p) for p in args.disks]
        return "disk_add", {"paths": paths, "media": args.media, "force": args.force}
    if command in ("retire", "remove"):
        return f"disk_{command}", {"disk": args.disk, "rate": limit}
    if command == "online":
        path = os.path.abspath(args.path) if args.path else None
        return "disk_online", {"disks": args.disks, "device": path}
    if command == "replace":
        return "disk_replace", {"old": args.old, "new": os.path.abspath(args.new),
                                "media": args.media, "force": args.force, "rate": limit}
    return f"pool_{command}", {"rate": limit}


def wait_for_rebuild(args: argparse.Namespace, socket_path: Path) -> dict[str, Any]:
    with progress_bar(args, "rebuild") as update:
        while True:
            progress = dict(control.request(socket_path, "rebuild_status"))
            update(progress)
            if progress["state"] != "running":
                return progress
            time.sleep(0.5)


def print_result(result: dict[str, Any]) -> None:
    if "added" in result:
        console.print(f"added disk(s) {', '.join(str(i) for i in result['added'])}")
        return
    if "cleared" in result:
        console.print(f"disk {result['cleared']}: error counters cleared")
        return
    resync = str(result["reason"]).startswith("resync")
    console.print(
        f"{'resync' if resync else 'rebuild'} {result['state']} ({result['reason']}): "
        f"{result['done']}/{result['total']} extents {'resynced' if resync else 'moved'}, "
        f"{result['failed']} failed, {format_size(result['bytes_moved'])} "
        f"{'rewritten' if resync else 'moved'} at "
        f"{format_size(int(result['bytes_per_second']))}/s"
    )
    for error in result.get("errors", []):
        console.print(f"  {error}")


def add_pool_commands(pool: Any, common: Parser) -> None:
    """`pool repair` and `pool rebalance`, under the `pool` group's subcommands."""
    p = pool.add_parser("repair", parents=[common],
                        help="rebuild the data of failed, missing or retiring disks")
    p.add_argument("pool")
    p.add_argument("--wait", action="store_true", help="block until the rebuild is done")
    p.add_argument("--rate", help="bandwidth limit, e.g. 200M (per second)")
    p.set_defaults(func=cmd_disk)

    p = pool.add_parser("rebalance", parents=[common],
                        help="spread data evenly over the disks (after adding disks)")
    p.add_argument("pool")
    p.add_argument("--wait", action="store_true", help="block until done")
    p.add_argument("--rate", help="bandwidth limit, e.g. 200M (per second)")
    p.set_defaults(func=cmd_disk)


def add_commands(commands: Any, common: Parser) -> None:
    disk = commands.add_parser("disk", help="add, retire, remove, replace disks").add_subparsers(
        dest="disk_command", required=True, parser_class=Parser)
    p = disk.add_parser("add", parents=[common], help="add disks to a pool (usable at once)")
    p.add_argument("pool")
    p.add_argument("disks", nargs="+", metavar="DISK")
    p.add_argument("--media", choices=["ssd", "hdd"])
    p.add_argument("--force", action="store_true", help="overwrite a Blockspace label")
    p.set_defaults(func=cmd_disk, wait=False)
    for name, text in (("retire", "move all data off a disk; it stays listed as retired"),
                       ("remove", "move all data off a disk, then drop it from the pool")):
        p = disk.add_parser(name, parents=[common], help=text)
        p.add_argument("pool")
        p.add_argument("disk", help="disk id or path (see pool status)")
        p.add_argument("--wait", action="store_true", help="block until done")
        p.add_argument("--rate", help="bandwidth limit, e.g. 200M (per second)")
        p.set_defaults(func=cmd_disk)
    p = disk.add_parser("online", parents=[common],
                        help="take back a failed or missing disk that returned, resyncing "
                             "only what it missed")
    p.add_argument("pool")
    p.add_argument("disks", nargs="+", metavar="DISK", help="disk ids or paths")
    p.add_argument("--path", help="where the disk is now, if it moved (one disk only)")
    p.add_argument("--wait", action="store_true", help="block until the resync is done")
    p.set_defaults(func=cmd_disk)
    p = disk.add_parser("replace", parents=[common], help="rebuild a disk's data onto a new one")
    p.add_argument("pool")
    p.add_argument("old", help="disk id or path of the disk to replace")
    p.add_argument("new", help="the new disk (image file or block device)")
    p.add_argument("--media", choices=["ssd", "hdd"])
    p.add_argument("--force", action="store_true")
    p.add_argument("--wait", action="store_true", help="block until done")
    p.add_argument("--rate", help="bandwidth limit, e.g. 200M (per second)")
    p.set_defaults(func=cmd_disk)
    p = disk.add_parser("clear", parents=[common],
                        help="reset a disk's error counters (read/write/checksum)")
    p.add_argument("pool")
    p.add_argument("disk", help="disk id or path (see pool status)")
    p.set_defaults(func=cmd_clear)
    p = disk.add_parser("rebuild", parents=[common],
                        help="the running retire/remove/replace/repair/rebalance: show it, "
                             "cancel it or change its rate")
    p.add_argument("pool")
    controls = p.add_mutually_exclusive_group()
    controls.add_argument("--cancel", action="store_true",
                          help="stop it (moves done stay done; not resumed at mount)")
    controls.add_argument("--rate", help="new bandwidth limit, e.g. 200M (0: none)")
    p.add_argument("--wait", action="store_true", help="block until it is done")
    p.set_defaults(func=cmd_rebuild)
