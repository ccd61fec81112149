"""`blockspace pool create|status|list|import|export` (and, from cli/disk.py, `pool repair`
and `pool rebalance`)."""

import argparse
import os
import time
from dataclasses import replace
from typing import Any

import trio

from blockspace.admin import offline
from blockspace.admin.advice import Thresholds, advise
from blockspace.admin.config import load_config
from blockspace.admin.pools import check_new_disks
from blockspace.admin.registry import PoolEntry
from blockspace.cli import disk, events
from blockspace.cli.common import (
    DATA_AT_RISK,
    OK,
    Parser,
    UsageError,
    mounted_socket,
    registry_of,
)
from blockspace.cli.output import console, emit, table
from blockspace.cli.tiers import annotate_status
from blockspace.errors import InvalidInput
from blockspace.ondisk.label import validate_name
from blockspace.pool.pool import (
    DEFAULT_META_SLOT_SIZE,
    DEFAULT_SLAB_SIZE,
    check_slot_size,
    required_slot_size,
)
from blockspace.service import control
from blockspace.units import format_size, parse_size


def cmd_create(args: argparse.Namespace) -> int:
    registry = registry_of(args)
    validate_name("pool", args.name)
    if args.name in registry.pools():
        raise InvalidInput(f"a pool named {args.name!r} already exists")
    slab_size = parse_size(args.slab_size)
    meta_slot_size = parse_size(args.metadata_size) if args.metadata_size else None
    disks = check_new_disks(
        args.disks, media=args.media, slab_size=slab_size,
        meta_slot_size=meta_slot_size or DEFAULT_META_SLOT_SIZE, force=args.force,
    )
    needed = required_slot_size([d.size for d in disks], slab_size,
                                [os.path.abspath(d.path) for d in disks],
                                [d.media for d in disks])
    if meta_slot_size is not None:
        check_slot_size(meta_slot_size, needed, "pool")  # before anything is written
    # Absolute paths: the metadata keeps them as the hint shown for a missing disk.
    disks = [replace(d, path=os.path.abspath(d.path)) for d in disks]

    async def create() -> dict[str, Any]:
        return await offline.create_pool(args.name, disks, slab_size=slab_size,
                                         meta_slot_size=meta_slot_size)

    status = trio.run(create)
    registry.add(PoolEntry(status["name"], status["uuid"], [d.path for d in disks]))
    emit(args, status, lambda s: console.print(
        f"created pool [bold]{s['name']}[/] ({s['uuid']}) on {len(s['disks'])} disks, "
        f"{format_size(s['raw_size'])} raw"))
    return OK


