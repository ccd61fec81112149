"""Pool metadata format 2: a checkpoint followed by a journal of records, in each slot.

A slot (`meta_slot_size` bytes, two per disk) holds::

    offset 0     checkpoint header (64 bytes, the version-1 header with version 2)
                 magic b"BLKSPCMD" | u32 version 2 | u32 flags 0 | u64 generation
                 | u64 payload length | u64 xxh3_64(payload) | 16 bytes pool UUID | 8 zero bytes
    offset 64    payload: zlib(JSON of the whole state), the version-1 document
    J = align_up(64 + payload length, 4096): the first record; then one record after another,
    each starting on a 4 KiB boundary:
                 record header (64 bytes)
                 magic b"BLKSPCJR" | u32 version 2 | u32 flags (1: seal) | u64 generation
                 | u64 base (the checkpoint's generation) | u64 payload length
                 | 16 bytes pool UUID | u64 xxh3_64(header bytes 0..55 + payload)
                 payload: zlib(JSON {"state", "slabs", "tiers"}), the record padded with zeros
                 to the next 4 KiB boundary

A record carries the change of one commit: the small state (everything but slab maps and
tier maps: disks, volume records, tier fields) and, per volume UUID, the slab-map entries
that changed ("set": rows as in the checkpoint, "free": indexes unmapped) and likewise the
tier-map units. Its generation is the previous one + 1; a seal record (flag 1, empty
payload) repeats the generation before it and says that generation reached every disk.

Replay stops at the first block that is not a record of this pool and this checkpoint, fails
its checksum or does not follow: a torn or stale tail is ignored (each commit wrote only its
own blocks, so a torn one damages nothing earlier). A record that verifies but carries a bad
value is a crafted or corrupt slot: FormatError, one line. Pure code: `Reader` does the I/O.
"""

from __future__ import annotations

import gc
import json
import struct
import uuid
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import xxhash

from blockspace.errors import FormatError, NoSpace
from blockspace.ondisk.framing import check_format_version, decode_json_body
from blockspace.ondisk.label import BLOCK, MAX_DISK_ID, align_up
from blockspace.ondisk.metadata import (
    MAX_VOLUME_SIZE,
    META_HEADER,
    META_HEADER_SIZE,
    META_MAGIC,
    MIN_TIER_UNIT,
    ExtentsInUse,
    PoolMetadata,
    TrackedMap,
    compact_json,
    decode_metadata,
    decompress_bounded,
    json_cap,
    metadata_document,
    metadata_from_document,
    parse_slab_rows,
    parse_tier_rows,
    slab_rows,
    tier_rows,
    validate,
    validate_slabs,
    validate_small,
)

FORMAT_VERSION = 2
RECORD_MAGIC = b"BLKSPCJR"
RECORD_HEADER = struct.Struct("<8sIIQQQ16sQ")
RECORD_HEADER_SIZE = RECORD_HEADER.size
assert RECORD_HEADER_SIZE == 64
FLAG_SEAL = 1
_RECORD_KEYS = frozenset({"state", "slabs", "tiers"})
_DELTA_KEYS = frozenset({"set", "free"})
COMPRESSION = 1  # checkpoints are encoded off the trio thread, but mount decodes them

# A reader of one slot: (offset within the slot, length) -> bytes (short at the slot's end).
Reader = Callable[[int, int], bytes]


# ---------------------------------------------------------------------------------------------
# checkpoints


def encode_checkpoint(md: PoolMetadata, slot_size: int) -> bytes:
    """The whole state as a format-2 checkpoint, padded to 4 KiB. NoSpace if it does not
    fit `slot_size`; ValueError if `md` is invalid (writing it would be a bug)."""
    try:
        validate(md)
    except FormatError as exc:
        raise ValueError(f"refusing to write invalid pool metadata: {exc}") from None
    document = _document_in_pieces(md)
    payload = zlib.compress(document, COMPRESSION)
    total = align_up(META_HEADER_SIZE + len(payload), BLOCK)
    if total > slot_size:
        raise NoSpace(f"pool metadata ({total} bytes) no longer fits the metadata area "
                      f"({slot_size} bytes)")
    if len(document) > json_cap(slot_size):
        raise NoSpace(f"pool metadata ({len(document)} bytes uncompressed) is larger than "
                      "supported")
    header = META_HEADER.pack(META_MAGIC, FORMAT_VERSION, 0, md.generation, len(payload),
                              xxhash.xxh3_64_intdigest(payload), uuid.UUID(md.pool_uuid).bytes)
    return (header + payload).ljust(total, b"\0")


