"""Disk label: geometry arithmetic, round trips, and rejection of damage or forgery."""

import dataclasses
import json
import struct
import uuid
from typing import Any

import pytest
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from blockspace.errors import FormatError, InvalidInput
from blockspace.ondisk.label import (
    BLOCK,
    FORMAT_VERSION,
    LABEL_MAGIC,
    LABEL_SIZE,
    MEDIA,
    DiskGeometry,
    DiskLabel,
    compute_geometry,
    decode_label,
    encode_label,
    pick_label,
    validate_name,
)

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30

POOL_UUID = "3f2b6c1e-8a4d-4c6b-9f1e-2d3c4b5a6978"
DISK_UUID = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"


def make_label(**changes: Any) -> DiskLabel:
    fields: dict[str, Any] = {
        "pool_uuid": POOL_UUID,
        "pool_name": "tank",
        "disk_uuid": DISK_UUID,
        "disk_id": 3,
        "media": "ssd",
        "geometry": compute_geometry(GIB, 64 * MIB, 4 * MIB),
        "created": 1_700_000_000.25,
    }
    fields.update(changes)
    return DiskLabel(**fields)


def body_of(label: DiskLabel) -> dict[str, Any]:
    raw = encode_label(label)
    (body_len,) = struct.unpack_from("<I", raw, 12)
    return json.loads(raw[24 : 24 + body_len])


def seal(body: bytes | dict[str, Any], version: int = FORMAT_VERSION) -> bytes:
    """A label block with a *valid* checksum over arbitrary (possibly malicious) content."""
    if isinstance(body, dict):
        body = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    header = struct.pack("<8sIIQ", LABEL_MAGIC, version, len(body), xxhash.xxh3_64_intdigest(body))
    return (header + body).ljust(LABEL_SIZE, b"\0")


def tampered(**changes: Any) -> bytes:
    body = body_of(make_label())
    body.update(changes)
    return seal(body)


# ---- geometry -------------------------------------------------------------------------------


def test_geometry_example_1g_disk_64m_slabs() -> None:
    g = compute_geometry(GIB, 64 * MIB, 4 * MIB)
    assert g.meta_offset == LABEL_SIZE
    # label 4K + two 4M slots = 8M + 4K, rounded up to the next MiB
    assert g.data_start == 9 * MIB
    # 64M slab = 16384 blocks * 16 bytes of checksum = 256K reserved after the data
    assert g.extent_stride == 64 * MIB + 256 * KIB
    assert g.backup_label_offset == GIB - LABEL_SIZE
    # (1G - 4K - 9M) // (64M + 256K) = 15
    assert g.extent_count == 15
    assert g.extent_offset(0) == 9 * MIB
    assert g.extent_offset(1) == 9 * MIB + 64 * MIB + 256 * KIB
    assert g.checksum_offset(0) == 9 * MIB + 64 * MIB
    assert g.checksum_area_size == 256 * KIB
    last_end = g.extent_offset(14) + g.extent_stride
    assert last_end <= g.backup_label_offset
    assert g.meta_slot_offset(0) == LABEL_SIZE
    assert g.meta_slot_offset(1) == LABEL_SIZE + 4 * MIB


@pytest.mark.parametrize(
    ("slab_size", "stride"),
    [(MIB, MIB + 4 * KIB), (64 * MIB, 64 * MIB + 256 * KIB), (4 * GIB, 4 * GIB + 16 * MIB)],
)
def test_stride_includes_checksum_area(slab_size: int, stride: int) -> None:
    assert compute_geometry(1 << 40, slab_size, 64 * KIB).extent_stride == stride


def test_unaligned_disk_size_puts_backup_in_last_whole_block() -> None:
    g = compute_geometry(GIB + 1000, 64 * MIB, 4 * MIB)
    assert g.backup_label_offset == GIB - LABEL_SIZE
    assert g.disk_size == GIB + 1000


@pytest.mark.parametrize("extent", [-1, 15, 10**9])
def test_extent_offset_out_of_range(extent: int) -> None:
    g = compute_geometry(GIB, 64 * MIB, 4 * MIB)
    with pytest.raises(ValueError, match="out of range"):
        g.extent_offset(extent)
    with pytest.raises(ValueError, match="out of range"):
        g.checksum_offset(extent)


def test_extent_offset_rejects_non_int() -> None:
    g = compute_geometry(GIB, 64 * MIB, 4 * MIB)
    with pytest.raises(TypeError):
        g.extent_offset(True)
    with pytest.raises(ValueError):
        g.meta_slot_offset(2)


