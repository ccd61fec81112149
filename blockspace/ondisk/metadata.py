"""Pool metadata: disks, volumes and slab maps, encoded into one metadata slot.

One slot holds a 64-byte header followed by the payload (zlib-compressed JSON)::

    magic b"BLKSPCMD" | u32 version | u32 flags (0) | u64 generation | u64 payload length
    | u64 xxh3_64(payload) | 16 bytes pool UUID | 8 zero bytes

Decoding trusts nothing: the header and checksum are verified, decompression is bounded
(no zip bombs), the JSON is parsed strictly (no duplicate keys, NaN or Infinity), every
field is type- and range-checked and the whole map is validated (`validate`): no extent
outside its disk, none used twice, slabs on distinct disks. Pure code: no I/O.
"""

from __future__ import annotations

import dataclasses
import json
import operator
import struct
import uuid
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import chain, compress
from operator import itemgetter
from typing import Any, TypeVar

import xxhash

from blockspace.errors import FormatError, InvalidInput, NoSpace
from blockspace.ondisk.framing import check_format_version, decode_json_body
from blockspace.ondisk.label import (
    BLOCK,
    GIB,
    MAX_DISK_ID,
    MAX_DISK_SIZE,
    MAX_META_SLOT_SIZE,
    MAX_SLAB_SIZE,
    MAX_TIMESTAMP,
    MEDIA,
    MIN_META_SLOT_SIZE,
    MIN_SLAB_SIZE,
    BytesLike,
    check_uuid,
    compute_geometry,
    timestamp,
    validate_name,
)

META_MAGIC = b"BLKSPCMD"
META_VERSION = 1
META_HEADER_SIZE = 64
# magic, version, flags, generation, payload length, xxh3_64(payload), pool uuid, 8 zero bytes:
# a version-1 slot, and a format-2 checkpoint (blockspace/ondisk/journal.py).
META_HEADER = struct.Struct("<8sIIQQQ16s8x")
_HEADER = META_HEADER
assert _HEADER.size == META_HEADER_SIZE

DISK_STATES = ("online", "missing", "failed", "retiring", "retired", "resyncing", "failing")
LAYOUT_KINDS = ("simple", "mirror", "parity")
PROVISIONING = ("thin", "fixed")
LAYOUT_KEYS = ("kind", "columns", "copies", "parity", "interleave")
MAX_COLUMNS = 1024  # only a sanity bound; the allocator needs width distinct disks
MAX_VOLUME_SIZE = 1 << 60  # 1 EiB: thin volumes may exceed the pool, but not absurdly
MAX_GENERATION = (1 << 63) - 1
# A decoded map must leave room for this many commits before MAX_GENERATION: a crafted
# generation near the top would make the first commit unwritable (issue 17 item 5).
COMMIT_HEADROOM = 1 << 32
MAX_PATH_HINT = 4096
# Decompressed JSON may be at most this many times the raw slot (and never above 1 GiB).
MAX_EXPANSION = 64
MAX_JSON_SIZE = GIB

_TOP_KEYS = frozenset(
    {"pool_uuid", "name", "generation", "slab_size", "meta_slot_size", "next_disk_id"}
    | {"disks", "volumes"}
)
_DISK_KEYS = frozenset(
    {"disk_id", "disk_uuid", "path_hint", "size", "extent_count", "media", "state"}
    | {"state_reason", "state_since"}
)
_VOLUME_KEYS = frozenset({"name", "uuid", "size", "layout", "provisioning", "slabs", "created"})
# Keys newer writers add only when set, so older pools decode unchanged.
_TOP_OPTIONAL = frozenset({"opened_seq"})
_DISK_OPTIONAL = frozenset({"missed_since", "errors"})
# A disk's I/O error counters ("errors", kept across mounts until `disk clear`).
ERROR_KINDS = ("read", "write", "checksum")
_VOLUME_OPTIONAL: frozenset[str] = frozenset({"tiers", "codec"})
# A parity volume's erasure code (blockspace/geometry/erasure.py): the keys of its "codec".
_CODEC_KEYS = frozenset({"library", "ec_type", "k", "m", "fragments"})
MAX_CODEC_NAME = 64
MAX_SEQ = (1 << 63) - 1
# Tiered volumes (blockspace/tiering/tiered_volume.py): the keys of a volume's "tiers" object.
_TIER_KEYS = frozenset({"unit", "ssd", "hdd", "map", "pins"})
TIER_NAMES = ("ssd", "hdd")
MIN_TIER_UNIT = BLOCK
MAX_TIER_UNIT = GIB
MAX_PINS = 64


K = TypeVar("K")
V = TypeVar("V")


class TrackedMap(dict[K, V]):
    """A dict that remembers which keys changed since `take_dirty`: a commit journals the
    changed slab-map (or tier-map) entries only, so its cost follows the change, not the map.
    Reads are plain dict reads; every mutating method records the keys it touches."""

    dirty: set[K]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dirty = set()

    def __setitem__(self, key: K, value: V) -> None:
        self.dirty.add(key)
        super().__setitem__(key, value)

    def __delitem__(self, key: K) -> None:
        self.dirty.add(key)
        super().__delitem__(key)

    def pop(self, key: K, *default: Any) -> Any:  # type: ignore[override]
        self.dirty.add(key)
        return super().pop(key, *default)

    def popitem(self) -> tuple[K, V]:
        key, value = super().popitem()
        self.dirty.add(key)
        return key, value

    def setdefault(self, key: K, default: Any = None) -> Any:  # type: ignore[override]
        self.dirty.add(key)
        return super().setdefault(key, default)

    def clear(self) -> None:
        self.dirty.update(self)
        super().clear()

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __ior__(self, other: Any) -> TrackedMap[K, V]:  # type: ignore[override,misc]
        self.update(other)
        return self

    def take_dirty(self) -> set[K]:
        """The keys changed since the last call (the caller journals their current value)."""
        taken, self.dirty = self.dirty, set()
        return taken

    def mark_dirty(self, keys: Iterable[K]) -> None:
        """Give back keys a failed commit did not record."""
        self.dirty.update(keys)


