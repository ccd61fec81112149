"""Pool metadata: round trips, validation, and rejection of damaged or crafted slots."""

import copy
import json
import random
import struct
import tracemalloc
import uuid
import zlib
from typing import Any

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockspace.errors import FormatError, NoSpace
from blockspace.ondisk.label import LABEL_SIZE, MEDIA, compute_geometry
from blockspace.ondisk.metadata import (
    COMMIT_HEADROOM,
    MAX_GENERATION,
    META_HEADER_SIZE,
    META_MAGIC,
    META_VERSION,
    DiskRecord,
    PoolMetadata,
    VolumeRecord,
    decode_metadata,
    encode_metadata,
    layout_width,
    validate,
)

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
SLOT = 256 * KIB
POOL_UUID = "3f2b6c1e-8a4d-4c6b-9f1e-2d3c4b5a6978"
HEADER = struct.Struct("<8sIIQQQ16s8x")


def uid(n: int) -> str:
    return str(uuid.UUID(int=n))


def disk_record(disk_id: int, size: int = 4 * GIB, media: str = "ssd", **kw: Any) -> DiskRecord:
    count = compute_geometry(size, 64 * MIB, SLOT).extent_count
    return DiskRecord(disk_id, uid(1000 + disk_id), f"/dev/disk{disk_id}", size, count, media, **kw)


def layout(kind: str = "mirror", columns: int = 1, copies: int = 2, parity: int = 0) -> dict:
    return {
        "kind": kind,
        "columns": columns,
        "copies": copies,
        "parity": parity,
        "interleave": 64 * KIB,
    }


def sample() -> PoolMetadata:
    """4 disks (63 extents each); a 2-way mirror, a simple stripe and a parity volume."""
    disks = [disk_record(i, media=MEDIA[i % 2]) for i in range(4)]
    return PoolMetadata(
        pool_uuid=POOL_UUID,
        name="tank",
        generation=7,
        slab_size=64 * MIB,
        meta_slot_size=SLOT,
        disks=disks,
        volumes=[
            VolumeRecord(
                name="home",
                uuid=uid(1),
                size=200 * MIB,
                layout=layout("mirror", 1, 2, 0),
                provisioning="fixed",
                slabs={0: [(0, 0), (1, 0)], 1: [(2, 0), (3, 0)], 3: [(0, 1), (2, 1)]},
                created=1_700_000_000.5,
            ),
            VolumeRecord(
                name="scratch",
                uuid=uid(2),
                size=GIB,
                layout=layout("simple", 2, 1, 0),
                provisioning="thin",
                slabs={5: [(1, 1), (3, 1)]},
                created=1_700_000_001.0,
            ),
            VolumeRecord(
                name="media.v2",
                uuid=uid(3),
                size=10 * GIB,
                layout=layout("parity", 3, 1, 1),
                provisioning="thin",
                slabs={0: [(0, 2), (1, 2), (2, 2), (3, 2)], 53: [(3, 3), (2, 3), (1, 3), (0, 3)]},
                created=1_700_000_002.0,
            ),
        ],
        next_disk_id=4,
    )


def document(md: PoolMetadata | None = None) -> dict[str, Any]:
    """The decoded JSON body of a valid encoding (to be tampered with)."""
    raw = encode_metadata(md or sample(), SLOT)
    return json.loads(zlib.decompress(raw[META_HEADER_SIZE:]))


def seal(
    body: bytes | dict[str, Any],
    *,
    generation: int | None = None,
    pool_uuid: str = POOL_UUID,
    compress: bool = True,
    version: int = META_VERSION,
    flags: int = 0,
) -> bytes:
    """A metadata block with a *valid* checksum over arbitrary (possibly malicious) content."""
    if isinstance(body, dict):
        if generation is None:
            gen = body.get("generation")
            generation = gen if type(gen) is int and 0 <= gen < 1 << 64 else 0
        body = json.dumps(body, separators=(",", ":")).encode()
    payload = zlib.compress(body) if compress else body
    header = HEADER.pack(
        META_MAGIC,
        version,
        flags,
        generation or 0,
        len(payload),
        xxhash.xxh3_64_intdigest(payload),
        uuid.UUID(pool_uuid).bytes,
    )
    return header + payload


