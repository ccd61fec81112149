"""Disk label: the 4 KiB self-description at the start (and, as a backup, the end) of every disk.

Layout of one label block (little-endian)::

    magic b"BLKSPCLB" | u32 format version | u32 body length | u64 xxh3_64(body) | body | zeros

The body is compact UTF-8 JSON with sorted keys. Decoding trusts nothing: every field is
type- and range-checked and the geometry must be exactly what `compute_geometry` derives
from the disk size, slab size and metadata slot size, so a crafted label cannot point
extents (or metadata) outside the disk. Pure code: bytes in, objects out, no I/O.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from blockspace.errors import FormatError, InvalidInput
from blockspace.ondisk.framing import BLOCK_HEADER, decode_json_body, frame_block, unframe_block
from blockspace.units import format_size

FORMAT_VERSION = 1
BLOCK = 4096
LABEL_SIZE = 4096
LABEL_MAGIC = b"BLKSPCLB"
MEDIA = ("ssd", "hdd")

MIB = 1 << 20
GIB = 1 << 30
MIN_SLAB_SIZE = MIB
MAX_SLAB_SIZE = 4 * GIB
MIN_META_SLOT_SIZE = 64 * 1024
MAX_META_SLOT_SIZE = GIB  # a slot is read whole into memory: bound what a label can ask for
MAX_DISK_SIZE = 1 << 60  # 1 EiB
MAX_DISK_ID = 1 << 31
MAX_TIMESTAMP = float(1 << 40)  # seconds since the epoch; ~34,000 years
DATA_ALIGN = MIB
CHECKSUM_BYTES_PER_BLOCK = 16
INTENT_SLOT_SIZE = 64 * 1024  # write-intent log: two slots after the metadata slots
# The writer's lease (blockspace/ondisk/lease.py): one block right after the intent slots, in
# the padding up to `data_start`. That padding is never empty: the intent slots end on a 4 KiB
# boundary that is never a MiB boundary (it would need a slot size of 2 KiB modulo 4 KiB), so
# every label, old or new, has room for it without moving `data_start`.
LEASE_SIZE = 4096

BytesLike = bytes | bytearray | memoryview

HEADER_SIZE = BLOCK_HEADER.size  # 24
MAX_BODY_LEN = LABEL_SIZE - HEADER_SIZE

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", re.ASCII)

_BODY_KEYS = frozenset(
    {
        "format_version",
        "pool_uuid",
        "pool_name",
        "disk_uuid",
        "disk_id",
        "media",
        "disk_size",
        "slab_size",
        "extent_stride",
        "data_start",
        "extent_count",
        "meta_offset",
        "meta_slot_size",
        "created",
    }
)


def align_up(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment


def align_down(value: int, alignment: int) -> int:
    return value // alignment * alignment


def _is_int(value: object) -> bool:
    """A real JSON integer: `bool` is an `int` subclass in Python but not a number here."""
    return type(value) is int


@dataclass(frozen=True)
class DiskGeometry:
    """Where everything lives on one disk. All offsets and sizes are in bytes."""

    disk_size: int
    slab_size: int
    meta_slot_size: int
    meta_offset: int
    data_start: int
    extent_stride: int
    extent_count: int
    backup_label_offset: int
    lease_offset: int

    def _check_extent(self, extent: int) -> None:
        if not _is_int(extent):
            raise TypeError(f"extent index must be an int, not {type(extent).__name__}")
        if not 0 <= extent < self.extent_count:
            raise ValueError(f"extent {extent} out of range (disk has {self.extent_count})")

    def extent_offset(self, extent: int) -> int:
        """Byte offset of extent `extent`'s data. ValueError if the extent does not exist."""
        self._check_extent(extent)
        return self.data_start + extent * self.extent_stride

    def checksum_offset(self, extent: int) -> int:
        """Byte offset of extent `extent`'s reserved checksum area (right after its data)."""
        return self.extent_offset(extent) + self.slab_size

    @property
    def checksum_area_size(self) -> int:
        return self.extent_stride - self.slab_size

    def intent_slot_offset(self, slot: int) -> int:
        """Byte offset of write-intent slot 0 or 1 (right after the metadata slots)."""
        if slot not in (0, 1) or not _is_int(slot):
            raise ValueError(f"intent slot must be 0 or 1, not {slot!r}")
        return self.meta_offset + 2 * self.meta_slot_size + slot * INTENT_SLOT_SIZE

    def meta_slot_offset(self, slot: int) -> int:
        """Byte offset of metadata slot 0 or 1."""
        if slot not in (0, 1) or not _is_int(slot):
            raise ValueError(f"metadata slot must be 0 or 1, not {slot!r}")
        return self.meta_offset + slot * self.meta_slot_size


