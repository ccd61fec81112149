"""Tiered volumes in the pool metadata: create, delete, pin, status; where heat is saved.

Shared by the daemon and the CLI on an unmounted pool. Everything is validated before the
metadata changes; a failed commit puts the in-memory metadata back as it was.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blockspace.errors import InvalidInput, NoSpace
from blockspace.geometry.allocator import max_slabs
from blockspace.geometry.layouts import LayoutSpec, default_layout
from blockspace.geometry.resiliency_names import RESILIENCY_NAMES, names_of_kind
from blockspace.ondisk.journal import SIZED_TIER_UNIT
from blockspace.ondisk.label import BLOCK, validate_name
from blockspace.ondisk.metadata import MAX_PINS, MAX_TIER_UNIT, TIER_NAMES, TierInfo, VolumeRecord
from blockspace.pool.pool import Pool, check_slot_size
from blockspace.tiering.heat import HeatError, HeatMap
from blockspace.units import format_size, parse_size

log = logging.getLogger(__name__)

DEFAULT_UNIT = SIZED_TIER_UNIT  # the metadata area is sized for it
SUFFIX = {"ssd": ".ssd", "hdd": ".hdd"}


@dataclass(frozen=True)
class TierSpec:
    media: str
    size: int
    kind: str
    copies: int | None = None
    parity: int | None = None

    def layout(self, disks: int, interleave: int | None) -> LayoutSpec:
        return default_layout(self.kind, disks, copies=self.copies, parity=self.parity,
                              interleave=interleave)


def parse_tier(text: str) -> TierSpec:
    """`ssd:1G:mirror-2`, `hdd:10G:parity-1`, `hdd:10G:simple` -> TierSpec."""
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in TIER_NAMES:
        raise InvalidInput(f"--tier takes MEDIA:SIZE:RESILIENCY like ssd:1G:mirror-2, "
                           f"not {text!r}")
    media, size_text, resiliency = parts
    size = parse_size(size_text)
    if size <= 0:
        raise InvalidInput(f"--tier {text}: the size must be larger than zero")
    meaning = RESILIENCY_NAMES.get(resiliency)
    if meaning is None:
        kind = resiliency.split("-")[0]
        if kind == "simple":
            raise InvalidInput(f"--tier {text}: simple takes no number")
        if kind in ("mirror", "parity"):
            raise InvalidInput(f"--tier {text}: {kind} is {' or '.join(names_of_kind(kind))}")
        raise InvalidInput(f"--tier {text}: resiliency is simple, mirror-2, mirror-3, "
                           "parity-1 or parity-2")
    if meaning.kind == "mirror":
        return TierSpec(media, size, "mirror", copies=meaning.copies or 2)
    if meaning.kind == "parity":
        return TierSpec(media, size, "parity", parity=meaning.parity or 1)
    return TierSpec(media, size, "simple")


def _media_disks(pool: Pool, media: str) -> list[int]:
    return [d for d in pool.usable_disk_ids() if pool.disks[d].record.media == media]


def tier_of(pool: Pool, name: str) -> tuple[VolumeRecord, str] | None:
    """(the tiered volume, "ssd"|"hdd") if `name` is one of its hidden tiers."""
    for volume in pool.metadata.volumes:
        if volume.tiers is not None and name in (volume.tiers.ssd, volume.tiers.hdd):
            return volume, "ssd" if name == volume.tiers.ssd else "hdd"
    return None


def default_unit(hdd: LayoutSpec) -> int:
    """1 MiB, rounded up to a power-of-two number of the hdd tier's rows."""
    row = hdd.columns * hdd.interleave
    unit = row
    while unit < DEFAULT_UNIT:
        unit *= 2
    return unit


def check_unit(unit: int, hdd: LayoutSpec, slab_size: int) -> None:
    if unit <= 0 or unit % BLOCK or unit > MAX_TIER_UNIT:
        raise InvalidInput(f"--tier-unit must be a multiple of 4K up to 1G, not {unit}")
    if unit > hdd.slab_data_size(slab_size):
        raise InvalidInput(f"--tier-unit {format_size(unit)} is larger than a slab of the "
                           f"hdd tier ({format_size(hdd.slab_data_size(slab_size))})")
    row = hdd.columns * hdd.interleave
    if hdd.kind == "parity" and unit % row:
        raise InvalidInput(
            f"--tier-unit must be a whole number of the parity tier's stripes "
            f"({format_size(row)}: {hdd.columns} data columns x {format_size(hdd.interleave)}) "
            "so that destaging writes full stripes")