ROWS_PER_PIECE = 2048


def _rows_json(rows: list[Any]) -> str:
    pieces = (json.dumps(rows[i : i + ROWS_PER_PIECE], separators=(",", ":"))[1:-1]
              for i in range(0, len(rows), ROWS_PER_PIECE))
    return "[" + ",".join(piece for piece in pieces if piece) + "]"


def _document_in_pieces(md: PoolMetadata) -> bytes:
    """`compact_json(metadata_document(md))`, but the maps encoded a few thousand rows per
    json.dumps call: a single call over a map of 500k slabs holds the GIL for its whole
    length, which would stall the trio thread however the work is threaded."""
    document = metadata_document(md, maps=False)
    maps: dict[str, str] = {}
    for i, (entry, volume) in enumerate(zip(document["volumes"], md.volumes, strict=True)):
        # A token no JSON string of the document can hold: names and paths have no
        # control characters.
        token = f"\\u0001slabs{i}"
        entry["slabs"] = f"\x01slabs{i}"
        maps[token] = _rows_json(slab_rows(volume.slabs, sorted(volume.slabs)))
        if volume.tiers is not None:
            flat = tier_rows(volume.tiers.map, sorted(volume.tiers.map))
            entry["tiers"]["map"] = f"\x01tiers{i}"
            maps[f"\\u0001tiers{i}"] = _rows_json(flat)
    text = compact_json(document).decode("utf-8")
    for token, encoded in maps.items():
        text = text.replace(f'"{token}"', encoded, 1)
    return text.encode("utf-8")


@dataclass(frozen=True)
class Checkpoint:
    version: int  # 1: a version-1 slot (the whole state, no journal); 2: a checkpoint
    generation: int
    payload_len: int

    @property
    def journal_start(self) -> int:
        return align_up(META_HEADER_SIZE + self.payload_len, BLOCK)


def read_checkpoint(read: Reader, slot_size: int, pool_uuid: str) -> Checkpoint:
    """Check a slot's header and its payload's checksum (without decoding it)."""
    raw = read(0, META_HEADER_SIZE)
    if len(raw) < META_HEADER_SIZE:
        raise FormatError(f"pool metadata is truncated ({len(raw)} bytes)")
    magic, version, flags, generation, length, checksum, uuid_bytes = META_HEADER.unpack(raw)
    if magic != META_MAGIC:
        raise FormatError("no pool metadata here (bad magic)")
    if version != 1:
        check_format_version(version, FORMAT_VERSION, "metadata")
    if flags != 0:
        raise FormatError(f"pool metadata has unknown flags {flags:#x}")
    if raw[META_HEADER_SIZE - 8 :].strip(b"\0"):
        raise FormatError("pool metadata header reserved bytes are not zero")
    if uuid_bytes != uuid.UUID(pool_uuid).bytes:
        raise FormatError(f"pool metadata belongs to pool {uuid.UUID(bytes=uuid_bytes)}, "
                          f"not {pool_uuid}")
    if length > slot_size - META_HEADER_SIZE:
        raise FormatError(f"pool metadata payload length {length} runs past the end of the slot")
    payload = read(META_HEADER_SIZE, length)
    if len(payload) != length or xxhash.xxh3_64_intdigest(payload) != checksum:
        raise FormatError("pool metadata checksum mismatch")
    return Checkpoint(version, generation, length)