def reject(raw: bytes, match: str | None = None) -> None:
    with pytest.raises(FormatError, match=match):
        decode_metadata(raw)


# ---- basics -------------------------------------------------------------------------------------


def test_round_trip() -> None:
    md = sample()
    raw = encode_metadata(md, SLOT)
    assert decode_metadata(raw) == md
    assert decode_metadata(raw, POOL_UUID) == md
    # the whole slot, with whatever follows the payload, decodes the same
    assert decode_metadata(raw.ljust(SLOT, b"\xee")) == md


def test_header_layout() -> None:
    md = sample()
    raw = encode_metadata(md, SLOT)
    magic, version, flags, generation, length, checksum, pool = HEADER.unpack_from(raw)
    assert (magic, version, flags, generation) == (META_MAGIC, 1, 0, 7)
    assert length == len(raw) - META_HEADER_SIZE
    assert checksum == xxhash.xxh3_64_intdigest(raw[META_HEADER_SIZE:])
    assert pool == uuid.UUID(POOL_UUID).bytes
    assert raw[56:64] == bytes(8)


def test_slab_maps_are_compact_and_sorted() -> None:
    md = sample()
    md.volumes[0].slabs = {3: [(0, 1), (2, 1)], 0: [(0, 0), (1, 0)], 1: [(2, 0), (3, 0)]}
    doc = document(md)
    assert doc["volumes"][0]["slabs"] == [[0, 0, 0, 1, 0], [1, 2, 0, 3, 0], [3, 0, 1, 2, 1]]
    assert decode_metadata(encode_metadata(md, SLOT)).volumes[0].slabs == {
        0: [(0, 0), (1, 0)],
        1: [(2, 0), (3, 0)],
        3: [(0, 1), (2, 1)],
    }


def test_accessors() -> None:
    md = sample()
    assert md.disk(2).disk_id == 2
    assert md.volume("scratch").uuid == uid(2)
    with pytest.raises(KeyError):
        md.disk(9)
    with pytest.raises(KeyError):
        md.volume("nope")
    used = md.used_extents()
    assert len(used) == 2 * 3 + 2 + 4 * 2
    assert len(set(used)) == len(used)
    assert (3, 3) in used


def test_layout_width() -> None:
    assert layout_width(layout("simple", 3, 1, 0)) == 3
    assert layout_width(layout("mirror", 2, 3, 0)) == 6
    assert layout_width(layout("parity", 4, 1, 2)) == 6
    with pytest.raises(ValueError):
        layout_width(layout("raid7"))


def test_empty_pool_round_trips() -> None:
    md = sample()
    md.volumes = []
    assert decode_metadata(encode_metadata(md, SLOT)) == md


def test_pool_uuid_argument_mismatch() -> None:
    raw = encode_metadata(sample(), SLOT)
    with pytest.raises(FormatError, match="belongs to pool"):
        decode_metadata(raw, uid(99))


def test_encode_refuses_invalid_metadata() -> None:
    md = sample()
    md.volumes[1].slabs[5] = [(0, 0), (3, 1)]  # (0, 0) already belongs to "home"
    with pytest.raises(ValueError, match="refusing to write invalid pool metadata"):
        encode_metadata(md, SLOT)


def test_metadata_too_big_is_nospace() -> None:
    md = sample()
    rnd = random.Random(1)
    md.volumes = [
        VolumeRecord(f"vol{i}", str(uuid.UUID(int=rnd.getrandbits(128))), GIB,
                     layout("simple", 1, 1, 0), "thin", {}, 1.0 * i)
        for i in range(6000)
    ]  # fmt: skip
    with pytest.raises(NoSpace) as err:
        encode_metadata(md, 64 * KIB)
    message = str(err.value)
    assert message.startswith("pool metadata (")
    assert message.endswith("bytes) no longer fits the metadata area (65536 bytes)")
    assert decode_metadata(encode_metadata(md, 4 * MIB)) == md