async def create_tiered(
    pool: Pool, name: str, tiers: list[TierSpec], *, provisioning: str = "thin",
    unit: int | None = None, interleave: int | None = None,
) -> VolumeRecord:
    """A tiered volume as large as its hdd tier, with an ssd tier on top."""
    validate_name("volume", name)
    by_media = {t.media: t for t in tiers}
    if len(tiers) != 2 or set(by_media) != set(TIER_NAMES):
        raise InvalidInput("a tiered volume takes exactly one ssd tier and one hdd tier")
    if provisioning not in ("thin", "fixed"):
        raise InvalidInput(f"provisioning must be thin or fixed, not {provisioning!r}")
    names = {media: f"{name}{SUFFIX[media]}" for media in TIER_NAMES}
    for candidate in (name, *names.values()):
        validate_name("volume", candidate)
        if any(v.name == candidate for v in pool.metadata.volumes):
            raise InvalidInput(f"volume {candidate!r} already exists in pool {pool.name!r}")
    specs: dict[str, LayoutSpec] = {}
    for media in TIER_NAMES:
        disks = _media_disks(pool, media)
        spec = by_media[media].layout(len(disks), interleave)
        try:
            spec.validate(pool.slab_size, len(disks))
        except InvalidInput as error:
            raise InvalidInput(f"the {media} tier ({spec.describe()}) cannot be placed on "
                               f"the pool's {len(disks)} {media} disks: {error}") from None
        specs[media] = spec
    unit = default_unit(specs["hdd"]) if unit is None else unit
    check_unit(unit, specs["hdd"], pool.slab_size)
    size = -(-by_media["hdd"].size // unit) * unit
    ssd_size = by_media["ssd"].size // unit * unit
    if ssd_size == 0:
        raise InvalidInput(f"the ssd tier must hold at least one unit ({format_size(unit)})")
    # The metadata area holds tier maps of the ssd capacity in default units; a smaller
    # unit can need more slots than that: then they must fit what the area holds.
    needed = pool.required_slot_size(extra_tier_slots=ssd_size // unit)
    if needed > pool.required_slot_size():
        check_slot_size(pool.metadata.meta_slot_size, needed,
                        f"tiered volume's ssd tier in units of {format_size(unit)} (use a "
                        "larger --tier-unit)")
    sizes = {"ssd": ssd_size, "hdd": size}
    for media in TIER_NAMES:
        if media == "ssd" or provisioning == "fixed":
            _check_fits(pool, media, specs[media], sizes[media])
    now = time.time()
    subs = {
        media: VolumeRecord(names[media], str(uuid.uuid4()), sizes[media],
                            specs[media].to_dict(), provisioning, {}, now)
        for media in TIER_NAMES
    }
    parent = VolumeRecord(name, str(uuid.uuid4()), size, specs["hdd"].to_dict(), provisioning,
                          {}, now, TierInfo(unit, names["ssd"], names["hdd"], {}, []))
    records = [parent, subs["ssd"], subs["hdd"]]
    pool.metadata.volumes.extend(records)
    try:
        if provisioning == "fixed":
            for media in TIER_NAMES:
                await pool.allocate_slabs(subs[media], list(range(pool.slab_count(subs[media]))))
        else:
            await pool.commit()
    except BaseException:
        await _forget(pool, records, commit=provisioning == "fixed")
        raise
    log.info("created tiered volume %s/%s: ssd %s %s + hdd %s %s, unit %d", pool.name, name,
             format_size(ssd_size), specs["ssd"].describe(), format_size(size),
             specs["hdd"].describe(), unit)
    return parent


def _check_fits(pool: Pool, media: str, spec: LayoutSpec, size: int) -> None:
    disks = set(_media_disks(pool, media))
    free = {d: n for d, n in pool.allocator.free_map().items() if d in disks}
    per_slab = spec.slab_data_size(pool.slab_size)
    needed = -(-size // per_slab)
    fits = max_slabs(free, spec.width)
    if fits < needed:
        raise NoSpace(f"not enough free space on the {media} disks for the {media} tier: "
                      f"{spec.describe()} can still place {format_size(fits * per_slab)}, "
                      f"{format_size(needed * per_slab)} needed")


async def _forget(pool: Pool, records: list[VolumeRecord], *, commit: bool) -> None:
    for record in records:
        if record in pool.metadata.volumes:
            pool.metadata.volumes.remove(record)
    if commit:
        await pool.commit()
    extents = [e for r in records for extents in r.slabs.values() for e in extents]
    if extents:
        pool.allocator.release(extents)


async def delete_volume(pool: Pool, name: str) -> None:
    """Delete a volume; a tiered one with its tiers. A tier alone cannot be deleted."""
    record = pool.volume(name)
    owner = tier_of(pool, name)
    if owner is not None:
        raise InvalidInput(f"volume {name!r} is the {owner[1]} tier of tiered volume "
                           f"{owner[0].name!r}: delete {owner[0].name!r}")
    if record.tiers is None:
        await pool.delete_volume(name)
        return
    records = [record, pool.volume(record.tiers.ssd), pool.volume(record.tiers.hdd)]
    index = pool.metadata.volumes.index(record)
    for r in records:
        pool.metadata.volumes.remove(r)
    try:
        await pool.commit()
    except BaseException:
        pool.metadata.volumes[index:index] = records
        raise
    pool.allocator.release([e for r in records for extents in r.slabs.values() for e in extents])


def check_growable(pool: Pool, name: str) -> None:
    record = pool.volume(name)
    if record.tiers is not None or tier_of(pool, name) is not None:
        raise InvalidInput(f"volume {name!r} is tiered (or a tier): tiered volumes cannot "
                           "grow yet")


# ---- pins ------------------------------------------------------------------------------


def _tiered(pool: Pool, name: str) -> VolumeRecord:
    record = pool.volume(name)
    if record.tiers is None:
        raise InvalidInput(f"volume {name!r} is not tiered")
    return record


def _check_range(record: VolumeRecord, offset: int, length: int) -> None:
    if not 0 <= offset < record.size:
        raise InvalidInput(f"offset {offset} is past the end of volume {record.name!r} "
                           f"({record.size} bytes)")
    if length <= 0 or offset % BLOCK or length % BLOCK:
        raise InvalidInput("a pinned range must start and end on 4K boundaries")
    if offset + length > record.size:
        raise InvalidInput(f"the range {offset}+{length} runs past the end of volume "
                           f"{record.name!r} ({record.size} bytes)")


async def pin(pool: Pool, name: str, offset: int, length: int | None, tier: str) -> None:
    """Pin [offset, offset+length) (to the end if length is None) to a tier."""
    record = _tiered(pool, name)
    tiers = record.tiers
    assert tiers is not None
    if tier not in TIER_NAMES:
        raise InvalidInput(f"tier must be ssd or hdd, not {tier!r}")
    if length is None:
        length = record.size - offset
    _check_range(record, offset, length)
    for start, size, other in tiers.pins:
        if start < offset + length and offset < start + size:
            raise InvalidInput(f"the range overlaps the pin {start}+{size} ({other}): unpin "
                               "it first")
    if len(tiers.pins) >= MAX_PINS:
        raise InvalidInput(f"a volume holds at most {MAX_PINS} pins")
    new_pins = sorted([*tiers.pins, (offset, length, tier)])
    slots = pool.volume(tiers.ssd).size // tiers.unit
    pinned = {
        u for start, size, t in new_pins if t == "ssd"
        for u in range(start // tiers.unit, (start + size - 1) // tiers.unit + 1)
    }
    if len(pinned) > slots:
        raise NoSpace(f"pinned to ssd would be {format_size(len(pinned) * tiers.unit)}; the "
                      f"ssd tier holds {format_size(slots * tiers.unit)}")
    await _set_pins(pool, tiers, new_pins)


async def unpin(pool: Pool, name: str, offset: int = 0, length: int | None = None) -> int:
    """Remove every pin overlapping the range (the whole volume by default)."""
    record = _tiered(pool, name)
    tiers = record.tiers
    assert tiers is not None
    end = record.size if length is None else offset + length
    kept = [p for p in tiers.pins if not (p[0] < end and offset < p[0] + p[1])]
    removed = len(tiers.pins) - len(kept)
    if removed:
        await _set_pins(pool, tiers, kept)
    return removed


async def _set_pins(pool: Pool, tiers: TierInfo, pins: list[tuple[int, int, str]]) -> None:
    old = tiers.pins
    tiers.pins = pins
    try:
        await pool.commit()
    except BaseException:
        tiers.pins = old
        raise


# ---- heat on disk ----------------------------------------------------------------------


def heat_path(state_dir: Path, pool: str, volume: str) -> Path:
    return state_dir / "heat" / pool / f"{volume}.json"


def load_heat(path: Path, heat: HeatMap) -> bool:
    try:
        heat.load_state(json.loads(path.read_text()))
    except FileNotFoundError:
        return False
    except (OSError, ValueError, HeatError) as error:
        log.warning("ignoring saved heat %s: %s", path, error)
        return False
    return True


def save_heat(path: Path, heat: HeatMap) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(heat.to_state(), separators=(",", ":")))
    os.replace(tmp, path)


# ---- status ------------------------------------------------------------------------------

HEAT_BUCKETS = 64


def overview(pool: Pool) -> dict[str, dict[str, Any]]:
    """tiered volume -> its tiers (for pool status), from the metadata alone."""
    result = {}
    for record in pool.metadata.volumes:
        tiers = record.tiers
        if tiers is None:
            continue
        ssd, hdd = pool.volume(tiers.ssd), pool.volume(tiers.hdd)
        result[record.name] = {
            "unit": tiers.unit,
            "ssd": {"volume": ssd.name, "size": ssd.size,
                    "resiliency": LayoutSpec.from_dict(ssd.layout).describe()},
            "hdd": {"volume": hdd.name, "size": hdd.size,
                    "resiliency": LayoutSpec.from_dict(hdd.layout).describe()},
        }
    return result


def volume_status(pool: Pool, record: VolumeRecord, heat: HeatMap | None,
                  live: dict[str, Any] | None = None) -> dict[str, Any]:
    """Everything `tier status` shows about one tiered volume (`live`: the daemon's
    counters and optimizer state, absent for an unmounted pool)."""
    tiers = record.tiers
    assert tiers is not None
    ssd, hdd = pool.volume(tiers.ssd), pool.volume(tiers.hdd)
    unit = tiers.unit
    units = record.size // unit
    slots = ssd.size // unit
    hdd_spec = LayoutSpec.from_dict(hdd.layout)
    hdd_allocated = min(hdd.size, len(hdd.slabs) * hdd_spec.slab_data_size(pool.slab_size))
    dirty = sum(1 for _, d in tiers.map.values() if d)
    buckets = min(HEAT_BUCKETS, units)
    ssd_units = [0] * buckets
    for u in tiers.map:
        ssd_units[u * buckets // units] += 1
    # units u with u * buckets // units == b: from ceil(b * units / buckets) on
    per_bucket = [-(-(b + 1) * units // buckets) - -(-b * units // buckets)
                  for b in range(buckets)]
    status: dict[str, Any] = {
        "name": record.name,
        "size": record.size,
        "unit": unit,
        "units": units,
        "write_back": hdd_spec.kind == "parity",
        "ssd": {
            "volume": ssd.name,
            "resiliency": LayoutSpec.from_dict(ssd.layout).describe(),
            "size": ssd.size,
            "slots": slots,
            "used": len(tiers.map) * unit,
            "free": (slots - len(tiers.map)) * unit,
            "dirty": dirty * unit,
        },
        "hdd": {
            "volume": hdd.name,
            "resiliency": hdd_spec.describe(),
            "size": hdd.size,
            "used": hdd_allocated,
            "free": hdd.size - hdd_allocated,
        },
        "pins": [{"offset": o, "length": n, "tier": t} for o, n, t in tiers.pins],
        "heat_map": {
            "buckets": buckets,
            "heat": heat.buckets(buckets) if heat is not None else [0.0] * buckets,
            "ssd_fraction": [min(1.0, s / n) if n else 0.0
                             for s, n in zip(ssd_units, per_bucket, strict=True)],
        },
    }
    counters = (live or {}).get("counters")
    if counters is not None:
        reads = counters["reads"]
        status["hit_ratio"] = counters["ssd_hits"] / reads if reads else None
    else:
        status["hit_ratio"] = None
    status.update(live or {})
    return status