def decode_checkpoint(read: Reader, checkpoint: Checkpoint, slot_size: int,
                      pool_uuid: str, *, check: bool = True) -> PoolMetadata:
    """The state of a checkpoint (or of a version-1 slot), validated (unless not `check`:
    the caller validates it, once, after replaying its journal)."""
    if checkpoint.version == 1:
        return decode_metadata(read(0, META_HEADER_SIZE + checkpoint.payload_len), pool_uuid)
    payload = read(META_HEADER_SIZE, checkpoint.payload_len)
    document = decode_json_body(decompress_bounded(payload, json_cap(slot_size)),
                                "pool metadata")
    md = metadata_from_document(document, check=check)
    if md.generation != checkpoint.generation or md.pool_uuid != pool_uuid:
        raise FormatError("pool metadata header and body disagree (generation or pool uuid)")
    return md


# ---------------------------------------------------------------------------------------------
# records


def encode_record(
    md: PoolMetadata,
    base: int,
    slabs: Mapping[str, set[int]],
    units: Mapping[str, set[int]],
) -> bytes:
    """One commit's record: `md`'s small state and the current value of the slab-map
    entries (`slabs`: volume uuid -> indexes) and tier-map units (`units`) that changed.
    Its size follows the change and the number of disks and volumes, never the maps."""
    try:
        validate_small(md)
    except FormatError as exc:
        raise ValueError(f"refusing to write invalid pool metadata: {exc}") from None
    by_uuid = {v.uuid: v for v in md.volumes}
    slab_delta: dict[str, dict[str, list[Any]]] = {}
    for volume_uuid, indexes in slabs.items():
        volume = by_uuid.get(volume_uuid)
        if volume is None or not indexes:
            continue  # deleted: the small state no longer lists it
        mapped = sorted(i for i in indexes if i in volume.slabs)
        try:
            validate_slabs(md, volume, mapped)
        except FormatError as exc:
            raise ValueError(f"refusing to write invalid pool metadata: {exc}") from None
        slab_delta[volume_uuid] = {"set": slab_rows(volume.slabs, mapped),
                                   "free": sorted(i for i in indexes if i not in volume.slabs)}
    unit_delta: dict[str, dict[str, list[Any]]] = {}
    for volume_uuid, changed in units.items():
        volume = by_uuid.get(volume_uuid)
        if volume is None or volume.tiers is None or not changed:
            continue
        tier_map = volume.tiers.map
        unit_delta[volume_uuid] = {"set": tier_rows(tier_map, sorted(u for u in changed
                                                                     if u in tier_map)),
                                   "free": sorted(u for u in changed if u not in tier_map)}
    small = metadata_document(md, maps=False)
    body = compact_json({"state": small, "slabs": slab_delta, "tiers": unit_delta})
    return _frame(md.pool_uuid, md.generation, base, 0, zlib.compress(body, 6))


def encode_seal(pool_uuid: str, generation: int, base: int) -> bytes:
    """The seal record: `generation` (already journaled) reached every disk."""
    return _frame(pool_uuid, generation, base, FLAG_SEAL, b"")


def _frame(pool_uuid: str, generation: int, base: int, flags: int, payload: bytes) -> bytes:
    head = RECORD_HEADER.pack(RECORD_MAGIC, FORMAT_VERSION, flags, generation, base,
                              len(payload), uuid.UUID(pool_uuid).bytes, 0)[:-8]
    checksum = xxhash.xxh3_64_intdigest(head + payload)
    record = head + struct.pack("<Q", checksum) + payload
    return record.ljust(align_up(len(record), BLOCK), b"\0")


@dataclass(frozen=True)
class RecordRef:
    offset: int  # within the slot
    generation: int
    flags: int
    payload_len: int

    @property
    def end(self) -> int:
        return self.offset + align_up(RECORD_HEADER_SIZE + self.payload_len, BLOCK)


@dataclass
class SlotIndex:
    """What a slot holds, found by reading headers and checking checksums, not decoding:
    its checkpoint, the records that follow it, the newest generation, where the next record
    goes, and whether the newest generation is sealed (reached every disk)."""

    checkpoint: Checkpoint
    records: list[RecordRef] = field(default_factory=list)

    @property
    def generation(self) -> int:
        return self.records[-1].generation if self.records else self.checkpoint.generation

    @property
    def sealed(self) -> bool:
        return bool(self.records) and self.records[-1].flags == FLAG_SEAL

    @property
    def tail(self) -> int:
        return self.records[-1].end if self.records else self.checkpoint.journal_start