def test_minimum_disk_holds_exactly_one_extent() -> None:
    slab, slot = 64 * MIB, 4 * MIB
    minimum = 9 * MIB + (64 * MIB + 256 * KIB) + LABEL_SIZE
    assert compute_geometry(minimum, slab, slot).extent_count == 1
    with pytest.raises(InvalidInput) as err:
        compute_geometry(minimum - 1, slab, slot)
    assert str(err.value) == (
        "disk of 73.3M is too small: it needs at least 73.3M for slab size 64M"
    )


def test_too_small_message() -> None:
    with pytest.raises(InvalidInput) as err:
        compute_geometry(10 * MIB, 64 * MIB, 4 * MIB)
    assert str(err.value) == ("disk of 10M is too small: it needs at least 73.3M for slab size 64M")


@pytest.mark.parametrize(
    "slab_size", [0, -MIB, MIB // 2, 3 * MIB, 8 * GIB, MIB + 1, 6 * GIB, True, 2.0 * MIB]
)
def test_bad_slab_size(slab_size: Any) -> None:
    with pytest.raises(InvalidInput):
        compute_geometry(100 * GIB, slab_size, 4 * MIB)


@pytest.mark.parametrize(
    "slot", [0, 4096, 60 * KIB, 64 * KIB + 1, 64 * KIB + 512, -64 * KIB, 2 * GIB]
)
def test_bad_meta_slot_size(slot: int) -> None:
    with pytest.raises(InvalidInput):
        compute_geometry(100 * GIB, 64 * MIB, slot)


def test_absurd_disk_size_rejected() -> None:
    with pytest.raises(InvalidInput, match="too large"):
        compute_geometry(1 << 70, 64 * MIB, 4 * MIB)
    with pytest.raises(InvalidInput, match="too small"):
        compute_geometry(-GIB, 64 * MIB, 4 * MIB)


@given(
    disk_size=st.integers(0, 1 << 44),
    slab_shift=st.integers(20, 32),
    slot_blocks=st.integers(16, 4096),
)
def test_geometry_invariants(disk_size: int, slab_shift: int, slot_blocks: int) -> None:
    slab_size, slot = 1 << slab_shift, slot_blocks * BLOCK
    big = compute_geometry(1 << 50, slab_size, slot)
    if disk_size < big.data_start + big.extent_stride + LABEL_SIZE:
        with pytest.raises(InvalidInput, match="too small"):
            compute_geometry(disk_size, slab_size, slot)
        return
    g = compute_geometry(disk_size, slab_size, slot)
    assert g.extent_count >= 1
    assert g.data_start % MIB == 0
    assert g.data_start >= g.meta_offset + 2 * slot
    assert g.extent_stride % BLOCK == 0
    assert g.extent_stride - slab_size >= slab_size // BLOCK * 16
    assert g.backup_label_offset % BLOCK == 0
    assert g.backup_label_offset + LABEL_SIZE <= disk_size
    end = g.extent_offset(g.extent_count - 1) + g.extent_stride
    assert end <= g.backup_label_offset
    # maximal: one more extent would not fit
    assert end + g.extent_stride > g.backup_label_offset


# ---- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "tank", "Pool-1", "x.y_z", "0", "a" * 64, "9-._"])
def test_valid_names(name: str) -> None:
    assert validate_name("pool", name) == name


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", "-a", "_a", ".a", "a" * 65, "a/b", "a b", "é", "a\n", "a\0", "ä", 5, None],
)
def test_invalid_names(name: Any) -> None:
    with pytest.raises(InvalidInput) as err:
        validate_name("volume", name)
    assert str(err.value) == (
        f"invalid volume name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
        "starting with a letter or digit"
    )


# ---- round trips ----------------------------------------------------------------------------


def test_round_trip() -> None:
    label = make_label()
    raw = encode_label(label)
    assert len(raw) == LABEL_SIZE
    assert raw.startswith(LABEL_MAGIC)
    magic, version, body_len, checksum = struct.unpack_from("<8sIIQ", raw)
    body = raw[24 : 24 + body_len]
    assert version == FORMAT_VERSION
    assert checksum == xxhash.xxh3_64_intdigest(body)
    assert body == json.dumps(json.loads(body), separators=(",", ":"), sort_keys=True).encode()
    assert set(raw[24 + body_len :]) == {0}
    assert decode_label(raw) == label