def tracked(mapping: dict[K, V]) -> TrackedMap[K, V]:
    """`mapping` as a TrackedMap with nothing dirty (itself if it already is one)."""
    if isinstance(mapping, TrackedMap):
        return mapping
    result: TrackedMap[K, V] = TrackedMap(mapping)
    return result


@dataclass
class DiskRecord:
    disk_id: int
    disk_uuid: str
    path_hint: str
    size: int
    extent_count: int
    media: str
    state: str = "online"
    state_reason: str = ""  # why it left "online" (the error), shown in pool status
    state_since: float = 0.0  # when the state last changed (seconds since the epoch)
    # While out of service: the write sequence number from which it may have missed
    # writes, so a disk that returns is resynced by what changed, not copied whole.
    missed_since: int = 0
    # I/O errors seen on it, by kind (ERROR_KINDS), across mounts: `pool status` shows
    # them, `disk clear` resets them.
    errors: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ERROR_KINDS, 0))


@dataclass
class TierInfo:
    """What makes a volume tiered: its two hidden sub-volumes (ordinary volume records of
    this pool) and which tiering units currently live on the ssd one.

    The hdd sub-volume holds every unit's home (unit u at byte u * unit); `map` lists the
    units with a copy in an ssd slot (slot s at byte s * unit of the ssd sub-volume) and
    whether that copy is newer than the home ("dirty"). `pins`: (offset, length, tier).
    """

    unit: int
    ssd: str
    hdd: str
    map: dict[int, tuple[int, bool]]
    pins: list[tuple[int, int, str]]

    def __post_init__(self) -> None:
        if isinstance(self.map, dict):
            self.map = tracked(self.map)


@dataclass(frozen=True)
class CodecInfo:
    """The erasure code a parity volume's parity is computed with, so that no host computes
    it with another (pyeclib's backends disagree for m=2). A volume recorded before this
    field existed decodes with None and gets this host's default at the next commit."""

    library: str  # "pyeclib"
    ec_type: str  # its backend: "isa_l_rs_vand", "liberasurecode_rs_vand"
    k: int  # data fragments: the layout's columns
    m: int  # parity fragments: the layout's parity
    fragments: str  # how fragments are stored: "headerless" (pyeclib's payload only)


@dataclass
class VolumeRecord:
    name: str
    uuid: str
    size: int
    layout: dict[str, int | str]
    provisioning: str
    slabs: dict[int, list[tuple[int, int]]]
    created: float
    tiers: TierInfo | None = None
    codec: CodecInfo | None = None

    def __post_init__(self) -> None:
        if isinstance(self.slabs, dict):
            self.slabs = tracked(self.slabs)

    @property
    def ec_type(self) -> str | None:
        """The recorded erasure backend (None: not recorded yet, or not a parity volume)."""
        return self.codec.ec_type if self.codec is not None else None


@dataclass
class PoolMetadata:
    pool_uuid: str
    name: str
    generation: int
    slab_size: int
    meta_slot_size: int
    disks: list[DiskRecord]
    volumes: list[VolumeRecord]
    next_disk_id: int
    # The write sequence number when the daemon last took the pool into service: every
    # write of that session is numbered above it.
    opened_seq: int = 0

    def disk(self, disk_id: int) -> DiskRecord:
        """The disk with this id; KeyError if the pool has none."""
        for record in self.disks:
            if record.disk_id == disk_id:
                return record
        raise KeyError(disk_id)

    def volume(self, name: str) -> VolumeRecord:
        """The volume with this name; KeyError if the pool has none."""
        for record in self.volumes:
            if record.name == name:
                return record
        raise KeyError(name)

    def used_extents(self) -> list[tuple[int, int]]:
        """Every (disk_id, extent) mapped by any volume's slabs (the map's own pairs: a
        new tuple per extent would cost 32 MiB at 500k slabs)."""
        placements = chain.from_iterable(volume.slabs.values() for volume in self.volumes)
        return list(chain.from_iterable(placements))


def layout_width(layout: dict[str, Any]) -> int:
    """Extents per slab: simple columns; mirror columns*copies; parity columns+parity."""
    kind = layout["kind"]
    if kind == "simple":
        return int(layout["columns"])
    if kind == "mirror":
        return int(layout["columns"]) * int(layout["copies"])
    if kind == "parity":
        return int(layout["columns"]) + int(layout["parity"])
    raise ValueError(f"unknown layout kind {kind!r}")


# ---------------------------------------------------------------------------------------------
# validation


def _int(what: str, value: object, lo: int, hi: int) -> int:
    if type(value) is not int:  # bool is not a number here
        raise FormatError(f"{what} is not an integer: {value!r:.40}")
    if not lo <= value <= hi:
        raise FormatError(f"{what} out of range: {str(value)[:40]}")
    return value


