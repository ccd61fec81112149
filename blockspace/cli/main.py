"""`blockspace`: the command line. It parses, validates, calls the library (or the daemon,
when the pool is mounted) and prints a table or JSON. User errors are one line on stderr
and a non-zero exit code; nothing is written before validation passes."""

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import trio
from rich.console import Console
from rich.table import Table

from blockspace.admin.pools import (
    check_new_disks,
    disk_identity,
    opened_disks,
    opened_pool,
    pool_status,
)
from blockspace.admin.registry import PoolEntry, Registry, state_dir
from blockspace.cli.faults import add_fault_commands
from blockspace.cli.tiers import (
    add_tier_commands,
    add_volume_options,
    annotate_status,
    create_fields,
    offline_volume_op,
)
from blockspace.disks.devices import FileDevice, probe
from blockspace.errors import BlockspaceError, FormatError, InvalidInput
from blockspace.geometry.layouts import default_layout
from blockspace.ondisk.label import validate_name
from blockspace.ondisk.metadata import MAX_VOLUME_SIZE
from blockspace.pool.pool import (
    DEFAULT_IO_TIMEOUT,
    DEFAULT_META_SLOT_SIZE,
    DEFAULT_SLAB_SIZE,
    Pool,
    read_label,
)
from blockspace.service import control
from blockspace.units import format_size, parse_size

log = logging.getLogger("blockspace")
# Piped output (logs, CI) gets wide tables rather than truncated paths.
console = Console(width=None if sys.stdout.isatty() else 160)


class UsageError(InvalidInput):
    pass


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a one-line InvalidInput like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message}")


# ---- helpers ------------------------------------------------------------------------


def _registry(args: argparse.Namespace) -> Registry:
    return Registry(state_dir(args.state_dir))


def _emit(args: argparse.Namespace, data: Any, human: Callable[[Any], None]) -> None:
    try:
        if args.json:
            print(json.dumps(data, indent=2, sort_keys=True))
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


def _mounted_socket(registry: Registry, pool: str) -> Path | None:
    info = registry.mount_info(pool)
    return Path(info.socket) if info is not None else None


def _size(text: str, what: str) -> int:
    size = parse_size(text)
    if size <= 0:
        raise InvalidInput(f"{what} must be larger than zero")
    if size > MAX_VOLUME_SIZE:
        raise InvalidInput(
            f"{what} {text} is too large: a volume holds at most {format_size(MAX_VOLUME_SIZE)}"
        )
    return size


# ---- pool commands ------------------------------------------------------------------


def cmd_pool_create(args: argparse.Namespace) -> int:
    registry = _registry(args)
    validate_name("pool", args.name)
    if args.name in registry.pools():
        raise InvalidInput(f"a pool named {args.name!r} already exists")
    slab_size = parse_size(args.slab_size)
    meta_slot_size = parse_size(args.metadata_size)
    disks = check_new_disks(
        args.disks,
        media=args.media,
        slab_size=slab_size,
        meta_slot_size=meta_slot_size,
        force=args.force,
    )

    # Absolute paths: the metadata keeps them as the hint shown for a missing disk.
    paths = [os.path.abspath(d.path) for d in disks]

    async def create() -> Pool:
        devices = [FileDevice(path) for path in paths]
        try:
            return await Pool.create(
                args.name,
                devices,
                media=[d.media for d in disks],
                slab_size=slab_size,
                meta_slot_size=meta_slot_size,
            )
        finally:
            for device in devices:
                device.close()

    pool = trio.run(create)
    registry.add(PoolEntry(pool.name, pool.uuid, paths))
    status = pool_status(pool)
    _emit(args, status, lambda s: console.print(
        f"created pool [bold]{s['name']}[/] ({s['uuid']}) on {len(s['disks'])} disks, "
        f"{format_size(s['raw_size'])} raw"))
    return 0