@dataclass(frozen=True)
class DiskLabel:
    pool_uuid: str
    pool_name: str
    disk_uuid: str
    disk_id: int
    media: str
    geometry: DiskGeometry
    created: float
    format_version: int = FORMAT_VERSION


def _extent_stride(slab_size: int) -> int:
    return slab_size + align_up(slab_size // BLOCK * CHECKSUM_BYTES_PER_BLOCK, BLOCK)


def compute_geometry(disk_size: int, slab_size: int, meta_slot_size: int) -> DiskGeometry:
    """Derive the layout of a disk. Raises InvalidInput for sizes that cannot make a disk."""
    for what, value in (
        ("disk size", disk_size),
        ("slab size", slab_size),
        ("metadata slot size", meta_slot_size),
    ):
        if not _is_int(value):
            raise InvalidInput(f"invalid {what} {value!r}: not a whole number of bytes")
    if slab_size < MIN_SLAB_SIZE or slab_size > MAX_SLAB_SIZE or slab_size & (slab_size - 1) != 0:
        raise InvalidInput(
            f"invalid slab size {format_size(slab_size)}: use a power of two between "
            f"{format_size(MIN_SLAB_SIZE)} and {format_size(MAX_SLAB_SIZE)}"
        )
    if (
        meta_slot_size % BLOCK != 0
        or meta_slot_size < MIN_META_SLOT_SIZE
        or meta_slot_size > MAX_META_SLOT_SIZE
    ):
        raise InvalidInput(
            f"invalid metadata slot size {format_size(meta_slot_size)}: use a multiple of "
            f"{format_size(BLOCK)} between {format_size(MIN_META_SLOT_SIZE)} and "
            f"{format_size(MAX_META_SLOT_SIZE)}"
        )
    if disk_size > MAX_DISK_SIZE:
        raise InvalidInput(
            f"disk of {format_size(disk_size)} is too large: at most "
            f"{format_size(MAX_DISK_SIZE)} is supported"
        )
    meta_offset = LABEL_SIZE
    intent_end = meta_offset + 2 * meta_slot_size + 2 * INTENT_SLOT_SIZE
    data_start = align_up(intent_end, DATA_ALIGN)
    # Cannot happen for a slot size that passed the checks above (see LEASE_SIZE); kept so a
    # change of those constants cannot silently put the lease over the first extent.
    assert data_start - intent_end >= LEASE_SIZE, "no room for the lease block"
    extent_stride = _extent_stride(slab_size)
    minimum = data_start + extent_stride + LABEL_SIZE
    if disk_size < minimum:
        raise InvalidInput(
            f"disk of {format_size(disk_size)} is too small: it needs at least "
            f"{format_size(minimum)} for slab size {format_size(slab_size)}"
        )
    usable_end = align_down(disk_size, BLOCK) - LABEL_SIZE
    extent_count = (usable_end - data_start) // extent_stride
    return DiskGeometry(
        disk_size=disk_size,
        slab_size=slab_size,
        meta_slot_size=meta_slot_size,
        meta_offset=meta_offset,
        data_start=data_start,
        extent_stride=extent_stride,
        extent_count=extent_count,
        backup_label_offset=usable_end,
        lease_offset=intent_end,
    )


def size_problem(geometry: DiskGeometry, device_size: int) -> str | None:
    """Why a device cannot be the disk its label describes (None: it can). A device shorter
    than its label (a member truncated, or a smaller device carrying a copy of its label)
    would fail, or read zeros, at the first extent past its end: it never serves."""
    if device_size < geometry.disk_size:
        return (f"device is {device_size} bytes, label says {geometry.disk_size}: "
                "truncated, or a copy of the label on a smaller device")
    return None


def validate_name(kind: str, name: str) -> str:
    """Check a pool or volume name; return it unchanged. Raises InvalidInput."""
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise InvalidInput(
            f"invalid {kind} name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_uuid(what: str, value: object) -> str:
    """A UUID in canonical form (lowercase, hyphenated), else FormatError."""
    if not isinstance(value, str) or len(value) != 36:
        raise FormatError(f"{what} is not a valid UUID: {value!r:.60}")
    try:
        canonical = str(uuid.UUID(value))
    except ValueError:
        raise FormatError(f"{what} is not a valid UUID: {value!r:.60}") from None
    if canonical != value:
        raise FormatError(f"{what} is not a canonical UUID: {value!r:.60}")
    return value


def _int_field(body: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = body[key]
    if not _is_int(value):
        raise FormatError(f"disk label field {key} is not an integer: {value!r:.40}")
    if not lo <= value <= hi:
        raise FormatError(f"disk label field {key} out of range: {str(value)[:40]}")
    return int(value)


def _str_field(body: dict[str, Any], key: str) -> str:
    value = body[key]
    if not isinstance(value, str):
        raise FormatError(f"disk label field {key} is not a string: {value!r:.40}")
    return value


def timestamp(what: str, value: object) -> float:
    """A creation time: a finite, non-negative JSON number (not a bool)."""
    if type(value) not in (int, float):
        raise FormatError(f"{what} is not a number: {value!r:.40}")
    assert isinstance(value, int | float)
    # Compare before any float conversion: a 400-digit int overflows float(); NaN fails this.
    if not 0 <= value <= MAX_TIMESTAMP:
        raise FormatError(f"{what} out of range: {value!r:.40}")
    return float(value)


def _body_dict(label: DiskLabel) -> dict[str, Any]:
    g = label.geometry
    return {
        "format_version": label.format_version,
        "pool_uuid": label.pool_uuid,
        "pool_name": label.pool_name,
        "disk_uuid": label.disk_uuid,
        "disk_id": label.disk_id,
        "media": label.media,
        "disk_size": g.disk_size,
        "slab_size": g.slab_size,
        "extent_stride": g.extent_stride,
        "data_start": g.data_start,
        "extent_count": g.extent_count,
        "meta_offset": g.meta_offset,
        "meta_slot_size": g.meta_slot_size,
        "created": label.created,
    }


def _label_from_body(body: object) -> DiskLabel:
    """Validate a decoded label body completely; raise FormatError on anything off."""
    if not isinstance(body, dict):
        raise FormatError("disk label body is not a JSON object")
    keys = set(body)
    if keys != _BODY_KEYS:
        missing = sorted(_BODY_KEYS - keys)
        extra = sorted(keys - _BODY_KEYS)
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected {', '.join(repr(k)[:40] for k in extra[:5])}")
        raise FormatError(f"disk label fields wrong: {'; '.join(parts)}")
    version = _int_field(body, "format_version", 0, 1 << 32)
    if version != FORMAT_VERSION:
        raise FormatError(f"disk label body has format version {version}, expected 1")
    pool_uuid = check_uuid("disk label pool_uuid", body["pool_uuid"])
    disk_uuid = check_uuid("disk label disk_uuid", body["disk_uuid"])
    pool_name = _str_field(body, "pool_name")
    try:
        validate_name("pool", pool_name)
    except InvalidInput as exc:
        raise FormatError(f"disk label: {exc}") from None
    disk_id = _int_field(body, "disk_id", 0, MAX_DISK_ID - 1)
    media = _str_field(body, "media")
    if media not in MEDIA:
        raise FormatError(f"disk label media {media!r:.40} is not one of {', '.join(MEDIA)}")
    disk_size = _int_field(body, "disk_size", 0, MAX_DISK_SIZE)
    slab_size = _int_field(body, "slab_size", 0, MAX_SLAB_SIZE)
    meta_slot_size = _int_field(body, "meta_slot_size", 0, MAX_META_SLOT_SIZE)
    stored = {
        key: _int_field(body, key, 0, MAX_DISK_SIZE)
        for key in ("extent_stride", "data_start", "extent_count", "meta_offset")
    }
    created = timestamp("disk label created", body["created"])
    try:
        geometry = compute_geometry(disk_size, slab_size, meta_slot_size)
    except InvalidInput as exc:
        raise FormatError(f"disk label geometry is invalid: {exc}") from None
    for key, value in stored.items():
        expected = getattr(geometry, key)
        if value != expected:
            raise FormatError(
                f"disk label geometry is inconsistent: {key} is {value}, expected {expected}"
            )
    return DiskLabel(
        pool_uuid=pool_uuid,
        pool_name=pool_name,
        disk_uuid=disk_uuid,
        disk_id=disk_id,
        media=media,
        geometry=geometry,
        created=created,
        format_version=version,
    )


def encode_label(label: DiskLabel) -> bytes:
    """Serialize to exactly LABEL_SIZE bytes. ValueError if the label would not decode."""
    body_dict = _body_dict(label)
    try:
        checked = _label_from_body(body_dict)
    except FormatError as exc:
        raise ValueError(f"refusing to encode an invalid disk label: {exc}") from None
    if checked.geometry != label.geometry:
        raise ValueError("refusing to encode an invalid disk label: geometry is inconsistent")
    body_dict["created"] = checked.created
    body = json.dumps(body_dict, sort_keys=True, separators=(",", ":"), allow_nan=False).encode(
        "utf-8"
    )
    if len(body) > MAX_BODY_LEN:  # cannot happen with names of at most 64 characters
        raise ValueError(f"disk label body too large ({len(body)} bytes)")
    return frame_block(LABEL_MAGIC, label.format_version, body, LABEL_SIZE)


def decode_label(raw: BytesLike) -> DiskLabel | None:
    """Parse one label block.

    Returns None if the block does not carry the Blockspace magic (blank disk, other
    filesystem). Raises FormatError if it does but is damaged, newer or inconsistent.
    """
    if not isinstance(raw, BytesLike):
        raise TypeError(f"label must be bytes, not {type(raw).__name__}")
    raw = bytes(raw)
    if len(raw) != LABEL_SIZE:
        raise FormatError(f"disk label is {len(raw)} bytes, expected {LABEL_SIZE}")
    body = unframe_block(raw, LABEL_MAGIC, FORMAT_VERSION, "disk label", "label")
    if body is None:
        return None
    return _label_from_body(decode_json_body(body, "disk label body"))


def pick_label(primary: BytesLike, backup: BytesLike) -> DiskLabel | None:
    """The label of a disk from its two copies: primary if valid, else backup.

    None if neither copy carries the magic (not a Blockspace disk); FormatError if a copy
    does but no copy is valid.
    """
    errors: list[str] = []
    for which, raw in (("primary", primary), ("backup", backup)):
        try:
            label = decode_label(raw)
        except FormatError as exc:
            errors.append(f"{which}: {exc}")
            continue
        if label is not None:
            return label
        errors.append(f"{which}: no Blockspace label")
    if all(err.endswith(": no Blockspace label") for err in errors):
        return None
    raise FormatError(f"both copies of the disk label are damaged ({'; '.join(errors)})")
