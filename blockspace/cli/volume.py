"""`blockspace volume create|list|delete|grow`: through the daemon while the pool is mounted,
else on the disks (blockspace/admin/offline.py)."""

import argparse
from typing import Any

import trio

from blockspace.admin import offline
from blockspace.cli.common import OK, Parser, UsageError, lease_options, pool_socket, volume_size
from blockspace.cli.events import record_event
from blockspace.cli.output import console, emit, table
from blockspace.cli.pool import status_of
from blockspace.cli.tiers import add_volume_options, create_fields
from blockspace.errors import InvalidInput
from blockspace.geometry.resiliency_names import RESILIENCY_NAMES
from blockspace.ondisk.label import validate_name
from blockspace.service import control
from blockspace.units import format_size, parse_size


def change(args: argparse.Namespace, op: str, **fields: Any) -> None:
    """Run a volume change through the daemon if the pool is mounted, else offline."""
    registry, socket_path = pool_socket(args)
    if socket_path is not None:
        control.request(socket_path, op, **fields)
    else:
        trio.run(offline.change_volume, registry, args.pool, op, fields, lease_options(args))
        # The daemon logs its own changes; offline, the command does.
        record_event(registry, args.pool, op, volume=fields["name"], size=fields.get("size"))


def find(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Volume `name`'s entry in the status of pool `args.pool`."""
    for volume in status_of(args, args.pool)["volumes"]:
        if volume["name"] == name:
            return dict(volume)
    raise InvalidInput(f"no volume {name!r} in pool {args.pool!r}")


# Every output names a layout "mirror-2" or "parity-1": the same names are accepted here.
def resiliency_fields(args: argparse.Namespace) -> dict[str, Any]:
    """--resiliency (a kind, or a kind with its count as `pool status` prints it) with
    --copies and --parity: the kind and counts for the request, refusing a contradiction."""
    kind, copies, parity = RESILIENCY_NAMES[args.resiliency or "mirror"]
    for option, named, given in (("--copies", copies, args.copies),
                                 ("--parity", parity, args.parity)):
        if named is not None and given is not None and given != named:
            raise UsageError(f"blockspace volume create: error: --resiliency "
                             f"{args.resiliency} contradicts {option} {given}")
    return {"resiliency": kind, "copies": args.copies if copies is None else copies,
            "parity": args.parity if parity is None else parity}


def cmd_create(args: argparse.Namespace) -> int:
    validate_name("volume", args.name)
    interleave = parse_size(args.interleave) if args.interleave else None
    if args.tier:
        change(args, "volume_create", name=args.name, interleave=interleave,
               provisioning=args.provisioning, **create_fields(args))
    else:
        if args.size is None:
            raise UsageError("blockspace volume create: error: the following arguments are "
                             "required: --size (or, for a tiered volume, --tier ssd:... and "
                             "--tier hdd:...)")
        size = volume_size(args.size, "--size")
        change(
            args, "volume_create", name=args.name, size=size, **resiliency_fields(args),
            columns=args.columns, interleave=interleave, provisioning=args.provisioning,
        )
    volume = find(args, args.name)
    emit(args, volume, lambda v: console.print(
        f"created volume [bold]{v['name']}[/]: {format_size(v['size'])} {v['resiliency']}, "
        f"{v['provisioning']}"))
    return OK


def cmd_list(args: argparse.Namespace) -> int:
    volumes = status_of(args, args.pool)["volumes"]

    def human(data: list[dict[str, Any]]) -> None:
        console.print(table(
            ("name", "size", "resiliency", "provisioning", "allocated", "state"),
            [(v["name"], format_size(v["size"]), v["resiliency"], v["provisioning"],
              format_size(v["allocated"]), v["state"]) for v in data]))

    emit(args, volumes, human)
    return OK


def cmd_delete(args: argparse.Namespace) -> int:
    find(args, args.name)
    change(args, "volume_delete", name=args.name)
    emit(args, {"name": args.name, "deleted": True},
         lambda d: console.print(f"deleted volume {d['name']}"))
    return OK


def cmd_grow(args: argparse.Namespace) -> int:
    size = volume_size(args.size, "--size")
    change(args, "volume_grow", name=args.name, size=size)
    volume = find(args, args.name)
    emit(args, volume, lambda v: console.print(
        f"volume {v['name']} is now {format_size(v['size'])} "
        "(a loop device on it sees the new size after `losetup -c`)"))
    return OK


def cmd_show(args: argparse.Namespace) -> int:
    registry, socket_path = pool_socket(args)
    if socket_path is not None:
        shown = control.request(socket_path, "volume_show", name=args.name, map=args.map)
    else:
        shown = trio.run(offline.volume_show, registry, args.pool, args.name, args.map)
    emit(args, shown, print_placement)
    return OK


def print_placement(v: dict[str, Any]) -> None:
    states = ", ".join(f"{n} {s}" for s, n in v["extent_states"].items() if n)
    console.print(
        f"volume [bold]{v['name']}[/] in pool {v['pool']}: {format_size(v['size'])}, "
        f"{v['resiliency']}, {v['provisioning']}\n"
        f"columns {v['columns']}, width {v['width']} extents per slab (tolerates "
        f"{v['tolerance']} lost), interleave {format_size(v['interleave'])}, "
        f"slab {format_size(v['slab_data_size'])} of data\n"
        f"allocated {format_size(v['allocated'])} in {v['slabs']} of {v['slabs_full']} slabs "
        f"({format_size(v['footprint'])} on disks); extents: {states or 'none'}",
        highlight=False)
    if v["tiers"]:
        console.print(f"tiered: ssd tier {v['tiers']['ssd']}, hdd tier {v['tiers']['hdd']} "
                      "(`volume show` each for its placement)", highlight=False)
    console.print(table(("disk", "path", "state", "slabs"),
                        [(str(d["id"]), str(d["path"]), d["state"], str(d["slabs"]))
                         for d in v["disks"]]))
    if "map" in v:
        console.print(table(
            ("slab", "volume offset", "extents (disk:extent state)"),
            [(str(s["slab"]), format_size(s["offset"]),
              "  ".join(f"{e['disk']}:{e['extent']} {e['state']}" for e in s["extents"]))
             for s in v["map"]]))


def add_commands(commands: Any, common: Parser) -> None:
    volume = commands.add_parser("volume", help="manage volumes").add_subparsers(
        dest="volume_command", required=True, parser_class=Parser)
    p = volume.add_parser("create", parents=[common], help="add a volume to a pool")
    p.add_argument("pool")
    p.add_argument("name")
    p.add_argument("--size", help="e.g. 20G (required unless tiered)")
    p.add_argument("--resiliency", choices=list(RESILIENCY_NAMES),
                   help="default mirror (mirror-2); mirror-3, parity-1, parity-2 name the count")
    p.add_argument("--copies", type=int, help="mirror: 2 (default) or 3")
    p.add_argument("--parity", type=int, help="parity: 1 (default) or 2")
    p.add_argument("--columns", type=int, help="data columns per slab")
    p.add_argument("--interleave", help="stripe unit (default 64K)")
    p.add_argument("--provisioning", choices=["thin", "fixed"], default="thin")
    add_volume_options(p)
    p.set_defaults(func=cmd_create)
    p = volume.add_parser("list", parents=[common], help="volumes of a pool")
    p.add_argument("pool")
    p.set_defaults(func=cmd_list)
    p = volume.add_parser("delete", parents=[common], help="delete a volume and its data")
    p.add_argument("pool")
    p.add_argument("name")
    p.set_defaults(func=cmd_delete)
    p = volume.add_parser("grow", parents=[common], help="make a volume larger")
    p.add_argument("pool")
    p.add_argument("name")
    p.add_argument("--size", required=True, help="the new size")
    p.set_defaults(func=cmd_grow)
    p = volume.add_parser("show", parents=[common],
                          help="a volume's layout and placement (with --map: every slab)")
    p.add_argument("pool")
    p.add_argument("name")
    p.add_argument("--map", action="store_true",
                   help="each slab's extents (disk:extent) and their state")
    p.set_defaults(func=cmd_show)
