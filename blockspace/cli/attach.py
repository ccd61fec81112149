"""`blockspace attach POOL VOLUME`: the volume file as a block device (losetup with direct
I/O), with the stable name /dev/blockspace/POOL/VOLUME; `blockspace detach POOL VOLUME` (or
the device, or its stable name) undoes both. The pool must be mounted."""

import argparse
import os
from typing import Any

from blockspace.admin import loops
from blockspace.admin.registry import MountEntry, Registry
from blockspace.cli.common import OK, NothingToDo, NotMounted, Parser, registry_of
from blockspace.cli.output import console, emit
from blockspace.errors import InvalidInput


def _mounted(registry: Registry, pool: str) -> MountEntry:
    registry.get(pool)
    mount = registry.mount_info(pool)
    if mount is None:
        raise NotMounted(f"pool {pool!r} is not mounted: `blockspace mount {pool} DIR` first")
    return mount


def _volume_file(mount: MountEntry, volume: str) -> str:
    if not volume or "/" in volume or volume in (".", ".."):
        raise InvalidInput(f"{volume!r} is not a volume name")
    path = os.path.join(mount.mountpoint, volume)
    if not os.path.isfile(path):
        raise InvalidInput(f"pool {mount.pool!r} serves no volume {volume!r} "
                           f"(see `blockspace volume list {mount.pool}`)")
    return path


def cmd_attach(args: argparse.Namespace) -> int:
    mount = _mounted(registry_of(args), args.pool)
    path = _volume_file(mount, args.volume)
    existing = loops.loops_of(path)
    read_only = bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    device = existing[0] if existing else loops.attach(path, read_only)
    name = loops.link(args.pool, args.volume, device)
    info = {"pool": args.pool, "volume": args.volume, "file": path, "device": device,
            "link": str(name), "new": not existing, "read_only": read_only}
    emit(args, info, lambda i: console.print(
        i["device"] if i["new"] else f"{i['device']} (already attached)"))
    return OK


def _target(registry: Registry, args: argparse.Namespace) -> tuple[str, str]:
    """(pool, volume) that `detach` names: POOL VOLUME, a stable name, or /dev/loopN."""
    if args.volume is not None:
        return args.target, args.volume
    named = loops.resolve_name(args.target)
    if named is not None:
        return named
    if not args.target.startswith("/dev/"):
        raise InvalidInput("detach takes POOL VOLUME, /dev/blockspace/POOL/VOLUME or /dev/loopN")
    backing = loops.backing_file(os.path.realpath(args.target))
    if backing is None:
        raise InvalidInput(f"{args.target} is not an attached loop device")
    for mount in registry.mounts():
        if os.path.dirname(backing) == mount.mountpoint:
            return mount.pool, os.path.basename(backing)
    raise InvalidInput(f"{args.target} is not on a Blockspace volume (its file: {backing})")


def cmd_detach(args: argparse.Namespace) -> int:
    registry = registry_of(args)
    pool, volume = _target(registry, args)
    registry.get(pool)
    mount = registry.mount_info(pool)
    devices = loops.loops_of(os.path.join(mount.mountpoint, volume)) if mount else []
    if not devices:
        link = loops.unlink(pool, volume)  # a name left by a loop detached by hand
        raise NothingToDo(f"volume {volume!r} of pool {pool!r} is not attached"
                          + (f" (removed the stale {link})" if link else ""))
    for device in devices:  # refuse before detaching any
        loops.check_not_in_use(device)
    for device in devices:
        loops.detach(device)
    link = loops.unlink(pool, volume)
    info: dict[str, Any] = {"pool": pool, "volume": volume, "device": devices[0],
                            "devices": devices, "link": str(link) if link else None}
    emit(args, info, lambda i: console.print(f"detached {', '.join(i['devices'])}"))
    return OK


def add_commands(commands: Any, common: Parser) -> None:
    p = commands.add_parser("attach", parents=[common],
                            help="a mounted volume as a loop device, /dev/blockspace/POOL/VOLUME")
    p.add_argument("pool")
    p.add_argument("volume")
    p.set_defaults(func=cmd_attach)
    p = commands.add_parser("detach", parents=[common], help="undo attach")
    p.add_argument("target", metavar="POOL|DEVICE",
                   help="pool name (with VOLUME), /dev/loopN or /dev/blockspace/POOL/VOLUME")
    p.add_argument("volume", nargs="?")
    p.set_defaults(func=cmd_detach)