# ---- hypothesis: many volumes and slabs ---------------------------------------------------------

names = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True)


@st.composite
def pools(draw: st.DrawFn) -> PoolMetadata:
    slab_size = draw(st.sampled_from([MIB, 2 * MIB, 64 * MIB]))
    slot = draw(st.sampled_from([64 * KIB, SLOT, 4 * MIB]))
    rnd = draw(st.randoms(use_true_random=False))
    ids = draw(st.lists(st.integers(0, 5000), min_size=1, max_size=8, unique=True))
    uuids = draw(st.lists(st.uuids(), min_size=len(ids) + 12, max_size=len(ids) + 12, unique=True))
    disks = []
    free: dict[int, list[int]] = {}
    for disk_id, disk_uuid in zip(ids, uuids, strict=False):
        big = compute_geometry(1 << 50, slab_size, slot)
        count = draw(st.integers(1, 40))
        size = big.data_start + count * big.extent_stride + LABEL_SIZE
        size += draw(st.integers(0, big.extent_stride - 1))
        assert compute_geometry(size, slab_size, slot).extent_count == count
        disks.append(
            DiskRecord(
                disk_id=disk_id,
                disk_uuid=str(disk_uuid),
                path_hint=draw(st.text(st.characters(exclude_categories=["Cc"]), max_size=40)),
                size=size,
                extent_count=count,
                media=draw(st.sampled_from(MEDIA)),
                state=draw(st.sampled_from(["online", "missing", "failed", "retired"])),
            )
        )
        free[disk_id] = list(range(count))
    volume_names = draw(st.lists(names, max_size=10, unique=True))
    volumes = []
    for name, volume_uuid in zip(volume_names, uuids[len(ids) :], strict=False):
        kind = draw(st.sampled_from(["simple", "mirror", "parity"]))
        columns = draw(st.integers(2 if kind == "parity" else 1, 4))
        copies = draw(st.sampled_from([2, 3])) if kind == "mirror" else 1
        parity = draw(st.sampled_from([1, 2])) if kind == "parity" else 0
        lay: dict[str, int | str] = {
            "kind": kind,
            "columns": columns,
            "copies": copies,
            "parity": parity,
            "interleave": 1 << draw(st.integers(12, slab_size.bit_length() - 1)),
        }
        width = layout_width(lay)
        slab_data = columns * slab_size
        slab_count = draw(st.integers(1, 30))
        size = (slab_count - 1) * slab_data + draw(st.integers(1, slab_data // 4096)) * 4096
        slabs: dict[int, list[tuple[int, int]]] = {}
        for index in range(slab_count):
            candidates = [d for d in free if free[d]]
            if len(candidates) < width or not rnd.random() < 0.8:
                continue
            chosen = rnd.sample(candidates, width)
            slabs[index] = [(d, free[d].pop(rnd.randrange(len(free[d])))) for d in chosen]
        volumes.append(
            VolumeRecord(
                name=name,
                uuid=str(volume_uuid),
                size=size,
                layout=lay,
                provisioning=draw(st.sampled_from(["thin", "fixed"])),
                slabs=slabs,
                created=draw(st.floats(0, 1 << 40, allow_nan=False)),
            )
        )
    return PoolMetadata(
        pool_uuid=str(draw(st.uuids())),
        name=draw(names),
        # A decoded map leaves room for commits (COMMIT_HEADROOM): the top is refused.
        generation=draw(st.integers(0, MAX_GENERATION - COMMIT_HEADROOM)),
        slab_size=slab_size,
        meta_slot_size=slot,
        disks=disks,
        volumes=volumes,
        next_disk_id=max(ids) + draw(st.integers(1, 100)),
    )


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow])
@given(pools())
def test_round_trip_property(md: PoolMetadata) -> None:
    validate(md)
    raw = encode_metadata(md, md.meta_slot_size)
    assert len(raw) <= md.meta_slot_size
    decoded = decode_metadata(raw.ljust(md.meta_slot_size, b"\0"), md.pool_uuid)
    assert decoded == md
    assert encode_metadata(decoded, md.meta_slot_size) == raw


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(pools(), st.data())
def test_random_flips_never_crash(md: PoolMetadata, data: st.DataObject) -> None:
    raw = bytearray(encode_metadata(md, md.meta_slot_size))
    changes = data.draw(
        st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)), max_size=6)
    )
    for position, value in changes:
        raw[position] = value
    try:
        decoded = decode_metadata(bytes(raw))
    except FormatError:
        return
    assert decoded == md