def _choice(what: str, value: object, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise FormatError(f"{what} {value!r:.40} is not one of {', '.join(choices)}")
    return value


def _name(kind: str, value: object) -> str:
    try:
        return validate_name(kind, value)  # type: ignore[arg-type]
    except InvalidInput as exc:
        raise FormatError(f"pool metadata: {exc}") from None


def _power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def _validate_layout(where: str, layout: object, slab_size: int) -> int:
    """Check a volume's layout; return its width."""
    if not isinstance(layout, dict) or set(layout) != set(LAYOUT_KEYS):
        raise FormatError(f"{where} layout must have exactly the keys {', '.join(LAYOUT_KEYS)}")
    kind = _choice(f"{where} layout kind", layout["kind"], LAYOUT_KINDS)
    columns = _int(f"{where} layout columns", layout["columns"], 1, MAX_COLUMNS)
    copies = _int(f"{where} layout copies", layout["copies"], 1, 3)
    parity = _int(f"{where} layout parity", layout["parity"], 0, 2)
    interleave = _int(f"{where} layout interleave", layout["interleave"], BLOCK, slab_size)
    if not _power_of_two(interleave):
        raise FormatError(f"{where} layout interleave {interleave} is not a power of two")
    if kind == "simple" and (copies, parity) != (1, 0):
        raise FormatError(f"{where} simple layout must have copies 1 and parity 0")
    if kind == "mirror" and (copies not in (2, 3) or parity != 0):
        raise FormatError(f"{where} mirror layout must have 2 or 3 copies and parity 0")
    if kind == "parity":
        if parity not in (1, 2) or copies != 1:
            raise FormatError(f"{where} parity layout must have parity 1 or 2 and copies 1")
        if columns < 2:
            raise FormatError(f"{where} parity layout needs at least 2 data columns")
    return layout_width(layout)


def _validate_disks(md: PoolMetadata) -> dict[int, DiskRecord]:
    if not isinstance(md.disks, list):
        raise FormatError("pool metadata disks is not a list")
    by_id: dict[int, DiskRecord] = {}
    uuids: set[str] = set()
    for disk in md.disks:
        if not isinstance(disk, DiskRecord):
            raise FormatError(f"pool metadata disk entry is not a disk record: {disk!r:.40}")
        disk_id = _int("disk id", disk.disk_id, 0, MAX_DISK_ID - 1)
        where = f"disk {disk_id}"
        disk_uuid = check_uuid(f"{where} uuid", disk.disk_uuid)
        if disk_id in by_id:
            raise FormatError(f"pool metadata lists disk id {disk_id} twice")
        if disk_uuid in uuids:
            raise FormatError(f"pool metadata lists disk uuid {disk_uuid} twice")
        if not isinstance(disk.path_hint, str) or len(disk.path_hint) > MAX_PATH_HINT:
            raise FormatError(f"{where} path hint is not a string of at most {MAX_PATH_HINT}")
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in disk.path_hint):
            raise FormatError(f"{where} path hint contains control characters")
        size = _int(f"{where} size", disk.size, 1, MAX_DISK_SIZE)
        extent_count = _int(f"{where} extent count", disk.extent_count, 0, MAX_DISK_SIZE)
        try:
            geometry = compute_geometry(size, md.slab_size, md.meta_slot_size)
        except InvalidInput as exc:
            raise FormatError(f"{where}: {exc}") from None
        if extent_count != geometry.extent_count:
            raise FormatError(
                f"{where} extent count {extent_count} does not match its size "
                f"({geometry.extent_count} extents)"
            )
        _choice(f"{where} media", disk.media, MEDIA)
        _choice(f"{where} state", disk.state, DISK_STATES)
        if not isinstance(disk.state_reason, str) or len(disk.state_reason) > MAX_PATH_HINT:
            raise FormatError(f"{where} state reason is not a string of at most {MAX_PATH_HINT}")
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in disk.state_reason):
            raise FormatError(f"{where} state reason contains control characters")
        if not isinstance(disk.state_since, int | float) or isinstance(disk.state_since, bool):
            raise FormatError(f"{where} state time is not a number")
        if not 0.0 <= float(disk.state_since) < MAX_TIMESTAMP:
            raise FormatError(f"{where} state time is out of range")
        _int(f"{where} missed-since sequence", disk.missed_since, 0, MAX_SEQ)
        if not isinstance(disk.errors, dict) or set(disk.errors) != set(ERROR_KINDS):
            raise FormatError(f"{where} error counters are not {{{', '.join(ERROR_KINDS)}}}")
        for kind in ERROR_KINDS:
            _int(f"{where} {kind} error count", disk.errors[kind], 0, MAX_SEQ)
        by_id[disk_id] = disk
        uuids.add(disk_uuid)
    return by_id


# The extents each disk's slabs use, by disk id (every disk of the pool has an entry):
# what validation counts anyway, handed on so that opening a big pool counts it once.
ExtentsInUse = dict[int, set[int]]