def test_body_has_documented_fields() -> None:
    assert set(body_of(make_label())) == {
        "format_version", "pool_uuid", "pool_name", "disk_uuid", "disk_id", "media",
        "disk_size", "slab_size", "extent_stride", "data_start", "extent_count",
        "meta_offset", "meta_slot_size", "created",
    }  # fmt: skip


def test_integer_created_round_trips_as_float() -> None:
    decoded = decode_label(encode_label(make_label(created=0)))
    assert decoded is not None
    assert isinstance(decoded.created, float)
    assert decoded.created == 0.0


names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)


@st.composite
def labels(draw: st.DrawFn) -> DiskLabel:
    slab_size = 1 << draw(st.integers(20, 32))
    slot = draw(st.integers(16, 1024)) * BLOCK
    minimum = compute_geometry(1 << 50, slab_size, slot)
    low = minimum.data_start + minimum.extent_stride + LABEL_SIZE
    disk_size = draw(st.integers(low, 1 << 50))
    return DiskLabel(
        pool_uuid=str(draw(st.uuids())),
        pool_name=draw(names),
        disk_uuid=str(draw(st.uuids())),
        disk_id=draw(st.integers(0, (1 << 31) - 1)),
        media=draw(st.sampled_from(MEDIA)),
        geometry=compute_geometry(disk_size, slab_size, slot),
        created=draw(st.floats(0, 1 << 40, allow_nan=False)),
    )


@given(labels())
def test_round_trip_property(label: DiskLabel) -> None:
    assert decode_label(encode_label(label)) == label


def test_encode_refuses_invalid_labels() -> None:
    with pytest.raises(ValueError, match="invalid disk label"):
        encode_label(make_label(pool_name="../x"))
    with pytest.raises(ValueError, match="invalid disk label"):
        encode_label(make_label(media="tape"))
    g = compute_geometry(GIB, 64 * MIB, 4 * MIB)
    with pytest.raises(ValueError, match="invalid disk label"):
        encode_label(make_label(geometry=dataclasses.replace(g, extent_count=16)))
    with pytest.raises(ValueError, match="invalid disk label"):
        encode_label(make_label(geometry=dataclasses.replace(g, backup_label_offset=0)))
    with pytest.raises(ValueError, match="invalid disk label"):
        encode_label(make_label(format_version=2))


# ---- not a label ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        bytes(LABEL_SIZE),
        b"\xff" * LABEL_SIZE,
        b"\x53\xef".rjust(1082, b"\0").ljust(LABEL_SIZE, b"\0"),  # ext4-ish superblock bytes
        b"XFSB".ljust(LABEL_SIZE, b"\1"),
        b"BLKSPCMD".ljust(LABEL_SIZE, b"\0"),
    ],
)
def test_no_magic_is_none(raw: bytes) -> None:
    assert decode_label(raw) is None


@pytest.mark.parametrize("length", [0, 24, LABEL_SIZE - 1, LABEL_SIZE + 1, 2 * LABEL_SIZE])
def test_wrong_length(length: int) -> None:
    raw = encode_label(make_label()).ljust(length, b"\0")[:length]
    with pytest.raises(FormatError, match="bytes, expected 4096"):
        decode_label(raw)


def test_bytearray_and_memoryview_accepted() -> None:
    raw = encode_label(make_label())
    assert decode_label(bytearray(raw)) == make_label()
    assert decode_label(memoryview(raw)) == make_label()


# ---- damage ---------------------------------------------------------------------------------


def test_newer_version_message() -> None:
    raw = bytearray(encode_label(make_label()))
    struct.pack_into("<I", raw, 8, 7)
    with pytest.raises(FormatError) as err:
        decode_label(bytes(raw))
    assert str(err.value) == "label format version 7 is newer than this Blockspace supports (1)"


def test_version_zero_rejected() -> None:
    raw = bytearray(encode_label(make_label()))
    struct.pack_into("<I", raw, 8, 0)
    with pytest.raises(FormatError, match="not supported"):
        decode_label(bytes(raw))


@pytest.mark.parametrize("body_len", [0, 1, LABEL_SIZE - 23, LABEL_SIZE, 0xFFFFFFFF])
def test_body_len_out_of_bounds(body_len: int) -> None:
    raw = bytearray(encode_label(make_label()))
    struct.pack_into("<I", raw, 12, body_len)
    with pytest.raises(FormatError, match="out of bounds"):
        decode_label(bytes(raw))


def test_checksum_mismatch() -> None:
    raw = bytearray(encode_label(make_label()))
    raw[40] ^= 0x20
    with pytest.raises(FormatError, match="checksum mismatch"):
        decode_label(bytes(raw))


