"""`blockspace tier status|optimize|pin|unpin` and `volume create --tier ...`.

While the pool is mounted these talk to its daemon (which owns the heat and the optimizer);
while it is not, status and pins work on the metadata directly (and the heat last saved).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import trio

from blockspace.admin import offline
from blockspace.cli.common import FAILED, OK, NotMounted, Parser, lease_options, pool_socket
from blockspace.cli.heat_chart import write_png
from blockspace.cli.output import console, emit
from blockspace.errors import InvalidInput
from blockspace.service import control
from blockspace.units import format_size, parse_size

HEAT_CHARS = " .:-=+*#%@"
FILL_CHARS = " ▁▂▃▄▅▆▇█"


# ---- volume create / status hooks (called from cli/volume.py and cli/pool.py) -------------


def add_volume_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tier", action="append", metavar="MEDIA:SIZE:RESILIENCY",
                   help="a tiered volume: give one ssd and one hdd tier, e.g. "
                        "--tier ssd:1G:mirror-2 --tier hdd:10G:parity-1 (the volume is as "
                        "large as its hdd tier; see docs/tiers.md)")
    p.add_argument("--tier-unit", metavar="SIZE",
                   help="tiering unit (default 1M rounded up to whole parity stripes)")


def create_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The volume_create request of a tiered volume, checked before anything is asked."""
    from blockspace.tiering.admin import parse_tier

    if args.size is not None:
        raise InvalidInput("a tiered volume's size is its hdd tier's: leave out --size")
    if args.resiliency is not None or args.copies or args.parity or args.columns:
        raise InvalidInput("a tiered volume takes its resiliency per tier (--tier "
                           "MEDIA:SIZE:RESILIENCY), not --resiliency/--copies/--parity/"
                           "--columns")
    specs = [parse_tier(text) for text in args.tier]
    if sorted(s.media for s in specs) != ["hdd", "ssd"]:
        raise InvalidInput("give exactly one --tier ssd:... and one --tier hdd:...")
    unit = parse_size(args.tier_unit) if args.tier_unit else None
    return {"tiers": list(args.tier), "tier_unit": unit}


def annotate_status(status: dict[str, Any]) -> None:
    """Name tiered volumes' resiliency after their tiers and mark the hidden tiers."""
    tiers: dict[str, Any] = status.get("tiers") or {}
    owners = {info[t]["volume"]: (name, t) for name, info in tiers.items() for t in ("ssd", "hdd")}
    for volume in status.get("volumes", []):
        info = tiers.get(volume["name"])
        if info is not None:
            volume["resiliency"] = (f"tiered: ssd {info['ssd']['resiliency']} "
                                    f"{format_size(info['ssd']['size'])} + hdd "
                                    f"{info['hdd']['resiliency']}")
            volume["tiered"] = True
        elif volume["name"] in owners:
            parent, tier = owners[volume["name"]]
            volume["tier_of"] = parent
            volume["resiliency"] = f"{volume['resiliency']} ({tier} tier of {parent})"


# ---- tier commands -----------------------------------------------------------------------


def cmd_tier_status(args: argparse.Namespace) -> int:
    registry, socket_path = pool_socket(args)
    if socket_path is not None:
        statuses = control.request(socket_path, "tier_status", volume=args.volume)
    else:
        statuses = trio.run(offline.tier_status, registry, args.pool, args.volume)
    if args.volume is not None and not statuses:
        raise InvalidInput(f"volume {args.volume!r} is not tiered")
    if args.png:
        if len(statuses) != 1:
            raise InvalidInput("--png draws one volume: name it")
        write_png(Path(args.png), statuses[0])
    emit(args, statuses, print_statuses)
    return OK


def print_statuses(statuses: list[dict[str, Any]]) -> None:
    if not statuses:
        console.print("no tiered volumes")
    for status in statuses:
        print_status(status)


def cmd_tier_optimize(args: argparse.Namespace) -> int:
    rate = parse_size(args.rate) if args.rate else None
    if rate is not None and rate <= 0:
        raise InvalidInput("--rate must be larger than zero")
    _, socket_path = pool_socket(args)
    if socket_path is None:
        raise NotMounted(f"pool {args.pool!r} is not mounted: the optimizer runs in its "
                         "daemon (mount it first)")
    report = control.request(socket_path, "tier_optimize", volume=args.volume, rate=rate,
                             timeout=3600.0)
    emit(args, report, lambda r: console.print(
        f"tier pass on {args.volume}: promoted {r['promoted']}, demoted {r['demoted']}, "
        f"destaged {r['destaged']} units, {r['failed']} failed "
        f"({r['finished'] - r['started']:.1f}s)"))
    return OK if not report["failed"] else FAILED


def _range(args: argparse.Namespace) -> tuple[int, int | None]:
    offset = parse_size(args.offset) if args.offset else 0
    length = parse_size(args.length) if args.length else None
    if length is not None and length <= 0:
        raise InvalidInput("--length must be larger than zero")
    return offset, length


def cmd_tier_pin(args: argparse.Namespace) -> int:
    return _pin_command(args, "tier_pin")


def cmd_tier_unpin(args: argparse.Namespace) -> int:
    return _pin_command(args, "tier_unpin")