def _status(args: argparse.Namespace, name: str) -> dict[str, Any]:
    registry = _registry(args)
    registry.get(name)
    socket_path = _mounted_socket(registry, name)
    if socket_path is not None:
        status = dict(control.request(socket_path, "status"))
    else:

        async def offline() -> dict[str, Any]:
            async with opened_pool(registry, name) as pool:
                scrub = registry.scrub_state(name)
                if scrub is not None:
                    scrub.pop("cursor", None)
                from blockspace.tiering.admin import overview

                return pool_status(pool, scrub=scrub) | {"tiers": overview(pool)}

        status = trio.run(offline)
    annotate_status(status)
    # The name the user addresses the pool by; `pool import --name` may differ from the labels'.
    status["name"] = name
    return status


def cmd_pool_status(args: argparse.Namespace) -> int:
    status = _status(args, args.name)
    _emit(args, status, _print_status)
    return 0 if status["health"] != "failed" else 3


def _print_status(s: dict[str, Any]) -> None:
    mounted = f"mounted at {s['mountpoint']}" if s["mountpoint"] else "not mounted"
    console.print(
        f"pool [bold]{s['name']}[/]  {s['uuid']}  health: [bold]{s['health']}[/]  {mounted}\n"
        f"slab size {format_size(s['slab_size'])}, raw {format_size(s['raw_size'])}, "
        f"free {format_size(s['raw_free'])}, metadata generation {s['generation']}"
    )
    disks = Table(title="disks", title_justify="left")
    for column in ("id", "path", "media", "size", "used", "free", "state", "errors r/w/csum"):
        disks.add_column(column)
    for d in s["disks"]:
        errors = d["errors"]
        disks.add_row(
            str(d["id"]), d["path"], d["media"], format_size(d["size"]),
            format_size(d["used_bytes"]), format_size(d["free_bytes"]), d["state"],
            f"{errors.get('read', 0)}/{errors.get('write', 0)}/{errors.get('checksum', 0)}",
        )
    console.print(disks)
    for d in s["disks"]:
        if d["state"] != "online" and d.get("state_reason"):
            since = d.get("state_since") or 0
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since else "?"
            console.print(f"disk {d['id']} {d['state']} since {when}: {d['state_reason']}")
    rebuild = s.get("rebuild")
    if rebuild and rebuild.get("state") == "running":
        eta = rebuild.get("eta_seconds")
        console.print(
            f"{rebuild['reason']}: {rebuild['percent']:.0f}% ({rebuild['done']}/"
            f"{rebuild['total']} extents), {format_size(int(rebuild['bytes_per_second']))}/s"
            + (f", about {eta:.0f}s left" if eta is not None else "")
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
        volumes = Table(title="volumes", title_justify="left")
        for column in ("name", "size", "resiliency", "provisioning", "allocated", "footprint",
                       "state"):
            volumes.add_column(column)
        for v in s["volumes"]:
            volumes.add_row(
                v["name"], format_size(v["size"]), v["resiliency"], v["provisioning"],
                format_size(v["allocated"]), format_size(v["footprint"]), v["state"],
            )
        console.print(volumes)
    usable = Table(title="fits in free space", title_justify="left")
    usable.add_column("resiliency")
    usable.add_column("fits")
    for kind, size in s["usable"].items():
        usable.add_row(kind, format_size(size) if size is not None else "too few disks")
    console.print(usable)


def cmd_pool_list(args: argparse.Namespace) -> int:
    registry = _registry(args)
    rows = []
    for name, entry in sorted(registry.pools().items()):
        mount = registry.mount_info(name)
        rows.append(
            {
                "name": name,
                "uuid": entry.uuid,
                "disks": entry.disks,
                "mountpoint": mount.mountpoint if mount else None,
            }
        )

    def human(data: list[dict[str, Any]]) -> None:
        if not data:
            console.print("no pools (create one with `blockspace pool create`)")
            return
        table = Table()
        for column in ("name", "uuid", "disks", "mounted at"):
            table.add_column(column)
        for row in data:
            table.add_row(row["name"], row["uuid"], str(len(row["disks"])),
                          row["mountpoint"] or "-")
        console.print(table)

    _emit(args, rows, human)
    return 0


def cmd_pool_import(args: argparse.Namespace) -> int:
    registry = _registry(args)
    found: dict[str, tuple[str, list[str]]] = {}
    seen: dict[tuple[int, int], str] = {}
    for path in args.disks:
        probe(path)
        identity = disk_identity(path)
        if identity in seen:
            raise InvalidInput(f"{path} is given twice (same disk as {seen[identity]})")
        seen[identity] = path
        device = FileDevice(path, writable=False, workers=1)
        try:
            label = read_label(device)
        except FormatError as error:
            raise FormatError(
                f"{path}: {error}; leave this disk out to import the pool without it"
            ) from None
        finally:
            device.close()
        if label is None:
            raise InvalidInput(f"{path} is not a Blockspace disk")
        name, paths = found.setdefault(label.pool_uuid, (label.pool_name, []))
        paths.append(os.path.abspath(path))
    if len(found) > 1:
        names = ", ".join(f"{n} ({u})" for u, (n, _) in found.items())
        raise InvalidInput(f"the disks belong to several pools: {names}; import one at a time")
    pool_uuid, (label_name, paths) = next(iter(found.items()))
    name = args.name or label_name
    validate_name("pool", name)
    existing = registry.pools().get(name)
    if existing is not None and existing.uuid != pool_uuid:
        raise InvalidInput(f"another pool is registered as {name!r}; import with --name NEW")
    if registry.mount_info(name) is not None:
        raise InvalidInput(f"pool {name!r} is mounted; unmount it before importing")

    async def check() -> dict[str, Any]:
        async with opened_disks(paths, pool_uuid, name) as pool:
            return pool_status(pool)

    status = trio.run(check)  # a pool that does not open is not registered
    status["name"] = name
    registry.add(PoolEntry(name, pool_uuid, paths))
    _emit(args, status, lambda s: console.print(
        f"imported pool [bold]{name}[/] ({pool_uuid}) with {len(paths)} disks, "
        f"health {s['health']}"))
    return 0


def cmd_pool_export(args: argparse.Namespace) -> int:
    registry = _registry(args)
    registry.get(args.name)
    if registry.mount_info(args.name) is not None:
        raise InvalidInput(f"pool {args.name!r} is mounted; unmount it first")
    registry.remove(args.name)
    _emit(args, {"name": args.name}, lambda d: console.print(
        f"pool {d['name']} forgotten (its disks are untouched; `pool import` brings it back)"))
    return 0


# ---- volume commands ----------------------------------------------------------------


def _volume_request(args: argparse.Namespace, op: str, **fields: Any) -> Any:
    """Run a volume change through the daemon if the pool is mounted, else offline."""
    registry = _registry(args)
    registry.get(args.pool)
    socket_path = _mounted_socket(registry, args.pool)
    if socket_path is not None:
        return control.request(socket_path, op, **fields)

    async def offline() -> Any:
        async with opened_pool(registry, args.pool) as pool:
            if await offline_volume_op(pool, op, fields):
                pass  # tiered volumes (and deletes, which must not take a tier alone)
            elif op == "volume_create":
                spec = default_layout(
                    fields["resiliency"], len(pool.usable_disk_ids()),
                    copies=fields["copies"], parity=fields["parity"],
                    columns=fields["columns"], interleave=fields["interleave"],
                )
                await pool.create_volume(fields["name"], fields["size"], spec,
                                         fields["provisioning"])
            elif op == "volume_delete":
                await pool.delete_volume(fields["name"])
            elif op == "volume_grow":
                await pool.grow_volume(fields["name"], fields["size"])
            return {"name": fields["name"]}

    return trio.run(offline)


def cmd_volume_create(args: argparse.Namespace) -> int:
    validate_name("volume", args.name)
    interleave = parse_size(args.interleave) if args.interleave else None
    if args.tier:
        _volume_request(args, "volume_create", name=args.name, interleave=interleave,
                        provisioning=args.provisioning, **create_fields(args))
    else:
        if args.size is None:
            raise UsageError("blockspace volume create: error: the following arguments are "
                             "required: --size (or, for a tiered volume, --tier ssd:... and "
                             "--tier hdd:...)")
        size = _size(args.size, "--size")
        _volume_request(
            args, "volume_create", name=args.name, size=size,
            resiliency=args.resiliency or "mirror", copies=args.copies, parity=args.parity,
            columns=args.columns, interleave=interleave, provisioning=args.provisioning,
        )
    volume = _find_volume(args, args.name)
    _emit(args, volume, lambda v: console.print(
        f"created volume [bold]{v['name']}[/]: {format_size(v['size'])} {v['resiliency']}, "
        f"{v['provisioning']}"))
    return 0


def _find_volume(args: argparse.Namespace, name: str) -> dict[str, Any]:
    for volume in _status(args, args.pool)["volumes"]:
        if volume["name"] == name:
            return dict(volume)
    raise InvalidInput(f"no volume {name!r} in pool {args.pool!r}")


def cmd_volume_list(args: argparse.Namespace) -> int:
    volumes = _status(args, args.pool)["volumes"]

    def human(data: list[dict[str, Any]]) -> None:
        table = Table()
        for column in ("name", "size", "resiliency", "provisioning", "allocated", "state"):
            table.add_column(column)
        for v in data:
            table.add_row(v["name"], format_size(v["size"]), v["resiliency"], v["provisioning"],
                          format_size(v["allocated"]), v["state"])
        console.print(table)

    _emit(args, volumes, human)
    return 0


def cmd_volume_delete(args: argparse.Namespace) -> int:
    _find_volume(args, args.name)
    _volume_request(args, "volume_delete", name=args.name)
    _emit(args, {"name": args.name, "deleted": True},
          lambda d: console.print(f"deleted volume {d['name']}"))
    return 0


def cmd_volume_grow(args: argparse.Namespace) -> int:
    size = _size(args.size, "--size")
    _volume_request(args, "volume_grow", name=args.name, size=size)
    volume = _find_volume(args, args.name)
    _emit(args, volume, lambda v: console.print(
        f"volume {v['name']} is now {format_size(v['size'])} "
        "(a loop device on it sees the new size after `losetup -c`)"))
    return 0


# ---- mount / unmount ----------------------------------------------------------------


def cmd_mount(args: argparse.Namespace) -> int:
    from blockspace.service import daemon

    registry = _registry(args)
    registry.get(args.pool)
    mount = registry.mount_info(args.pool)
    if mount is not None:
        raise InvalidInput(f"pool {args.pool!r} is already mounted at {mount.mountpoint}")
    mountpoint = os.path.abspath(args.mountpoint)
    if not os.path.isdir(mountpoint):
        raise InvalidInput(f"mount point {args.mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise InvalidInput(f"something is already mounted at {args.mountpoint}")
    if not os.path.exists("/dev/fuse"):
        raise BlockspaceError("/dev/fuse is missing (modprobe fuse)")
    registry.ensure()
    log_file = args.log_file or str(registry.log_path(args.pool))
    options = daemon.MountOptions(
        pool=args.pool, mountpoint=mountpoint, uid=args.owner_uid, gid=args.owner_gid,
        allow_other=not args.no_allow_other, log_file=log_file,
        allow_fault_injection=args.allow_fault_injection,
        io_timeout=args.io_timeout or DEFAULT_IO_TIMEOUT,
    )
    if args.foreground:
        daemon.setup_logging(args.log_file, logging.DEBUG if args.verbose else logging.INFO)
        ready_fd = args.ready_fd
        return daemon.run(registry, options, ready_fd)
    read_fd, write_fd = os.pipe()
    command = [sys.executable, "-m", "blockspace", "--state-dir", str(registry.root),
               "mount", "--foreground", "--log-file", log_file, "--ready-fd", str(write_fd),
               "--owner", f"{args.owner_uid}:{args.owner_gid}", args.pool, mountpoint]
    if args.no_allow_other:
        command.insert(-2, "--no-allow-other")
    if args.allow_fault_injection:
        command.insert(-2, "--allow-fault-injection")
    if args.io_timeout is not None:
        command.insert(-2, f"--io-timeout={args.io_timeout}")
    # posix_spawn, not Popen: the daemon outlives this process, and a Popen object left
    # running would warn when it is collected.
    os.set_inheritable(write_fd, True)
    pid = os.posix_spawn(
        sys.executable, command, os.environ, setsid=True,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
            (os.POSIX_SPAWN_OPEN, 2, log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600),
        ],
    )
    os.close(write_fd)
    with os.fdopen(read_fd) as ready:
        answer = ready.readline().strip()
    if answer != "ok":
        os.waitpid(pid, 0)
        message = answer.removeprefix("error: ") or f"the daemon exited (see {log_file})"
        raise BlockspaceError(f"mount failed: {message}")
    info = {"pool": args.pool, "mountpoint": mountpoint, "pid": pid, "log": log_file}
    _emit(args, info, lambda i: console.print(
        f"pool {i['pool']} mounted at {i['mountpoint']} (daemon pid {i['pid']}, log {i['log']})"))
    return 0


def cmd_unmount(args: argparse.Namespace) -> int:
    registry = _registry(args)
    target = os.path.abspath(args.target)
    mount = None
    for entry in registry.mounts():
        if entry.pool == args.target or entry.mountpoint == target:
            mount = entry
    if mount is None:
        raise InvalidInput(f"{args.target} is not a mounted Blockspace pool or mount point")
    control.request(Path(mount.socket), "unmount", force=args.force)
    deadline = time.monotonic() + args.timeout
    while registry.mount_info(mount.pool) is not None:
        if time.monotonic() > deadline:
            raise BlockspaceError(f"daemon {mount.pid} did not stop within {args.timeout}s")
        time.sleep(0.05)
    _emit(args, {"pool": mount.pool, "mountpoint": mount.mountpoint},
          lambda i: console.print(f"pool {i['pool']} unmounted from {i['mountpoint']}"))
    return 0


# ---- disks --------------------------------------------------------------------------


def cmd_disk(args: argparse.Namespace) -> int:
    """disk add / retire / remove / replace and pool repair: through the daemon when the
    pool is mounted, else in this process (which then waits for the rebuild)."""
    registry = _registry(args)
    registry.get(args.pool)
    op, fields = _disk_request(args)
    socket_path = _mounted_socket(registry, args.pool)
    if socket_path is not None:
        result = control.request(socket_path, op, **fields)
        if args.wait and op != "disk_add":
            result = _wait_for_rebuild(args, socket_path)
    else:
        result = _disk_offline(args, registry, op, fields)
    _emit(args, result, _print_disk_result)
    failed = isinstance(result, dict) and result.get("state") == "failed"
    return 1 if failed else 0


def _disk_request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    rate = parse_size(args.rate) if getattr(args, "rate", None) else 0
    command = args.disk_command if args.command == "disk" else args.pool_command
    if command == "add":
        paths = [os.path.abspath(p) for p in args.disks]
        return "disk_add", {"paths": paths, "media": args.media, "force": args.force}
    if command in ("retire", "remove"):
        return f"disk_{command}", {"disk": args.disk, "rate": rate}
    if command == "online":
        path = os.path.abspath(args.path) if args.path else None
        return "disk_online", {"disks": args.disks, "device": path}
    if command == "replace":
        return "disk_replace", {"old": args.old, "new": os.path.abspath(args.new),
                                "media": args.media, "force": args.force, "rate": rate}
    return f"pool_{command}", {"rate": rate}


def _disk_offline(
    args: argparse.Namespace, registry: Registry, op: str, fields: dict[str, Any]
) -> dict[str, Any]:
    from blockspace.admin.manage import DiskManager
    from blockspace.volume.volume import Volume

    async def run() -> dict[str, Any]:
        async with opened_pool(registry, args.pool) as pool, trio.open_nursery() as nursery:
            volumes = {v.name: Volume(pool, v) for v in pool.metadata.volumes}
            manager = DiskManager(pool, lambda: volumes, registry, args.pool, nursery)
            manager.rate_limit = int(fields.get("rate") or 0)
            if op == "disk_add":
                return {"added": await manager.add(fields["paths"], fields["media"],
                                                   fields["force"])}
            if op in ("disk_retire", "disk_remove"):
                await manager.retire(fields["disk"], remove=op == "disk_remove")
            elif op == "disk_replace":
                await manager.replace(fields["old"], fields["new"], fields["media"],
                                      fields["force"])
            elif op == "disk_online":
                await manager.online(fields["disks"], fields["device"])
            elif op == "pool_rebalance":
                await manager.rebalance()
            else:
                await manager.repair()
            with _progress_bar(args, "rebuild") as update:
                while not manager.rebuilder.finished.is_set():
                    update(manager.rebuilder.progress.to_dict())
                    with trio.move_on_after(0.5):
                        await manager.rebuilder.finished.wait()
            await pool.flush()
            return manager.rebuilder.progress.to_dict()

    return trio.run(run)


def _wait_for_rebuild(args: argparse.Namespace, socket_path: Path) -> dict[str, Any]:
    with _progress_bar(args, "rebuild") as update:
        while True:
            progress = dict(control.request(socket_path, "rebuild_status"))
            update(progress)
            if progress["state"] != "running":
                return progress
            time.sleep(0.5)


def _print_disk_result(result: dict[str, Any]) -> None:
    if "added" in result:
        console.print(f"added disk(s) {', '.join(str(i) for i in result['added'])}")
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


# ---- scrub --------------------------------------------------------------------------


def cmd_scrub(args: argparse.Namespace) -> int:
    registry = _registry(args)
    registry.get(args.pool)
    socket_path = _mounted_socket(registry, args.pool)
    action = args.action or "start"
    if socket_path is None:
        if action != "start":
            raise InvalidInput(f"pool {args.pool!r} is not mounted: no scrub to {action}")
        progress = _scrub_offline(args, registry)
    else:
        request: dict[str, Any] = {}
        if action == "start":
            request = {"volume": args.volume, "rate": parse_size(args.rate) if args.rate else 0}
        progress = control.request(socket_path, f"scrub_{action}", **request)
        if action == "start" and args.wait:
            progress = _wait_for_scrub(args, socket_path)
    _emit(args, progress, _print_scrub)
    if progress["state"] == "done" and progress["report"]["unrecoverable"]:
        return 3
    return 0


def _scrub_offline(args: argparse.Namespace, registry: Registry) -> dict[str, Any]:
    """Scrub an unmounted pool in this process (always waits)."""
    from blockspace.repair.scrub import Scrubber
    from blockspace.volume.volume import Volume

    async def run() -> dict[str, Any]:
        async with opened_pool(registry, args.pool) as pool:
            volumes = {v.name: Volume(pool, v) for v in pool.metadata.volumes}
            if args.volume is not None and args.volume not in volumes:
                raise InvalidInput(f"no volume {args.volume!r} in pool {args.pool!r}")
            scrubber = Scrubber(
                lambda: volumes,
                lambda p: registry.save_scrub_state(args.pool, p.to_state()),
            )
            scrubber.plan(args.volume, parse_size(args.rate) if args.rate else 0)
            with _progress_bar(args) as update:

                async def on_slab() -> None:
                    update(scrubber.progress.to_dict())

                await scrubber.run(on_slab)
                await pool.flush()
            return scrubber.progress.to_dict()

    return trio.run(run)


def _wait_for_scrub(args: argparse.Namespace, socket_path: Path) -> dict[str, Any]:
    with _progress_bar(args) as update:
        while True:
            progress = dict(control.request(socket_path, "scrub_status"))
            update(progress)
            if progress["state"] not in ("running", "paused"):
                return progress
            time.sleep(0.5)


class _progress_bar:
    """A rich progress line (percent, MiB/s, ETA) on stderr, when a person is watching."""

    def __init__(self, args: argparse.Namespace, what: str = "scrub") -> None:
        self.enabled = not args.json and sys.stderr.isatty()
        self.what = what

    def __enter__(self) -> Callable[[dict[str, Any]], None]:
        if not self.enabled:
            return lambda progress: None
        from rich.progress import Progress

        self.progress = Progress(console=Console(stderr=True))
        self.progress.start()
        self.task = self.progress.add_task(self.what, total=100)

        def update(p: dict[str, Any]) -> None:
            speed = format_size(int(p["bytes_per_second"])) + "/s"
            eta = p["eta_seconds"]
            eta_text = f", ETA {eta:.0f}s" if eta is not None else ""
            self.progress.update(self.task, completed=p["percent"],
                                 description=f"{self.what} {p['state']} {speed}{eta_text}")

        return update

    def __exit__(self, *exc: object) -> None:
        if self.enabled:
            self.progress.stop()


def _print_scrub(p: dict[str, Any]) -> None:
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


# ---- parser -------------------------------------------------------------------------


def _owner(text: str) -> tuple[int, int]:
    try:
        uid, _, gid = text.partition(":")
        return int(uid), int(gid or uid)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--owner takes UID[:GID], not {text!r}") from None


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"takes seconds between 0.1 and 3600, not {text!r}")
    return value