@settings(max_examples=300)
@given(st.binary(max_size=4096))
def test_random_garbage_rejected(garbage: bytes) -> None:
    reject(garbage)
    reject(META_MAGIC + garbage)
    reject(HEADER.pack(META_MAGIC, 1, 0, 0, len(garbage), 0, bytes(16)) + garbage)


@settings(max_examples=300)
@given(st.binary(max_size=4096), st.booleans())
def test_sealed_garbage_rejected(garbage: bytes, compress: bool) -> None:
    reject(seal(garbage, compress=compress))


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda children: st.lists(children) | st.dictionaries(st.text(), children),
        max_leaves=30,
    )
)
def test_sealed_random_json_rejected(value: Any) -> None:
    reject(seal(json.dumps(value).encode()))


# ---- damaged header and payload -----------------------------------------------------------------


def test_every_single_byte_flip_is_rejected() -> None:
    raw = encode_metadata(sample(), SLOT)
    for position in range(len(raw)):
        for mask in (0x01, 0x80, 0xFF):
            flipped = bytearray(raw)
            flipped[position] ^= mask
            with pytest.raises(FormatError):
                decode_metadata(bytes(flipped))


def test_all_zero_slot() -> None:
    reject(bytes(SLOT), "bad magic")


@pytest.mark.parametrize("length", [0, 1, 63])
def test_truncated_header(length: int) -> None:
    reject(encode_metadata(sample(), SLOT)[:length], "truncated")


def test_truncated_payload() -> None:
    raw = encode_metadata(sample(), SLOT)
    reject(raw[:-1], "runs past the end")


def test_newer_version_message() -> None:
    with pytest.raises(FormatError) as err:
        decode_metadata(seal(document(), version=2))
    assert str(err.value) == "metadata format version 2 is newer than this Blockspace supports (1)"
    reject(seal(document(), version=0), "not supported")


def test_flags_and_reserved_must_be_zero() -> None:
    reject(seal(document(), flags=1), "flags")
    raw = bytearray(encode_metadata(sample(), SLOT))
    raw[60] = 1
    reject(bytes(raw), "reserved")


def test_checksum_mismatch() -> None:
    raw = bytearray(encode_metadata(sample(), SLOT))
    raw[META_HEADER_SIZE + 10] ^= 4
    reject(bytes(raw), "checksum mismatch")


def test_generation_must_agree() -> None:
    reject(seal(document(), generation=8), "generation mismatch")


def test_pool_uuid_must_agree() -> None:
    reject(seal(document(), pool_uuid=uid(5)), "uuid mismatch")
    doc = document()
    doc["pool_uuid"] = uid(5)
    with pytest.raises(FormatError):
        decode_metadata(seal(doc, pool_uuid=uid(5)), POOL_UUID)


def test_zlib_errors() -> None:
    body = json.dumps(document()).encode()
    reject(seal(body, compress=False), "zlib")
    compressed = zlib.compress(body)
    for payload, reason in [
        (compressed[:-5], "truncated|zlib"),
        (compressed + b"trailing", "trailing"),
        (compressed + compressed, "trailing"),
        (b"", "truncated|zlib"),
    ]:
        header = HEADER.pack(
            META_MAGIC, 1, 0, 7, len(payload), xxhash.xxh3_64_intdigest(payload),
            uuid.UUID(POOL_UUID).bytes,
        )  # fmt: skip
        reject(header + payload, reason)