def test_nonzero_padding_rejected() -> None:
    raw = bytearray(encode_label(make_label()))
    raw[-1] = 1
    with pytest.raises(FormatError, match="padding"):
        decode_label(bytes(raw))


def test_every_single_byte_flip_is_rejected() -> None:
    raw = encode_label(make_label())
    for position in range(LABEL_SIZE):
        for mask in (0x01, 0x80, 0xFF):
            flipped = bytearray(raw)
            flipped[position] ^= mask
            try:
                result = decode_label(bytes(flipped))
            except FormatError:
                assert position >= len(LABEL_MAGIC)
                continue
            assert result is None, f"flip at {position} accepted"
            assert position < len(LABEL_MAGIC)


@settings(max_examples=300)
@given(changes=st.lists(st.tuples(st.integers(0, LABEL_SIZE - 1), st.integers(0, 255)), max_size=8))
def test_random_corruption_never_crashes(changes: list[tuple[int, int]]) -> None:
    raw = bytearray(encode_label(make_label()))
    for position, value in changes:
        raw[position] = value
    try:
        result = decode_label(bytes(raw))
    except FormatError:
        return
    assert result is None or (result == make_label() and bytes(raw) == encode_label(result))


@given(st.binary(min_size=LABEL_SIZE - 8, max_size=LABEL_SIZE - 8))
def test_random_garbage_with_magic(tail: bytes) -> None:
    raw = LABEL_MAGIC + tail
    with pytest.raises(FormatError):
        decode_label(raw)


@given(st.binary(max_size=LABEL_SIZE - 24))
def test_sealed_garbage_body_rejected(body: bytes) -> None:
    if len(body) < 2:
        body = body + b"  "
    with pytest.raises(FormatError):
        decode_label(seal(body))


# ---- crafted, correctly checksummed labels --------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\xfe{}", "UTF-8"),
        (b"{not json", "JSON"),
        (b"[]", "not a JSON object"),
        (b'"tank"', "not a JSON object"),
        (b"null", "not a JSON object"),
        (b"[" * 2000 + b"]" * 2000, "nested too deeply"),
        (b'{"":' * 800 + b"1" + b"}" * 800, "JSON|fields"),
        (b'{"disk_id":1,"disk_id":2}', "duplicate key"),
    ],
)
def test_crafted_body_rejected(body: bytes, reason: str) -> None:
    with pytest.raises(FormatError, match=reason):
        decode_label(seal(body))


def test_duplicate_key_in_full_body_rejected() -> None:
    text = json.dumps(body_of(make_label()), separators=(",", ":"))
    crafted = text[:-1] + ',"disk_id":0}'
    with pytest.raises(FormatError, match="duplicate key"):
        decode_label(seal(crafted.encode()))


def test_missing_and_extra_fields_rejected() -> None:
    body = body_of(make_label())
    del body["media"]
    with pytest.raises(FormatError, match="missing media"):
        decode_label(seal(body))
    body = body_of(make_label())
    body["extents_at"] = 0
    with pytest.raises(FormatError, match="unexpected"):
        decode_label(seal(body))


def test_body_version_must_match() -> None:
    with pytest.raises(FormatError, match="format version"):
        decode_label(tampered(format_version=2))
    with pytest.raises(FormatError, match="format_version is not an integer"):
        decode_label(tampered(format_version=True))


@pytest.mark.parametrize(
    "changes",
    [
        {"disk_id": True},
        {"disk_id": False},
        {"disk_id": "3"},
        {"disk_id": 3.0},
        {"disk_id": None},
        {"disk_id": -1},
        {"disk_id": 1 << 40},
        {"disk_size": True},
        {"disk_size": 10**30},
        {"disk_size": -GIB},
        {"disk_size": float(GIB)},
        {"slab_size": "64M"},
        {"slab_size": [64 * MIB]},
        {"meta_slot_size": {"size": 4}},
        {"extent_count": False},
        {"extent_count": -1},
        {"data_start": 1 << 80},
        {"created": "yesterday"},
        {"created": True},
        {"created": -1.0},
        {"created": 1e300},
        {"created": 10**400},
        {"created": -(10**400)},
        {"created": None},
        {"pool_uuid": 5},
        {"pool_uuid": "not-a-uuid"},
        {"pool_uuid": POOL_UUID.upper()},
        {"pool_uuid": "{" + POOL_UUID + "}"},
        {"pool_uuid": POOL_UUID.replace("-", "")},
        {"disk_uuid": ""},
        {"disk_uuid": "urn:uuid:" + DISK_UUID},
        {"media": "tape"},
        {"media": "SSD"},
        {"media": ["ssd"]},
        {"pool_name": ""},
        {"pool_name": "../../etc"},
        {"pool_name": "a" * 65},
        {"pool_name": 7},
        {"pool_name": "tank\x1b[2J"},
    ],
)
def test_crafted_field_values_rejected(changes: dict[str, Any]) -> None:
    with pytest.raises(FormatError):
        decode_label(tampered(**changes))


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e400"])
def test_non_finite_created_rejected(constant: str) -> None:
    text = json.dumps(body_of(make_label()), separators=(",", ":"), sort_keys=True)
    text = text.replace('"created":1700000000.25', f'"created":{constant}')
    assert constant in text
    with pytest.raises(FormatError):
        decode_label(seal(text.encode()))