def status_of(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """The status document of pool `name`: from its daemon, else from the disks."""
    registry = registry_of(args)
    registry.get(name)
    socket_path = mounted_socket(registry, name)
    if socket_path is not None:
        status = dict(control.request(socket_path, "status"))
    else:
        status = trio.run(offline.status, registry, name)
    annotate_status(status)
    # The name the user addresses the pool by; `pool import --name` may differ from the labels'.
    status["name"] = name
    config = load_config()
    # An interrupted disk job resumes at the next mount; while mounted the daemon's
    # `rebuild` progress tells instead.
    job = registry.job_state(name) if socket_path is None else None
    advice = advise(status, Thresholds(config.pool_full_percent,
                                       config.thin_overcommit_percent), job)
    status["status"], status["actions"] = advice.status, advice.actions
    return status


def cmd_status(args: argparse.Namespace) -> int:
    status = status_of(args, args.name)
    emit(args, status, print_status)
    return OK if status["health"] != "failed" else DATA_AT_RISK


def print_status(s: dict[str, Any]) -> None:
    mounted = f"mounted at {s['mountpoint']}" if s["mountpoint"] else "not mounted"
    console.print(
        f"pool [bold]{s['name']}[/]  {s['uuid']}  health: [bold]{s['health']}[/]  {mounted}\n"
        f"slab size {format_size(s['slab_size'])}, raw {format_size(s['raw_size'])}, "
        f"free {format_size(s['raw_free'])}, metadata generation {s['generation']}"
    )
    if s.get("status"):  # what is wrong and what to do, first (as zpool status does)
        console.print(f"status: {s['status']}", markup=False)
    for action in s.get("actions", []):
        console.print(f"action: {action}", markup=False)
    disk_rows = []
    for d in s["disks"]:
        errors = d["errors"]
        disk_rows.append((
            str(d["id"]), d["path"], d["media"], format_size(d["size"]),
            format_size(d["used_bytes"]), format_size(d["free_bytes"]), d["state"],
            f"{errors.get('read', 0)}/{errors.get('write', 0)}/{errors.get('checksum', 0)}",
        ))
    console.print(table(("id", "path", "media", "size", "used", "free", "state",
                         "errors r/w/csum"), disk_rows, title="disks"))
    for d in s["disks"]:
        if d["state"] != "online" and d.get("state_reason"):
            since = d.get("state_since") or 0
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
            console.print(f"disk {d['id']} {d['state']} since {when}: {d['state_reason']}")
    lease_line = describe_lease(s.get("lease"))
    if lease_line:
        console.print(lease_line)
    metadata = s.get("metadata") or {}
    for problem in (metadata.get("error"), metadata.get("warning")):
        if problem:
            console.print(f"metadata: {problem}")
    rebuild = s.get("rebuild")
    if rebuild and rebuild.get("state") == "running":
        eta = rebuild.get("eta_seconds")
        console.print(
            f"{rebuild['reason']}: {rebuild['percent']:.0f}% ({rebuild['done']}/"
            f"{rebuild['total']} extents), {format_size(int(rebuild['bytes_per_second']))}/s"
            + (f", about {eta:.0f}s left" if eta is not None else "")
            + (f", limited to {format_size(rebuild['rate_limit'])}/s"
               if rebuild.get("rate_limit") else "")
        )
    scrub = s.get("scrub")
    if scrub and scrub.get("state") not in (None, "idle"):
        report = scrub["report"]
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(scrub["started"]))
        console.print(
            f"last scrub: {scrub['state']} ({when}, {scrub['percent']:.0f}%): "
            f"{report['checksum_errors']} checksum errors, {report['mismatches']} mismatches, "
            f"{report['repaired_blocks']} blocks repaired, "
            f"{len(report['unrecoverable'])} unrecoverable ranges"
        )
    if s["volumes"]:
        console.print(table(
            ("name", "size", "resiliency", "provisioning", "allocated", "footprint", "state"),
            [(v["name"], format_size(v["size"]), v["resiliency"], v["provisioning"],
              format_size(v["allocated"]), format_size(v["footprint"]), v["state"])
             for v in s["volumes"]],
            title="volumes"))
    by_media = s.get("usable_by_media") or {}
    media = sorted(by_media)
    console.print(table(
        ("resiliency", "fits", *(f"fits ({m})" for m in media)),
        [(kind, fits(size), *(fits(by_media[m].get(kind)) for m in media))
         for kind, size in s["usable"].items()],
        title="fits in free space"))


def fits(size: int | None) -> str:
    return format_size(size) if size is not None else "too few disks"


def describe_lease(lease: dict[str, Any] | None) -> str:
    """The writer lease in one line (README "One writer per pool")."""
    if not lease:
        return ""
    state = lease.get("state")
    if state == "held":
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lease.get("time") or 0))
        running = " (running)" if lease.get("running") else ""
        return (f"writer lease: held by host {lease.get('host')}, pid {lease.get('pid')}"
                f"{running}, heartbeat {lease.get('counter')} at {when}")
    if state == "lost":
        return f"writer lease: LOST: {lease.get('reason')}"
    damaged = lease.get("damaged") or []
    extra = f"; unreadable on disks {damaged}" if damaged else ""
    return f"writer lease: {'released' if state == 'released' else 'none'}{extra}"


def cmd_list(args: argparse.Namespace) -> int:
    registry = registry_of(args)
    rows = []
    for name, entry in sorted(registry.pools().items()):
        mount = registry.mount_info(name)
        rows.append({"name": name, "uuid": entry.uuid, "disks": entry.disks,
                     "mountpoint": mount.mountpoint if mount else None})

    def human(data: list[dict[str, Any]]) -> None:
        if not data:
            console.print("no pools (create one with `blockspace pool create`)")
            return
        console.print(table(("name", "uuid", "disks", "mounted at"),
                            [(r["name"], r["uuid"], str(len(r["disks"])), r["mountpoint"] or "-")
                             for r in data]))

    emit(args, rows, human)
    return OK