def test_decompression_bomb_rejected_without_inflating() -> None:
    compressor = zlib.compressobj(9)
    chunk = b" " * MIB
    parts = [compressor.compress(chunk) for _ in range(256)]  # 256 MiB of JSON whitespace
    payload = b"".join(parts) + compressor.compress(b"{}") + compressor.flush()
    assert len(payload) < 512 * KIB
    header = HEADER.pack(
        META_MAGIC, 1, 0, 0, len(payload), xxhash.xxh3_64_intdigest(payload),
        uuid.UUID(POOL_UUID).bytes,
    )  # fmt: skip
    raw = (header + payload).ljust(SLOT, b"\0")
    tracemalloc.start()
    try:
        with pytest.raises(FormatError, match="compression bomb"):
            decode_metadata(raw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # bounded by the cap (64 x the slot = 16 MiB, plus a copy), not by the 256 MiB inside
    assert peak < 3 * 64 * SLOT


def test_moderate_expansion_over_cap_rejected() -> None:
    # 64 KiB slot -> at most 4 MiB of JSON; this one is 5 MiB (mostly whitespace)
    body = b" " * (5 * MIB) + json.dumps(document()).encode()
    raw = seal(body).ljust(64 * KIB, b"\0")
    assert len(raw) == 64 * KIB
    reject(raw, "compression bomb")


# ---- crafted, correctly checksummed payloads ----------------------------------------------------


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"\xff\xfe\x00{", "UTF-8"),
        (b"{", "JSON"),
        (b"", "JSON"),
        (b"[]", "not a JSON object"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "nested too deeply"),
        (b"1" * 5000, "JSON"),  # more digits than int() will parse
        (b'{"name":"a","name":"b"}', "duplicate key"),
        (b"NaN", "JSON"),
    ],
)
def test_crafted_payload_rejected(body: bytes, reason: str) -> None:
    reject(seal(body), reason)


def mutate(path: str, value: Any, md: PoolMetadata | None = None) -> bytes:
    """`path` like 'volumes.0.layout.kind'; sets (or, with value DELETE, removes) that item."""
    doc = document(md)
    *parents, last = path.split(".")
    target: Any = doc
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    key: Any = int(last) if isinstance(target, list) else last
    if value is DELETE:
        del target[key]
    else:
        target[key] = value
    return seal(doc)