@pytest.mark.parametrize(
    "changes",
    [
        # a crafted geometry must not point extents anywhere but where the sizes say
        {"extent_count": 16},
        {"extent_count": 1000},
        {"extent_count": 0},
        {"data_start": 0},
        {"data_start": 4096},
        {"extent_stride": 64 * MIB},
        {"meta_offset": 0},
        {"disk_size": 2 * GIB},  # more disk than the stored extent_count says
        {"disk_size": 10 * MIB},  # too small for even one extent
        {"slab_size": 3 * MIB},
        {"slab_size": 8 * GIB},
        {"meta_slot_size": 12345},
        {"meta_slot_size": 1 << 40},
    ],
)
def test_inconsistent_geometry_rejected(changes: dict[str, Any]) -> None:
    with pytest.raises(FormatError, match="geometry|out of range"):
        decode_label(tampered(**changes))


def test_consistent_alternative_geometry_accepted() -> None:
    g = compute_geometry(2 * GIB, MIB, 64 * KIB)
    assert decode_label(tampered(**{
        "disk_size": g.disk_size, "slab_size": g.slab_size, "meta_slot_size": g.meta_slot_size,
        "extent_stride": g.extent_stride, "data_start": g.data_start,
        "extent_count": g.extent_count, "meta_offset": g.meta_offset,
    })) == make_label(geometry=g)  # fmt: skip


# ---- primary and backup ---------------------------------------------------------------------


def test_pick_prefers_primary() -> None:
    primary = make_label(disk_id=1)
    backup = make_label(disk_id=2)
    assert pick_label(encode_label(primary), encode_label(backup)) == primary
    assert pick_label(encode_label(primary), encode_label(primary)) == primary


def test_pick_falls_back_to_backup() -> None:
    label = make_label()
    damaged = bytearray(encode_label(label))
    damaged[100] ^= 0xFF
    assert pick_label(bytes(damaged), encode_label(label)) == label
    assert pick_label(bytes(LABEL_SIZE), encode_label(label)) == label
    assert pick_label(b"", encode_label(label)) == label


def test_pick_primary_with_damaged_backup() -> None:
    label = make_label()
    damaged = bytearray(encode_label(label))
    damaged[100] ^= 0xFF
    assert pick_label(encode_label(label), bytes(damaged)) == label
    assert pick_label(encode_label(label), bytes(LABEL_SIZE)) == label


def test_pick_none_when_no_magic() -> None:
    assert pick_label(bytes(LABEL_SIZE), bytes(LABEL_SIZE)) is None
    assert pick_label(b"\xaa" * LABEL_SIZE, bytes(LABEL_SIZE)) is None


def test_pick_both_damaged() -> None:
    damaged = bytearray(encode_label(make_label()))
    damaged[100] ^= 0xFF
    with pytest.raises(FormatError, match="both copies of the disk label are damaged"):
        pick_label(bytes(damaged), bytes(damaged))
    with pytest.raises(FormatError, match="both copies of the disk label are damaged"):
        pick_label(bytes(damaged), bytes(LABEL_SIZE))
    with pytest.raises(FormatError, match="both copies of the disk label are damaged"):
        pick_label(bytes(LABEL_SIZE), bytes(damaged))


def test_labels_of_different_pools_are_distinct() -> None:
    other = make_label(pool_uuid=str(uuid.UUID(int=1)))
    assert decode_label(encode_label(other)) != make_label()


def test_geometry_is_frozen() -> None:
    g = compute_geometry(GIB, 64 * MIB, 4 * MIB)
    assert isinstance(g, DiskGeometry)
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.extent_count = 100  # type: ignore[misc]