def cmd_import(args: argparse.Namespace) -> int:
    registry = registry_of(args)
    skipped: list[str] = []
    if args.directory is not None:
        if len(args.disks) > 1:
            raise UsageError("blockspace pool import: error: with -d DIR, give at most one "
                             "pool name or uuid, not disks")
        pools, skipped = offline.scan_directory(args.directory)
        found = offline.pick_found_pool(pools, args.disks[0] if args.disks else None,
                                        args.directory)
    elif not args.disks:
        raise UsageError("blockspace pool import: error: give the pool's disks, or -d DIR")
    else:
        found = offline.find_pool(args.disks)
    name = args.name or found.label_name
    validate_name("pool", name)
    existing = registry.pools().get(name)
    if existing is not None and existing.uuid != found.uuid:
        raise InvalidInput(f"another pool is registered as {name!r}; import with --name NEW")
    if registry.mount_info(name) is not None:
        raise InvalidInput(f"pool {name!r} is mounted; unmount it before importing")
    status = trio.run(offline.check_found_pool, found, name)  # one that does not open: refused
    status["name"] = name
    registry.add(PoolEntry(name, found.uuid, found.paths))
    if args.directory is not None:
        status["skipped"] = skipped

    def human(s: dict[str, Any]) -> None:
        console.print(f"imported pool [bold]{name}[/] ({found.uuid}) with "
                      f"{len(found.paths)} disks, health {s['health']}")
        if skipped and args.verbose:
            console.print("skipped: " + "; ".join(skipped), markup=False)

    emit(args, status, human)
    return OK


def cmd_export(args: argparse.Namespace) -> int:
    registry = registry_of(args)
    registry.get(args.name)
    if registry.mount_info(args.name) is not None:
        raise InvalidInput(f"pool {args.name!r} is mounted; unmount it first")
    registry.remove(args.name)
    emit(args, {"name": args.name}, lambda d: console.print(
        f"pool {d['name']} forgotten (its disks are untouched; `pool import` brings it back)"))
    return OK


def add_commands(commands: Any, common: Parser) -> None:
    pool = commands.add_parser("pool", help="create and inspect pools").add_subparsers(
        dest="pool_command", required=True, parser_class=Parser)
    p = pool.add_parser("create", parents=[common], help="make a pool of disks")
    p.add_argument("name")
    p.add_argument("disks", nargs="+", metavar="DISK", help="image files or block devices")
    p.add_argument("--slab-size", default=format_size(DEFAULT_SLAB_SIZE),
                   help="extent size on each disk (power of two, default 64M)")
    p.add_argument("--metadata-size", default=None,
                   help="size of each of the two metadata slots per disk (default: 4M, or what "
                        "the pool's capacity needs if more; a smaller size than that is refused)")
    p.add_argument("--media", choices=["ssd", "hdd"],
                   help="media class of the disks (default: the kernel's rotational flag "
                        "for block devices, hdd for image files)")
    p.add_argument("--force", action="store_true",
                   help="overwrite disks that already carry a Blockspace label")
    p.set_defaults(func=cmd_create)
    p = pool.add_parser("status", parents=[common], help="disks, volumes and free space")
    p.add_argument("name")
    p.set_defaults(func=cmd_status)
    p = pool.add_parser("list", parents=[common], help="registered pools")
    p.set_defaults(func=cmd_list)
    p = pool.add_parser("import", parents=[common], help="register a pool found on disks",
                        description="Register the pool whose member disks are given, or, "
                                    "with -d DIR, the pool found among the files and block "
                                    "devices in DIR (others are skipped; name the pool when "
                                    "DIR holds several).")
    p.add_argument("disks", nargs="*", metavar="DISK|POOL")
    p.add_argument("-d", "--directory", metavar="DIR",
                   help="scan DIR for member disks, skipping everything else")
    p.add_argument("--name", help="register under this name instead of the labelled one")
    p.set_defaults(func=cmd_import)
    p = pool.add_parser("export", parents=[common], help="forget a pool (disks untouched)")
    p.add_argument("name")
    p.set_defaults(func=cmd_export)
    disk.add_pool_commands(pool, common)
    events.add_pool_commands(pool, common)