def build_parser() -> Parser:
    common = Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")
    common.add_argument("--state-dir", default=argparse.SUPPRESS,
                        help="registry directory (default $BLOCKSPACE_STATE_DIR or "
                             "/var/lib/blockspace)")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)

    parser = Parser(prog="blockspace", parents=[common],
                    description="Pooled storage: mirror and parity volumes served as files.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    pool = commands.add_parser("pool", help="create and inspect pools").add_subparsers(
        dest="pool_command", required=True, parser_class=Parser)
    p = pool.add_parser("create", parents=[common], help="make a pool of disks")
    p.add_argument("name")
    p.add_argument("disks", nargs="+", metavar="DISK", help="image files or block devices")
    p.add_argument("--slab-size", default=format_size(DEFAULT_SLAB_SIZE),
                   help="extent size on each disk (power of two, default 64M)")
    p.add_argument("--metadata-size", default=format_size(DEFAULT_META_SLOT_SIZE),
                   help="size of each of the two metadata slots per disk (default 4M)")
    p.add_argument("--media", choices=["ssd", "hdd"],
                   help="media class of the disks (default: the kernel's rotational flag "
                        "for block devices, hdd for image files)")
    p.add_argument("--force", action="store_true",
                   help="overwrite disks that already carry a Blockspace label")
    p.set_defaults(func=cmd_pool_create)
    p = pool.add_parser("status", parents=[common], help="disks, volumes and free space")
    p.add_argument("name")
    p.set_defaults(func=cmd_pool_status)
    p = pool.add_parser("list", parents=[common], help="registered pools")
    p.set_defaults(func=cmd_pool_list)
    p = pool.add_parser("import", parents=[common], help="register a pool found on disks")
    p.add_argument("disks", nargs="+", metavar="DISK")
    p.add_argument("--name", help="register under this name instead of the labelled one")
    p.set_defaults(func=cmd_pool_import)
    p = pool.add_parser("export", parents=[common], help="forget a pool (disks untouched)")
    p.add_argument("name")
    p.set_defaults(func=cmd_pool_export)

    volume = commands.add_parser("volume", help="manage volumes").add_subparsers(
        dest="volume_command", required=True, parser_class=Parser)
    p = volume.add_parser("create", parents=[common], help="add a volume to a pool")
    p.add_argument("pool")
    p.add_argument("name")
    p.add_argument("--size", help="e.g. 20G (required unless tiered)")
    p.add_argument("--resiliency", choices=["simple", "mirror", "parity"],
                   help="default mirror")
    p.add_argument("--copies", type=int, help="mirror: 2 (default) or 3")
    p.add_argument("--parity", type=int, help="parity: 1 (default) or 2")
    p.add_argument("--columns", type=int, help="data columns per slab")
    p.add_argument("--interleave", help="stripe unit (default 64K)")
    p.add_argument("--provisioning", choices=["thin", "fixed"], default="thin")
    add_volume_options(p)
    p.set_defaults(func=cmd_volume_create)
    p = volume.add_parser("list", parents=[common], help="volumes of a pool")
    p.add_argument("pool")
    p.set_defaults(func=cmd_volume_list)
    p = volume.add_parser("delete", parents=[common], help="delete a volume and its data")
    p.add_argument("pool")
    p.add_argument("name")
    p.set_defaults(func=cmd_volume_delete)
    p = volume.add_parser("grow", parents=[common], help="make a volume larger")
    p.add_argument("pool")
    p.add_argument("name")
    p.add_argument("--size", required=True, help="the new size")
    p.set_defaults(func=cmd_volume_grow)

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

    p = commands.add_parser("mount", parents=[common], help="serve a pool's volumes")
    p.add_argument("pool")
    p.add_argument("mountpoint")
    p.add_argument("--foreground", action="store_true", help="do not detach")
    p.add_argument("--log-file", default="", help="daemon log (default STATE_DIR/log/POOL.log)")
    p.add_argument("--owner", type=_owner, default=(0, 0), metavar="UID[:GID]",
                   help="owner of the volume files (mode 0600; default root)")
    p.add_argument("--no-allow-other", action="store_true",
                   help="only the mounting user may access the files (losetup needs root)")
    p.add_argument("--io-timeout", type=_seconds, metavar="SECONDS",
                   help="fail a disk that does not answer an I/O within this time (default 30)")
    p.add_argument("--allow-fault-injection", action="store_true",
                   help="testing only: let `blockspace fault` make this mount's disks fail")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)
    p = commands.add_parser("unmount", aliases=["umount"], parents=[common],
                            help="stop serving a pool")
    p.add_argument("target", help="mount point or pool name")
    p.add_argument("--force", action="store_true", help="even if a volume is open")
    p.add_argument("--timeout", type=float, default=120.0)
    p.set_defaults(func=cmd_unmount)
    add_fault_commands(commands, common)
    add_tier_commands(commands, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        args.json = getattr(args, "json", False)
        args.state_dir = getattr(args, "state_dir", None)
        args.verbose = getattr(args, "verbose", False)
        if hasattr(args, "owner"):
            args.owner_uid, args.owner_gid = args.owner
        if not args.command == "mount" or not getattr(args, "foreground", False):
            logging.basicConfig(level=logging.DEBUG if args.verbose else logging.ERROR,
                                format="%(levelname)s: %(message)s")
        return int(args.func(args))
    except BlockspaceError as error:
        message = str(error)
        if getattr(error, "__module__", "") and isinstance(error, UsageError):
            print(message, file=sys.stderr)
        else:
            print(f"blockspace: error: {message}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130