DELETE = object()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        # top level: missing, extra, wrong types, absurd numbers
        ("disks", DELETE),
        ("extra", 1),
        ("generation", -1),
        ("generation", True),
        ("generation", "7"),
        ("generation", 7.0),
        ("generation", 1 << 64),
        ("slab_size", 3 * MIB),
        ("slab_size", 1 << 40),
        ("slab_size", True),
        ("meta_slot_size", 1000),
        ("meta_slot_size", 1 << 50),
        ("next_disk_id", 3),
        ("next_disk_id", 0),
        ("next_disk_id", -5),
        ("next_disk_id", False),
        ("name", "../etc"),
        ("name", ""),
        ("name", None),
        ("pool_uuid", "nope"),
        ("disks", {}),
        ("disks", None),
        ("volumes", "all"),
        # disks
        ("disks.0.disk_id", 1),  # duplicate id
        ("disks.0.disk_id", True),
        ("disks.0.disk_id", -1),
        ("disks.0.disk_id", 1 << 40),
        ("disks.0.disk_uuid", uid(1001)),  # duplicate uuid
        ("disks.0.disk_uuid", "x"),
        ("disks.0.disk_uuid", uid(1001).upper()),
        ("disks.0.size", -1),
        ("disks.0.size", 0),
        ("disks.0.size", 10**30),
        ("disks.0.size", 4.0 * GIB),
        ("disks.0.extent_count", 64),  # more extents than the disk holds
        ("disks.0.extent_count", 60),
        ("disks.0.extent_count", 10**12),
        ("disks.0.media", "floppy"),
        ("disks.0.state", "zombie"),
        ("disks.0.state", None),
        ("disks.0.path_hint", 5),
        ("disks.0.path_hint", "/dev/sda\n\x1b[31m"),
        ("disks.0.path_hint", "x" * 5000),
        ("disks.0.extra", 1),
        ("disks.0.media", DELETE),
        ("disks.0", [0, 1]),
        # volumes
        ("volumes.1.name", "home"),  # duplicate name
        ("volumes.1.uuid", uid(1)),  # duplicate uuid
        ("volumes.1.name", "bad name"),
        ("volumes.1.name", 12),
        ("volumes.1.uuid", None),
        ("volumes.0.size", -4096),
        ("volumes.0.size", 0),
        ("volumes.0.size", 4097),
        ("volumes.0.size", 1 << 70),
        ("volumes.0.size", True),
        ("volumes.0.provisioning", "thick"),
        ("volumes.0.created", -1),
        ("volumes.0.created", "now"),
        ("volumes.0.created", True),
        ("volumes.0.created", 1e300),
        ("volumes.0.created", 10**400),
        ("volumes.0.created", float("nan")),
        ("volumes.0.created", float("inf")),
        ("volumes.0.size", 10**4000),
        ("volumes.0.extra", {}),
        ("volumes.0.slabs", DELETE),
        # layouts
        ("volumes.0.layout.kind", "raid5"),
        ("volumes.0.layout.kind", None),
        ("volumes.0.layout.copies", 4),
        ("volumes.0.layout.copies", 1),
        ("volumes.0.layout.copies", True),
        ("volumes.0.layout.parity", 1),
        ("volumes.0.layout.columns", 0),
        ("volumes.0.layout.columns", 10**6),
        ("volumes.0.layout.columns", 1.0),
        ("volumes.0.layout.interleave", 4095),
        ("volumes.0.layout.interleave", 3 * 4096),
        ("volumes.0.layout.interleave", 128 * MIB),
        ("volumes.0.layout.interleave", 2048),
        ("volumes.0.layout.extra", 1),
        ("volumes.0.layout.kind", DELETE),
        ("volumes.0.layout", "mirror"),
        ("volumes.1.layout.copies", 2),
        ("volumes.1.layout.parity", 1),
        ("volumes.2.layout.parity", 3),
        ("volumes.2.layout.parity", 0),
        ("volumes.2.layout.columns", 1),
        ("volumes.2.layout.copies", 2),
        # slab maps
        ("volumes.0.slabs.0", [0, 0, 0, 0, 5]),  # two extents on one disk
        ("volumes.0.slabs.0", [0, 0, 0, 1, 0, 2, 5]),  # width 3 for a 2-wide mirror
        ("volumes.0.slabs.0", [0, 0, 0]),  # width 1
        ("volumes.0.slabs.0", [0, 0, 0, 1]),  # even length
        ("volumes.0.slabs.0", [0]),
        ("volumes.0.slabs.0", []),
        ("volumes.0.slabs.0", [0, 0, 63, 1, 5]),  # extent beyond the disk (63 extents)
        ("volumes.0.slabs.0", [0, 0, -1, 1, 5]),
        ("volumes.0.slabs.0", [0, 0, 10**18, 1, 5]),
        ("volumes.0.slabs.0", [0, 9, 5, 1, 5]),  # unknown disk
        ("volumes.0.slabs.0", [0, True, 5, 1, 5]),
        ("volumes.0.slabs.0", [0, 0, 5.0, 1, 5]),
        ("volumes.0.slabs.0", [0, "0", 5, 1, 5]),
        ("volumes.0.slabs.0", [0, [0, 5], [1, 5]]),
        ("volumes.0.slabs.0", {"0": [0, 5]}),
        ("volumes.0.slabs.2", [4, 0, 5, 1, 5]),  # index out of range for 200M (4 slabs)
        ("volumes.0.slabs.0", [-1, 0, 5, 1, 5]),
        ("volumes.0.slabs.0", [3, 0, 5, 1, 5]),  # duplicate index 3
        ("volumes.0.slabs.0", [1, 0, 5, 1, 5]),  # duplicate index 1
        ("volumes.0.slabs.0", [2, 0, 5, 1, 5]),  # not ascending: 2, 1, 3
        ("volumes.0.slabs.0", [0, 1, 1, 3, 5]),  # (1, 1) belongs to "scratch"
        ("volumes.0.slabs.0", [0, 0, 1, 1, 5]),  # (0, 1) belongs to slab 3 of the same volume
        ("volumes.2.slabs.1", [53, 3, 3, 2, 3, 1, 3, 0, 0]),  # (0, 0) belongs to "home"
        ("volumes.2.slabs.1", [54, 3, 5, 2, 5, 1, 5, 0, 5]),  # 10G / (3*64M) = 54 slabs
        ("volumes.1.slabs", {}),
        ("volumes.1.slabs", [[5, 1, 1, 3, 1]] * 2),
    ],
)
def test_crafted_fields_rejected(path: str, value: Any) -> None:
    reject(mutate(path, value))