def _record_at(read: Reader, offset: int, slot_size: int, pool_uuid: bytes, base: int,
               previous: int, sealed: bool) -> RecordRef | None:
    """The record at `offset` if it continues the journal, else None (the end)."""
    if offset + RECORD_HEADER_SIZE > slot_size:
        return None
    raw = read(offset, RECORD_HEADER_SIZE)
    if len(raw) < RECORD_HEADER_SIZE:
        return None
    magic, version, flags, generation, record_base, length, owner, checksum = \
        RECORD_HEADER.unpack(raw)
    if magic != RECORD_MAGIC or owner != pool_uuid or record_base != base:
        return None  # not written after this checkpoint: the end (or a stale block)
    if length > slot_size - offset - RECORD_HEADER_SIZE:
        return None
    payload = read(offset + RECORD_HEADER_SIZE, length)
    if len(payload) != length or xxhash.xxh3_64_intdigest(raw[:-8] + payload) != checksum:
        return None  # torn
    # It verifies, so it was written whole by a Blockspace: a value nobody writes is an error.
    check_format_version(version, FORMAT_VERSION, "metadata journal record")
    if flags not in (0, FLAG_SEAL) or (flags == FLAG_SEAL and length):
        raise FormatError(f"metadata journal record at {offset} has bad flags {flags:#x}")
    if flags == FLAG_SEAL:
        return RecordRef(offset, generation, flags, length) if (
            generation == previous and not sealed) else None
    return RecordRef(offset, generation, flags, length) if generation == previous + 1 else None


def index_slot(read: Reader, slot_size: int, pool_uuid: str) -> SlotIndex:
    """Verify a slot's checkpoint and walk its journal. FormatError if the checkpoint does
    not verify (or a record is crafted); a torn or stale tail just ends the journal."""
    checkpoint = read_checkpoint(read, slot_size, pool_uuid)
    index = SlotIndex(checkpoint)
    if checkpoint.version == 1:
        return index
    owner = uuid.UUID(pool_uuid).bytes
    offset = checkpoint.journal_start
    while True:
        ref = _record_at(read, offset, slot_size, owner, checkpoint.generation,
                         index.generation, index.sealed)
        if ref is None:
            return index
        index.records.append(ref)
        offset = ref.end


@dataclass
class RecordBody:
    state: PoolMetadata  # maps empty
    slabs: dict[str, tuple[dict[int, list[tuple[int, int]]], list[int]]]
    tiers: dict[str, tuple[dict[int, tuple[int, bool]], list[int]]]


def _ascending(where: str, values: object) -> list[int]:
    if not isinstance(values, list) or any(type(v) is not int or v < 0 for v in values):
        raise FormatError(f"{where} is not a list of indexes")
    if any(b <= a for a, b in zip(values, values[1:], strict=False)):
        raise FormatError(f"{where} is not strictly ascending")
    return values


def decode_record(payload: bytes, generation: int, slot_size: int, pool_uuid: str) -> RecordBody:
    """A record's payload, every field checked (cross-references: `replay`)."""
    document = decode_json_body(decompress_bounded(payload, json_cap(slot_size)),
                                "metadata journal record")
    if not isinstance(document, dict) or set(document) != _RECORD_KEYS:
        raise FormatError("metadata journal record must have exactly the keys "
                          + ", ".join(sorted(_RECORD_KEYS)))
    state = metadata_from_document(document["state"], maps=False)
    if state.generation != generation or state.pool_uuid != pool_uuid:
        raise FormatError(f"metadata journal record {generation}: header and body disagree "
                          "(generation or pool uuid)")
    volumes = {v.uuid: v for v in state.volumes}
    body = RecordBody(state, {}, {})
    for kind in ("slabs", "tiers"):
        changes = document[kind]
        if not isinstance(changes, dict):
            raise FormatError(f"metadata journal record {kind} is not an object")
        for volume_uuid, delta in changes.items():
            where = f"metadata journal record {generation} volume {volume_uuid!r:.40} {kind}"
            volume = volumes.get(volume_uuid)
            if volume is None or (kind == "tiers" and volume.tiers is None):
                raise FormatError(f"{where}: no such {'tiered ' if kind == 'tiers' else ''}"
                                  "volume in the record")
            if not isinstance(delta, dict) or set(delta) != _DELTA_KEYS:
                raise FormatError(f"{where} must have exactly the keys free, set")
            free = _ascending(f"{where} free", delta["free"])
            if kind == "slabs":
                mapped: dict[Any, Any] = parse_slab_rows(where, delta["set"])
                body.slabs[volume_uuid] = (mapped, free)
            else:
                mapped = parse_tier_rows(where, delta["set"])
                body.tiers[volume_uuid] = (mapped, free)
            if set(mapped) & set(free):
                raise FormatError(f"{where} both sets and frees an entry")
    return body