def validate(md: PoolMetadata, *, decoded: bool = False) -> ExtentsInUse:
    """Check every field and the cross-references of a map, and return the extents it uses
    (fresh sets, the caller's to keep). Raises FormatError. A map `decoded` from a disk
    must also leave room for commits after it."""
    if not isinstance(md, PoolMetadata):
        raise FormatError("not pool metadata")
    check_uuid("pool uuid", md.pool_uuid)
    _name("pool", md.name)
    _int("pool metadata generation", md.generation, 0,
         MAX_GENERATION - COMMIT_HEADROOM if decoded else MAX_GENERATION)
    slab_size = _int("pool slab size", md.slab_size, MIN_SLAB_SIZE, MAX_SLAB_SIZE)
    if not _power_of_two(slab_size):
        raise FormatError(f"pool slab size {slab_size} is not a power of two")
    meta_slot_size = _int(
        "pool metadata slot size", md.meta_slot_size, MIN_META_SLOT_SIZE, MAX_META_SLOT_SIZE
    )
    if meta_slot_size % BLOCK:
        raise FormatError(f"pool metadata slot size {meta_slot_size} is not a multiple of 4096")
    disks = _validate_disks(md)
    next_disk_id = _int("pool next disk id", md.next_disk_id, 0, MAX_DISK_ID)
    _int("pool opened sequence", md.opened_seq, 0, MAX_SEQ)
    if disks and next_disk_id <= max(disks):
        raise FormatError(f"pool next disk id {next_disk_id} is not above disk {max(disks)}")

    if not isinstance(md.volumes, list):
        raise FormatError("pool metadata volumes is not a list")
    names: set[str] = set()
    volume_uuids: set[str] = set()
    used: set[tuple[int, int]] = set()
    maps: list[tuple[str, dict[Any, Any], int, int]] = []
    for volume in md.volumes:
        if not isinstance(volume, VolumeRecord):
            raise FormatError(f"pool metadata volume entry is not a volume: {volume!r:.40}")
        name = _name("volume", volume.name)
        where = f"volume {name}"
        volume_uuid = check_uuid(f"{where} uuid", volume.uuid)
        if name in names:
            raise FormatError(f"pool metadata lists volume {name} twice")
        if volume_uuid in volume_uuids:
            raise FormatError(f"pool metadata lists volume uuid {volume_uuid} twice")
        names.add(name)
        volume_uuids.add(volume_uuid)
        size = _int(f"{where} size", volume.size, 1, MAX_VOLUME_SIZE)
        if size % BLOCK:
            raise FormatError(f"{where} size {size} is not a multiple of {BLOCK}")
        width = _validate_layout(where, volume.layout, slab_size)
        _choice(f"{where} provisioning", volume.provisioning, PROVISIONING)
        timestamp(f"{where} created", volume.created)
        slab_data = int(volume.layout["columns"]) * slab_size
        slab_count = -(-size // slab_data)
        if not isinstance(volume.slabs, dict):
            raise FormatError(f"{where} slab map is not a mapping")
        maps.append((where, volume.slabs, width, slab_count))
        if volume.codec is not None:
            _validate_codec(where, volume.codec, volume.layout)
    in_use = _extents_in_use(maps, disks)
    if in_use is None:  # then find the first fault, one row at a time
        for where, slabs, width, slab_count in maps:
            for index, placement in slabs.items():
                _int(f"{where} slab index", index, 0, slab_count - 1)
                _validate_placement(f"{where} slab {index}", placement, width, disks, used)
        raise FormatError("pool metadata slab maps do not check")  # pragma: no cover
    _validate_tiers(md.volumes)
    return in_use


_SEQUENCES = frozenset({list, tuple})


def _extents_in_use(maps: list[tuple[str, dict[Any, Any], int, int]],
                    disks: dict[int, DiskRecord]) -> ExtentsInUse | None:
    """The extents of every disk the slab maps use, if every map is sound (what
    `_validate_placement` checks row by row), by whole-map checks that run at C speed: open
    validates maps of 500k slabs. None says only that something is wrong; the row-by-row
    check then names it."""
    per_disk: dict[int, set[int]] = {disk_id: set() for disk_id in disks}
    mapped = 0
    for _, slabs, width, slab_count in maps:
        if not slabs:
            continue
        if set(map(type, slabs)) != _INTS or min(slabs) < 0 or max(slabs) >= slab_count:
            return None
        placements = slabs.values()
        if not set(map(type, placements)) <= _SEQUENCES or set(map(len, placements)) != {width}:
            return None
        pairs = list(chain.from_iterable(placements))
        if not set(map(type, pairs)) <= _SEQUENCES or set(map(len, pairs)) != {2}:
            return None
        first, second = itemgetter(0), itemgetter(1)
        if set(map(type, map(first, pairs))) != _INTS or \
                set(map(type, map(second, pairs))) != _INTS:
            return None
        present = set(map(first, pairs))
        if not present <= per_disk.keys() or min(map(second, pairs)) < 0:
            return None
        if width > 1 and any(len({pair[0] for pair in placement}) != width
                             for placement in placements):
            return None
        for disk_id in present:  # one C-speed pass per disk, not one step per extent
            per_disk[disk_id].update(compress(map(second, pairs),
                                              map(disk_id.__eq__, map(first, pairs))))
        mapped += len(pairs)
    if sum(map(len, per_disk.values())) != mapped:
        return None  # an extent used twice
    if not all(not used or max(used) < disks[disk_id].extent_count
               for disk_id, used in per_disk.items()):
        return None
    return per_disk


def _codec_name(what: str, value: object) -> str:
    if (not isinstance(value, str) or not 0 < len(value) <= MAX_CODEC_NAME
            or not all(ch.isascii() and (ch.isalnum() or ch in "_-") for ch in value)):
        raise FormatError(f"{what} is not a name of at most {MAX_CODEC_NAME} characters: "
                          f"{value!r:.40}")
    return value


def _validate_codec(where: str, codec: object, layout: dict[str, int | str]) -> None:
    """Shape only: whether this host has the backend is the pool's question at open."""
    if not isinstance(codec, CodecInfo):
        raise FormatError(f"{where} codec is not an erasure code description")
    if layout["kind"] != "parity":
        raise FormatError(f"{where}: only a parity volume records an erasure code")
    for name in ("library", "ec_type", "fragments"):
        _codec_name(f"{where} codec {name}", getattr(codec, name))
    k = _int(f"{where} codec k", codec.k, 1, MAX_COLUMNS)
    m = _int(f"{where} codec m", codec.m, 1, 2)
    if (k, m) != (layout["columns"], layout["parity"]):
        raise FormatError(f"{where} codec k={k} m={m} does not match its layout "
                          f"({layout['columns']} data + {layout['parity']} parity)")


def _validate_tiers(volumes: list[VolumeRecord]) -> None:
    """A tiered volume names two distinct, untiered sub-volumes no other volume claims;
    its own slab map is empty; its map and pins stay inside both tiers."""
    by_name = {volume.name: volume for volume in volumes}
    claimed: set[str] = set()
    for volume in volumes:
        tiers = volume.tiers
        if tiers is None:
            continue
        where = f"volume {volume.name} tiers"
        if not isinstance(tiers, TierInfo):
            raise FormatError(f"{where} is not a tier description")
        unit = _int(f"{where} unit", tiers.unit, MIN_TIER_UNIT, MAX_TIER_UNIT)
        if unit % BLOCK:
            raise FormatError(f"{where} unit {unit} is not a multiple of {BLOCK}")
        if volume.slabs:
            raise FormatError(f"{where}: a tiered volume keeps its data in its tiers, not slabs")
        if volume.size % unit:
            raise FormatError(f"{where}: size {volume.size} is not a multiple of the unit")
        subs = {}
        for tier in TIER_NAMES:
            name = getattr(tiers, tier)
            sub = by_name.get(name) if isinstance(name, str) else None
            if sub is None or sub is volume:
                raise FormatError(f"{where} {tier} tier {name!r:.70} is not another volume")
            if sub.tiers is not None or name in claimed:
                raise FormatError(f"{where} {tier} tier {name} is tiered or already claimed")
            claimed.add(name)
            subs[tier] = sub
        if subs["hdd"].size != volume.size:
            raise FormatError(f"{where}: the hdd tier is not the size of the volume")
        ssd_size = subs["ssd"].size
        if ssd_size % unit:
            raise FormatError(f"{where}: the ssd tier is not a whole number of units")
        units, slots = volume.size // unit, ssd_size // unit
        if not isinstance(tiers.map, dict):
            raise FormatError(f"{where} map is not a mapping")
        seen: set[int] = set()
        for index, entry in tiers.map.items():
            _int(f"{where} map unit", index, 0, units - 1)
            if not isinstance(entry, tuple) or len(entry) != 2 or type(entry[1]) is not bool:
                raise FormatError(f"{where} map entry is not (slot, dirty)")
            slot = _int(f"{where} map slot", entry[0], 0, slots - 1)
            if slot in seen:
                raise FormatError(f"{where} map uses ssd slot {slot} twice")
            seen.add(slot)
        _validate_pins(where, tiers.pins, volume.size)


def _validate_pins(where: str, pins: object, size: int) -> None:
    if not isinstance(pins, list) or len(pins) > MAX_PINS:
        raise FormatError(f"{where} pins is not a list of at most {MAX_PINS}")
    previous_end = 0
    for pin in pins:
        if not isinstance(pin, tuple) or len(pin) != 3:
            raise FormatError(f"{where} pin is not (offset, length, tier)")
        offset = _int(f"{where} pin offset", pin[0], 0, size - BLOCK)
        length = _int(f"{where} pin length", pin[1], BLOCK, size - offset)
        if offset % BLOCK or length % BLOCK:
            raise FormatError(f"{where} pin {offset}+{length} is not 4 KiB aligned")
        if offset < previous_end:
            raise FormatError(f"{where} pins overlap or are not in ascending order")
        previous_end = offset + length
        _choice(f"{where} pin tier", pin[2], TIER_NAMES)


def _validate_placement(
    where: str,
    placement: object,
    width: int,
    disks: dict[int, DiskRecord],
    used: set[tuple[int, int]],
) -> None:
    if not isinstance(placement, list | tuple) or len(placement) != width:
        raise FormatError(f"{where} does not have {width} extents")
    on_disks: set[int] = set()
    for entry in placement:
        if not isinstance(entry, list | tuple) or len(entry) != 2:
            raise FormatError(f"{where} extent entry is not a (disk, extent) pair")
        disk_id = _int(f"{where} disk id", entry[0], 0, MAX_DISK_ID - 1)
        disk = disks.get(disk_id)
        if disk is None:
            raise FormatError(f"{where} references unknown disk {disk_id}")
        extent = _int(f"{where} extent", entry[1], 0, MAX_DISK_SIZE)
        if extent >= disk.extent_count:
            raise FormatError(
                f"{where} extent {extent} is beyond disk {disk_id} ({disk.extent_count} extents)"
            )
        if disk_id in on_disks:
            raise FormatError(f"{where} places two extents on disk {disk_id}")
        on_disks.add(disk_id)
        if (disk_id, extent) in used:
            raise FormatError(f"{where} reuses extent {extent} of disk {disk_id}")
        used.add((disk_id, extent))


# ---------------------------------------------------------------------------------------------
# encoding


def json_cap(raw_len: int) -> int:
    """How far a payload read from `raw_len` bytes may expand (no compression bombs)."""
    return _json_cap(raw_len)


def _json_cap(raw_len: int) -> int:
    return min(MAX_JSON_SIZE, MAX_EXPANSION * max(raw_len, MIN_META_SLOT_SIZE))


def metadata_document(md: PoolMetadata, *, maps: bool = True) -> dict[str, Any]:
    """The JSON document of `md`. Without `maps`: the small part only (no volume slab
    maps, no tier maps), as every format-2 journal record carries it."""
    document = _document(md, maps)
    return document


def _document(md: PoolMetadata, maps: bool = True) -> dict[str, Any]:
    return {
        "pool_uuid": md.pool_uuid,
        "name": md.name,
        "generation": md.generation,
        "slab_size": md.slab_size,
        "meta_slot_size": md.meta_slot_size,
        "next_disk_id": md.next_disk_id,
        **({"opened_seq": md.opened_seq} if md.opened_seq else {}),
        "disks": [
            {
                "disk_id": d.disk_id,
                "disk_uuid": d.disk_uuid,
                "path_hint": d.path_hint,
                "size": d.size,
                "extent_count": d.extent_count,
                "media": d.media,
                "state": d.state,
                "state_reason": d.state_reason,
                "state_since": float(d.state_since),
                **({"missed_since": d.missed_since} if d.missed_since else {}),
                **({"errors": dict(d.errors)} if any(d.errors.values()) else {}),
            }
            for d in md.disks
        ],
        "volumes": [
            {
                "name": v.name,
                "uuid": v.uuid,
                "size": v.size,
                "layout": {key: v.layout[key] for key in LAYOUT_KEYS},
                "provisioning": v.provisioning,
                **({"slabs": slab_rows(v.slabs, sorted(v.slabs))} if maps else {}),
                "created": float(v.created),
                **({"tiers": _tiers_document(v.tiers, maps)} if v.tiers is not None else {}),
                **({"codec": _codec_document(v.codec)} if v.codec is not None else {}),
            }
            for v in md.volumes
        ],
    }


def _codec_document(codec: CodecInfo) -> dict[str, Any]:
    return {"library": codec.library, "ec_type": codec.ec_type, "k": codec.k, "m": codec.m,
            "fragments": codec.fragments}


def slab_rows(
    slabs: dict[int, list[tuple[int, int]]], indexes: Iterable[int]
) -> list[list[int]]:
    """[index, disk, extent, disk, extent, ...] per slab of `indexes` (each mapped)."""
    return [[index, *(n for pair in slabs[index] for n in pair)] for index in indexes]


def tier_rows(tier_map: dict[int, tuple[int, bool]], units: Iterable[int]) -> list[int]:
    """Flat [unit, slot, dirty, ...] for `units` (each mapped)."""
    return [n for index in units for n in (index, tier_map[index][0], int(tier_map[index][1]))]


def _tiers_document(tiers: TierInfo, maps: bool = True) -> dict[str, Any]:
    return {
        "unit": tiers.unit,
        "ssd": tiers.ssd,
        "hdd": tiers.hdd,
        # Flat [unit, slot, dirty, ...], ascending by unit: compact and compresses well.
        **({"map": tier_rows(tiers.map, sorted(tiers.map))} if maps else {}),
        "pins": [list(pin) for pin in tiers.pins],
    }


def compact_json(document: object) -> bytes:
    """The canonical encoding every metadata record uses."""
    text = json.dumps(document, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8")


def encode_metadata(md: PoolMetadata, slot_size: int) -> bytes:
    """Header + compressed payload (not padded). NoSpace if it exceeds `slot_size`.

    The map is validated first: writing a map that would not decode is a bug (ValueError).
    """
    try:
        validate(md)
    except FormatError as exc:
        raise ValueError(f"refusing to write invalid pool metadata: {exc}") from None
    document = compact_json(_document(md))
    payload = zlib.compress(document, 6)
    total = META_HEADER_SIZE + len(payload)
    if total > slot_size:
        raise NoSpace(
            f"pool metadata ({total} bytes) no longer fits the metadata area ({slot_size} bytes)"
        )
    if len(document) > _json_cap(total):
        raise NoSpace(
            f"pool metadata ({len(document)} bytes uncompressed) is larger than supported"
        )
    header = _HEADER.pack(
        META_MAGIC,
        META_VERSION,
        0,
        md.generation,
        len(payload),
        xxhash.xxh3_64_intdigest(payload),
        uuid.UUID(md.pool_uuid).bytes,
    )
    return header + payload


# ---------------------------------------------------------------------------------------------
# decoding


def decompress_bounded(payload: bytes, cap: int) -> bytes:
    """zlib-decompress at most `cap` bytes; FormatError on bad, truncated or larger data."""
    return _decompress(payload, cap)


def _decompress(payload: bytes, cap: int) -> bytes:
    decompressor = zlib.decompressobj()
    try:
        data = decompressor.decompress(payload, cap)
    except zlib.error as exc:
        raise FormatError(f"pool metadata payload is not valid zlib data: {exc}") from None
    if decompressor.unconsumed_tail:
        raise FormatError(f"pool metadata expands beyond {cap} bytes (compression bomb?)")
    if not decompressor.eof:
        raise FormatError("pool metadata payload is truncated")
    if decompressor.unused_data:
        raise FormatError("pool metadata payload has trailing data")
    return data


def _exact_keys(
    what: str, obj: object, keys: frozenset[str], optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise FormatError(f"{what} is not a JSON object")
    if not keys <= set(obj) <= keys | optional:
        missing = sorted(keys - set(obj))
        extra = sorted(repr(k)[:40] for k in set(obj) - keys - optional)[:5]
        raise FormatError(f"{what} fields wrong: missing {missing}, unexpected {extra}")
    return obj


def _list(what: str, obj: object) -> list[Any]:
    if not isinstance(obj, list):
        raise FormatError(f"{what} is not a JSON list")
    return obj


_INTS = frozenset({int})


_ROWS_AT_ONCE = 8192


def _slab_map(where: str, rows: object) -> dict[int, list[tuple[int, int]]]:
    slabs: TrackedMap[int, list[tuple[int, int]]] = TrackedMap()
    previous = -1
    pending = _list(f"{where} slabs", rows)
    # Consumed from the end a few thousand rows at a time, each batch let go once parsed:
    # the decoded JSON of a big map and the map built from it are not both whole in memory
    # (mount's peak RSS). Each batch is checked by whole-batch calls that run at C speed.
    pending.reverse()
    while pending:
        batch = pending[-_ROWS_AT_ONCE:]
        del pending[-_ROWS_AT_ONCE:]
        batch.reverse()
        lengths = set(map(len, batch)) if set(map(type, batch)) == {list} else {0}
        if any(n < 3 or not n & 1 for n in lengths):
            raise FormatError(f"{where} slab entry is not [index, disk, extent, ...]")
        if set(map(type, chain.from_iterable(batch))) != _INTS:
            raise FormatError(f"{where} slab entry holds a non-integer")
        indexes = [row[0] for row in batch]
        if indexes[0] <= previous or any(map(operator.ge, indexes, indexes[1:])):
            for index in indexes:  # name the first out of order
                if index <= previous:
                    break
                previous = index
            raise FormatError(f"{where} slab entries are not strictly ascending at {index}")
        previous = indexes[-1]
        if lengths == {3}:  # one extent per slab: the common case of a big map
            placements = [[(row[1], row[2])] for row in batch]
        else:
            placements = [list(zip(row[1::2], row[2::2], strict=True)) for row in batch]
        dict.update(slabs, zip(indexes, placements, strict=True))  # nothing dirty yet
    return slabs


def parse_slab_rows(where: str, rows: object) -> dict[int, list[tuple[int, int]]]:
    """Slab rows as `slab_rows` writes them (strictly ascending); ranges: `validate`."""
    return _slab_map(where, rows)


def parse_tier_rows(where: str, flat: object) -> dict[int, tuple[int, bool]]:
    """A flat tier map as `tier_rows` writes it (strictly ascending); ranges: `validate`."""
    return _tier_info(where, {"unit": 0, "ssd": "", "hdd": "", "map": flat, "pins": []}).map


def _tier_info(where: str, obj: object, maps: bool = True) -> TierInfo:
    """Shape and types of a "tiers" object; ranges are checked by `validate`."""
    keys = _TIER_KEYS if maps else _TIER_KEYS - {"map"}
    fields = _exact_keys(f"{where} tiers", obj, keys)
    flat = _list(f"{where} tier map", fields["map"] if maps else [])
    if len(flat) % 3 or any(type(n) is not int for n in flat):
        raise FormatError(f"{where} tier map is not [unit, slot, dirty, ...] integers")
    tier_map: dict[int, tuple[int, bool]] = TrackedMap()
    previous = -1
    for i in range(0, len(flat), 3):
        index, slot, dirty = flat[i : i + 3]
        if index <= previous:
            raise FormatError(f"{where} tier map is not strictly ascending at {index}")
        if dirty not in (0, 1):
            raise FormatError(f"{where} tier map dirty flag is not 0 or 1")
        previous = index
        tier_map[index] = (slot, bool(dirty))
    pins = []
    for pin in _list(f"{where} tier pins", fields["pins"]):
        if not isinstance(pin, list) or len(pin) != 3:
            raise FormatError(f"{where} tier pin is not [offset, length, tier]")
        pins.append((pin[0], pin[1], pin[2]))
    return TierInfo(fields["unit"], fields["ssd"], fields["hdd"], tier_map, pins)


def metadata_from_document(document: object, *, maps: bool = True,
                           check: bool = True) -> PoolMetadata:
    """The metadata a (strict-JSON) document describes, validated; FormatError otherwise.
    Without `maps`: the small part (`metadata_document(maps=False)`), maps left empty.
    Without `check`: shapes and types only; the caller runs `validate` (once, after replay)."""
    return _from_document(document, maps, check)


def _from_document(document: object, maps: bool = True, check: bool = True) -> PoolMetadata:
    top = _exact_keys("pool metadata", document, _TOP_KEYS, _TOP_OPTIONAL)
    volume_keys = _VOLUME_KEYS if maps else _VOLUME_KEYS - {"slabs"}
    disks = []
    for entry in _list("pool metadata disks", top["disks"]):
        fields = _exact_keys("pool metadata disk", entry, _DISK_KEYS, _DISK_OPTIONAL)
        disks.append(DiskRecord(**fields))
    volumes = []
    for entry in _list("pool metadata volumes", top["volumes"]):
        fields = _exact_keys("pool metadata volume", entry, volume_keys, _VOLUME_OPTIONAL)
        where = f"volume {fields['name']!r:.70}"
        fields["slabs"] = _slab_map(where, fields["slabs"] if maps else [])
        if "tiers" in fields:
            fields["tiers"] = _tier_info(where, fields["tiers"], maps)
        if "codec" in fields:
            codec = _exact_keys(f"{where} codec", fields["codec"], _CODEC_KEYS)
            fields["codec"] = CodecInfo(**codec)
        volumes.append(VolumeRecord(**fields))
    md = PoolMetadata(
        pool_uuid=top["pool_uuid"],
        name=top["name"],
        generation=top["generation"],
        slab_size=top["slab_size"],
        meta_slot_size=top["meta_slot_size"],
        disks=disks,
        volumes=volumes,
        next_disk_id=top["next_disk_id"],
        opened_seq=top.get("opened_seq", 0),
    )
    if check:
        validate(md, decoded=True)
    for volume in md.volumes:
        volume.created = float(volume.created)
    return md


def decode_metadata(raw: BytesLike, pool_uuid: str | None = None) -> PoolMetadata:
    """Parse and validate one metadata slot (`raw` may include the slot's unused tail).

    If `pool_uuid` is given, metadata of any other pool is rejected. Raises FormatError.
    """
    if not isinstance(raw, BytesLike):
        raise TypeError(f"metadata must be bytes, not {type(raw).__name__}")
    raw = bytes(raw)
    expected_uuid = None if pool_uuid is None else uuid.UUID(pool_uuid).bytes
    if len(raw) < META_HEADER_SIZE:
        raise FormatError(f"pool metadata is truncated ({len(raw)} bytes)")
    magic, version, flags, generation, payload_len, checksum, uuid_bytes = _HEADER.unpack_from(raw)
    if magic != META_MAGIC:
        raise FormatError("no pool metadata here (bad magic)")
    check_format_version(version, META_VERSION, "metadata")
    if flags != 0:
        raise FormatError(f"pool metadata has unknown flags {flags:#x}")
    if raw[_HEADER.size - 8 : _HEADER.size].strip(b"\0"):
        raise FormatError("pool metadata header reserved bytes are not zero")
    if expected_uuid is not None and uuid_bytes != expected_uuid:
        raise FormatError(
            f"pool metadata belongs to pool {uuid.UUID(bytes=uuid_bytes)}, not {pool_uuid}"
        )
    if payload_len > len(raw) - META_HEADER_SIZE:
        raise FormatError(
            f"pool metadata payload length {payload_len} runs past the end of the slot"
        )
    payload = raw[META_HEADER_SIZE : META_HEADER_SIZE + payload_len]
    if xxhash.xxh3_64_intdigest(payload) != checksum:
        raise FormatError("pool metadata checksum mismatch")
    document = _decompress(payload, _json_cap(len(raw)))
    parsed = decode_json_body(document, "pool metadata")
    md = _from_document(parsed)
    if md.generation != generation:
        raise FormatError(
            f"pool metadata generation mismatch: header {generation}, body {md.generation}"
        )
    if uuid.UUID(md.pool_uuid).bytes != uuid_bytes:
        raise FormatError("pool metadata uuid mismatch between header and body")
    return md


def snapshot(md: PoolMetadata) -> PoolMetadata:
    """A copy of `md` that later changes to `md` do not reach, cheap enough for the trio
    thread (each map copied by dict.copy; slab placements and tier entries are replaced,
    never changed in place), so a checkpoint can be encoded from it in a worker thread."""
    volumes = []
    for v in md.volumes:
        tiers = None
        if v.tiers is not None:
            tiers = dataclasses.replace(v.tiers, map=TrackedMap(v.tiers.map),
                                        pins=list(v.tiers.pins))
        volumes.append(dataclasses.replace(v, slabs=TrackedMap(v.slabs), layout=dict(v.layout),
                                           tiers=tiers))
    return dataclasses.replace(md, disks=[dataclasses.replace(d) for d in md.disks],
                               volumes=volumes)


def validate_small(md: PoolMetadata) -> None:
    """`validate` of everything but the maps (what a journal record carries whole): its
    cost follows the number of disks and volumes only."""
    volumes = [
        dataclasses.replace(
            v, slabs={}, tiers=None if v.tiers is None else dataclasses.replace(v.tiers, map={}))
        for v in md.volumes
    ]
    validate(dataclasses.replace(md, volumes=volumes))


def validate_slabs(md: PoolMetadata, volume: VolumeRecord, indexes: Iterable[int]) -> None:
    """`validate`'s checks of some of a volume's slab-map entries (index range, width,
    known disks, extents inside them, distinct disks), what a journal record carries; an
    extent used twice across the map is the allocator's to prevent, and the replay's
    final `validate` to catch."""
    width = layout_width(volume.layout)
    slab_data = int(volume.layout["columns"]) * md.slab_size
    slab_count = -(-volume.size // slab_data)
    disks = {d.disk_id: d for d in md.disks}
    where = f"volume {volume.name}"
    for index in indexes:
        _int(f"{where} slab index", index, 0, slab_count - 1)
        _validate_placement(f"{where} slab {index}", volume.slabs[index], width, disks, set())