def test_bool_as_int_everywhere_rejected() -> None:
    doc = document()
    text = json.dumps(doc, separators=(",", ":"))
    # each integer 0/1 in the document, one at a time, turned into false/true
    for number, boolean in ((b"0", b"false"), (b"1", b"true")):
        raw = text.encode()
        start = 0
        hits = 0
        while (i := raw.find(number, start)) != -1:
            start = i + 1
            if raw[i - 1 : i] not in (b":", b",", b"[") or raw[i + 1 : i + 2] not in b",]}":
                continue
            crafted = raw[:i] + boolean + raw[i + 1 :]
            hits += 1
            reject(seal(crafted, generation=7))
        assert hits > 3


def test_huge_numbers_everywhere_rejected() -> None:
    for huge in ("18446744073709551616", "-1", "1e20", "99999999999999999999999999999"):
        for key in ("generation", "slab_size", "meta_slot_size", "next_disk_id"):
            doc = document()
            doc[key] = json.loads(huge)
            reject(seal(doc, generation=7))


def test_validate_direct_objects() -> None:
    md = sample()
    in_use = validate(md)
    # what it counted is what the maps use, every disk listed: the allocator takes it at open
    expected: dict[int, set[int]] = {disk.disk_id: set() for disk in md.disks}
    for disk_id, extent in md.used_extents():
        expected[disk_id].add(extent)
    assert in_use == expected
    assert any(in_use.values())
    broken = copy.deepcopy(md)
    broken.disks.append(disk_record(1))
    with pytest.raises(FormatError, match="disk id 1 twice"):
        validate(broken)
    broken = copy.deepcopy(md)
    broken.volumes[0].slabs[0] = [(0, 0)]
    with pytest.raises(FormatError, match="does not have 2 extents"):
        validate(broken)
    broken = copy.deepcopy(md)
    broken.volumes[0].slabs[0] = [(0, 0), (0, 5)]
    with pytest.raises(FormatError, match="two extents on disk 0"):
        validate(broken)
    broken = copy.deepcopy(md)
    broken.volumes[2].slabs[0] = [(0, 0), (1, 2), (2, 2), (3, 2)]
    with pytest.raises(FormatError, match="reuses extent 0 of disk 0"):
        validate(broken)
    broken = copy.deepcopy(md)
    broken.volumes[0].slabs[0] = [(0, 63), (1, 5)]
    with pytest.raises(FormatError, match="beyond disk 0"):
        validate(broken)
    broken = copy.deepcopy(md)
    broken.volumes[0].slabs[0] = [(7, 1), (1, 5)]
    with pytest.raises(FormatError, match="unknown disk 7"):
        validate(broken)
    broken = copy.deepcopy(md)
    broken.next_disk_id = 3
    with pytest.raises(FormatError, match="next disk id"):
        validate(broken)
    broken = copy.deepcopy(md)
    broken.volumes.append(copy.deepcopy(md.volumes[1]))
    broken.volumes[-1].slabs = {}
    with pytest.raises(FormatError, match="volume scratch twice"):
        validate(broken)
    broken = copy.deepcopy(md)
    broken.volumes[0].slabs[4] = [(0, 40), (1, 40)]
    with pytest.raises(FormatError, match="slab index out of range"):
        validate(broken)
    broken = copy.deepcopy(md)
    broken.disks = tuple(md.disks)  # type: ignore[assignment]
    with pytest.raises(FormatError, match="not a list"):
        validate(broken)
    with pytest.raises(FormatError):
        validate("metadata")  # type: ignore[arg-type]