def _pin_command(args: argparse.Namespace, op: str) -> int:
    offset, length = _range(args)
    fields: dict[str, Any] = {"volume": args.volume, "offset": offset, "length": length}
    if op == "tier_pin":
        fields["tier"] = args.tier
    registry, socket_path = pool_socket(args)
    if socket_path is not None:
        status = control.request(socket_path, op, **fields)
    else:
        tier = args.tier if op == "tier_pin" else None
        status = trio.run(offline.tier_pins, registry, args.pool, args.volume, offset, length,
                          tier, lease_options(args))
    emit(args, status, lambda s: console.print(
        f"pins of {s['name']}: " + (", ".join(
            f"{format_size(p['offset'])}+{format_size(p['length'])} on {p['tier']}"
            for p in s["pins"]) or "none")))
    return OK


# ---- output --------------------------------------------------------------------------------


def heat_line(values: list[float]) -> str:
    top = max(values, default=0.0)
    if top <= 0:
        return " " * len(values)
    line = []
    for value in values:
        if value <= 0:
            line.append(HEAT_CHARS[0])
            continue
        level = math.log1p(value) / math.log1p(top)  # log scale: zipf heat spans decades
        line.append(HEAT_CHARS[max(1, min(len(HEAT_CHARS) - 1, round(level * 9)))])
    return "".join(line)


def fill_line(fractions: list[float]) -> str:
    return "".join(FILL_CHARS[min(8, round(f * 8))] for f in fractions)


def print_status(s: dict[str, Any]) -> None:
    ssd, hdd = s["ssd"], s["hdd"]
    ratio = s.get("hit_ratio")
    console.print(
        f"[bold]{s['name']}[/]  {format_size(s['size'])}, unit {format_size(s['unit'])}"
        f"{', write-back (mirror-accelerated parity)' if s['write_back'] else ''}")
    console.print(
        f"  ssd tier {ssd['volume']} ({ssd['resiliency']}): used {format_size(ssd['used'])}, "
        f"free {format_size(ssd['free'])} of {format_size(ssd['size'])}, dirty "
        f"{format_size(ssd['dirty'])}")
    console.print(
        f"  hdd tier {hdd['volume']} ({hdd['resiliency']}): used {format_size(hdd['used'])}, "
        f"free {format_size(hdd['free'])} of {format_size(hdd['size'])}")
    counters = s.get("counters")
    if counters is not None:
        console.print(
            f"  reads {counters['reads']}, ssd hit ratio "
            f"{'-' if ratio is None else f'{ratio:.1%}'}; promoted "
            f"{format_size(counters['bytes_promoted'])} ({counters['promotions']} units), "
            f"demoted {counters['demotions']} units, destaged {counters['destages']} units, "
            f"to hdd {format_size(counters['bytes_demoted'])}; failed moves "
            f"{counters['failed_moves']}")
        optimizer = s["optimizer"]
        console.print(f"  optimizer {optimizer['state']}, {optimizer['passes']} passes, every "
                      f"{optimizer['interval']:.0f}s at most {format_size(optimizer['rate'])}/s")
    else:
        console.print("  (not mounted: no live counters)")
    for pin in s["pins"]:
        console.print(f"  pinned to {pin['tier']}: {format_size(pin['offset'])}"
                      f"+{format_size(pin['length'])}")
    heat = s["heat_map"]
    console.print(f"  heat  |{heat_line(heat['heat'])}|  ({HEAT_CHARS.strip()} = cold..hot, "
                  "log scale)", markup=False, highlight=False)
    console.print(f"  ssd   |{fill_line(heat['ssd_fraction'])}|  (share of each span on ssd)",
                  markup=False, highlight=False)


# ---- parser --------------------------------------------------------------------------------


def add_commands(commands: Any, common: Parser) -> None:
    tier = commands.add_parser("tier", help="storage tiers of tiered volumes").add_subparsers(
        dest="tier_command", required=True, parser_class=Parser)
    p = tier.add_parser("status", parents=[common],
                        help="tiers' used/free, ssd hit ratio, moves, heat map")
    p.add_argument("pool")
    p.add_argument("volume", nargs="?", help="one tiered volume (default: all)")
    p.add_argument("--png", metavar="FILE", help="also draw the heat map into a PNG file")
    p.set_defaults(func=cmd_tier_status)
    p = tier.add_parser("optimize", parents=[common],
                        help="run a tier pass now: destage, demote the coldest, promote "
                             "the hottest")
    p.add_argument("pool")
    p.add_argument("volume")
    p.add_argument("--rate", help="bandwidth limit of moves, e.g. 100M (per second)")
    p.set_defaults(func=cmd_tier_optimize)
    for name, text in (("pin", "keep a byte range on one tier"),
                       ("unpin", "remove the pins overlapping a byte range (default: all)")):
        p = tier.add_parser(name, parents=[common], help=text)
        p.add_argument("pool")
        p.add_argument("volume")
        if name == "pin":
            p.add_argument("--tier", required=True, choices=["ssd", "hdd"])
        p.add_argument("--offset", help="start of the range (4K aligned; default 0)")
        p.add_argument("--length", help="length of the range (default: to the end)")
        p.set_defaults(func=cmd_tier_pin if name == "pin" else cmd_tier_unpin)