def apply_record(md: PoolMetadata, body: RecordBody) -> PoolMetadata:
    """The state after a record: its small state, each volume keeping its maps from `md`
    (by uuid; a new volume starts empty) with the record's changes applied. Not validated
    as a whole (`replay` does that once, at the end)."""
    old = {v.uuid: v for v in md.volumes}
    state = body.state
    for volume in state.volumes:
        previous = old.get(volume.uuid)
        if previous is not None:
            volume.slabs = previous.slabs
            if volume.tiers is not None and previous.tiers is not None:
                volume.tiers.map = previous.tiers.map
        mapped, free = body.slabs.get(volume.uuid, ({}, []))
        for index in free:
            volume.slabs.pop(index, None)
        dict.update(volume.slabs, mapped)  # C speed; what is dirty is cleared by `replay`
        if volume.tiers is not None:
            units, gone = body.tiers.get(volume.uuid, ({}, []))
            for unit in gone:
                volume.tiers.map.pop(unit, None)
            dict.update(volume.tiers.map, units)
    return state


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Python's cyclic collector off while a big map is built: each of its passes walks
    every container made so far, and a map of 500k slabs is millions of them (open spent
    more time there than decoding). What a replay builds holds no cycles to collect."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def replay(read: Reader, index: SlotIndex, slot_size: int, pool_uuid: str) -> PoolMetadata:
    """The newest state of a slot: its checkpoint decoded once, its records applied, the
    result validated once. FormatError on anything that does not check."""
    return replay_counted(read, index, slot_size, pool_uuid)[0]


def replay_counted(read: Reader, index: SlotIndex, slot_size: int, pool_uuid: str
                   ) -> tuple[PoolMetadata, ExtentsInUse | None]:
    """`replay`, and the extents the state uses as its validation counted them (None for a
    format-1 slot, whose decoder validates on its own): the pool's allocator takes them
    instead of counting a big map again."""
    with _collector_paused():
        return _replay(read, index, slot_size, pool_uuid)


def _replay(read: Reader, index: SlotIndex, slot_size: int, pool_uuid: str
            ) -> tuple[PoolMetadata, ExtentsInUse | None]:
    version_1 = index.checkpoint.version == 1
    md = decode_checkpoint(read, index.checkpoint, slot_size, pool_uuid, check=version_1)
    for ref in index.records:
        if ref.flags == FLAG_SEAL:
            continue
        payload = read(ref.offset + RECORD_HEADER_SIZE, ref.payload_len)
        md = apply_record(md, decode_record(payload, ref.generation, slot_size, pool_uuid))
    in_use = None if version_1 else validate(md)
    for volume in md.volumes:  # what replay touched is what the maps hold now: nothing new
        for mapping in (volume.slabs, volume.tiers.map if volume.tiers else None):
            if isinstance(mapping, TrackedMap):
                mapping.take_dirty()
    return md, in_use


# ---------------------------------------------------------------------------------------------
# sizing

FIXED_STATE = 16 << 10  # the top-level fields and a handful of volume records
PER_DISK_STATE = 1 << 10  # one disk record, beside its path hint
MIN_JOURNAL = 16 << 10


# The smallest tier unit a tiered volume gets by default (tiering/admin.py DEFAULT_UNIT): a
# pool's metadata area is sized for tier maps of its ssd capacity in units of this size; a
# tiered volume with a smaller unit is refused if the area cannot hold its map.
SIZED_TIER_UNIT = 1 << 20