def test_missing_disk_slabs_still_valid() -> None:
    md = sample()
    md.disks[0].state = "missing"
    md.disks[1].state = "failed"
    md.disks[2].state = "retired"
    assert decode_metadata(encode_metadata(md, SLOT)) == md


def test_next_disk_id_with_gaps() -> None:
    md = sample()
    md.disks = [disk_record(0), disk_record(1), disk_record(2), disk_record(3), disk_record(17)]
    md.next_disk_id = 18
    assert decode_metadata(encode_metadata(md, SLOT)) == md


# ---- per-disk error counters (issue 17 item 8) ----------------------------------------------


def test_error_counters_round_trip_and_are_left_out_while_zero() -> None:
    md = sample()
    assert "errors" not in document(md)["disks"][0]  # older readers see nothing new
    md.disks[0].errors.update(read=3, write=1, checksum=70)
    decoded = decode_metadata(encode_metadata(md, SLOT))
    assert decoded.disks[0].errors == {"read": 3, "write": 1, "checksum": 70}
    assert decoded.disks[1].errors == {"read": 0, "write": 0, "checksum": 0}


@pytest.mark.parametrize("counters", [
    {"read": -1, "write": 0, "checksum": 0},
    {"read": 1, "write": 0},
    {"read": 1, "write": 0, "checksum": 0, "other": 1},
    {"read": True, "write": 0, "checksum": 0},
    {"read": 1.5, "write": 0, "checksum": 0},
    {"read": 1 << 63, "write": 0, "checksum": 0},
    [1, 2, 3],
])
def test_crafted_error_counters_are_rejected(counters: Any) -> None:
    body = document()
    body["disks"][0]["errors"] = counters
    reject(seal(body), "error count")


@pytest.mark.parametrize(
    ("volume", "placement", "message"),
    [
        (1, [(0, 0), (1, 1)], "reuses extent 0 of disk 0"),  # another volume's extent
        (0, [(0, True), (1, 5)], "extent is not an integer"),
        (0, [(0, -1), (1, 5)], "extent out of range"),
        (0, [(0, 1, 2), (1, 5)], "not a \\(disk, extent\\) pair"),
        (0, [[0, 9], (1, 5)], None),  # a list pair is as good as a tuple
        (0, "ab", "does not have 2 extents"),
    ],
)
def test_whole_map_checks_reject_what_the_row_checks_reject(
    volume: int, placement: Any, message: str | None
) -> None:
    """Open checks big slab maps by whole-map calls first and row by row only when they
    fail: a fault in any one row is still found, and named."""
    md = sample()
    md.volumes[volume].slabs[2] = placement
    if message is None:
        validate(md)
        return
    with pytest.raises(FormatError, match=message):
        validate(md)


def test_used_extents_are_the_maps_own_pairs() -> None:
    """No new tuple per extent (32 MiB at 500k slabs, at open and in `pool status`)."""
    md = sample()
    pairs = md.used_extents()
    assert pairs == [(d, e) for v in md.volumes for p in v.slabs.values() for d, e in p]
    mapped = [pair for v in md.volumes for p in v.slabs.values() for pair in p]
    assert all(a is b for a, b in zip(pairs, mapped, strict=True))