def tier_slots_bound(ssd_sizes: Sequence[int], slab_size: int) -> int:
    """How many ssd slots the tier maps of every tiered volume may use, at most, with units
    of `SIZED_TIER_UNIT`: an ssd tier must fit the ssd disks (tiering/admin.py), so the slots
    of all of them together never outnumber the ssd capacity's units."""
    return sum(size // slab_size for size in ssd_sizes) * (slab_size // SIZED_TIER_UNIT)


def max_state_size(disk_sizes: Sequence[int], slab_size: int, path_bytes: int,
                   tier_slots: int = 0) -> int:
    """An upper bound of the encoded state of a pool of these disks with every extent
    mapped (each in a slab of its own, the worst case) and `tier_slots` ssd slots in tier
    maps (each a unit at the widest index), compressed or not: the slot must hold it, so
    that no state the pool can reach fails to be recorded."""
    extents = sum(size // slab_size for size in disk_sizes)
    extent_digits = len(str(max(disk_sizes, default=0) // slab_size))
    index_digits = len(str(MAX_VOLUME_SIZE // slab_size))
    # "[index" + "]," per slab and ",disk,extent" per extent, all at their widest.
    per_extent = index_digits + 3 + len(str(MAX_DISK_ID)) + extent_digits + 2
    # "unit,slot,dirty," per mapped tier unit, all at their widest.
    per_unit = len(str(MAX_VOLUME_SIZE // MIN_TIER_UNIT)) + len(str(tier_slots)) + 1 + 3
    raw = (FIXED_STATE + PER_DISK_STATE * len(disk_sizes) + path_bytes + extents * per_extent
           + tier_slots * per_unit)
    return raw + raw // 1000 + 64  # zlib's worst case: stored blocks, 5 bytes per 16 KiB


def min_slot_size(disk_sizes: Sequence[int], slab_size: int, path_bytes: int,
                  tier_slots: int = 0) -> int:
    """The smallest metadata slot that holds the largest state (`max_state_size`) as a
    checkpoint and leaves a journal of a quarter of that (at least 16 KiB) after it: with the
    journal proportional to the state, a checkpoint's cost spread over the commits that fill
    the journal stays a constant per commit."""
    state = max_state_size(disk_sizes, slab_size, path_bytes, tier_slots)
    return align_up(META_HEADER_SIZE + state + max(MIN_JOURNAL, state // 4), 64 << 10)


# ---------------------------------------------------------------------------------------------
# reading a slot image held in memory (tools, tests)


def bytes_reader(raw: bytes) -> Reader:
    """A Reader over a slot image held in memory."""

    def read(offset: int, length: int) -> bytes:
        return bytes(raw[offset : offset + length])

    return read


def decode_slot(raw: bytes, pool_uuid: str) -> PoolMetadata:
    """The newest state of one whole slot image (either format). FormatError if none."""
    read = bytes_reader(raw)
    return replay(read, index_slot(read, len(raw), pool_uuid), len(raw), pool_uuid)


def mapped_in_write(data: bytes, pool_uuid: str, slot_size: int) -> dict[str, dict[int, Any]]:
    """What one metadata write (a checkpoint or a record, as it went to a device) maps:
    volume name -> slab index -> extents. {} for a seal record."""
    if data[:8] == RECORD_MAGIC:
        header = RECORD_HEADER.unpack_from(data)
        generation, length, flags = header[3], header[5], header[2]
        if flags == FLAG_SEAL:
            return {}
        body = decode_record(bytes(data[RECORD_HEADER_SIZE : RECORD_HEADER_SIZE + length]),
                             generation, slot_size, pool_uuid)
        names = {v.uuid: v.name for v in body.state.volumes}
        return {names[u]: dict(mapped) for u, (mapped, _) in body.slabs.items()}
    read = bytes_reader(data)
    md = decode_checkpoint(read, read_checkpoint(read, slot_size, pool_uuid), slot_size,
                           pool_uuid)
    return {v.name: dict(v.slabs) for v in md.volumes}
