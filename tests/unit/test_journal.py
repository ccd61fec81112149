"""The format-2 codec (blockspace/ondisk/journal.py): checkpoints and journal records, pure.

Round trips; a journal replayed up to its first torn, stale or non-following record; every
header field checked; records that carry a valid checksum but a bad value refused with one
line; garbage never raises anything but FormatError; the slot sizing bound."""

import copy
import json
import random
import struct
import uuid
import zlib
from typing import Any

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockspace.errors import FormatError, NoSpace
from blockspace.ondisk.journal import (
    FLAG_SEAL,
    RECORD_HEADER,
    RECORD_MAGIC,
    decode_slot,
    encode_checkpoint,
    encode_record,
    encode_seal,
    index_slot,
    max_state_size,
    min_slot_size,
    replay,
)
from blockspace.ondisk.metadata import PoolMetadata, TrackedMap, encode_metadata, metadata_document
from tests.unit.test_metadata import POOL_UUID, SLOT, sample

BLOCK = 4096


def reader(raw: bytes | bytearray) -> Any:
    return lambda offset, length: bytes(raw[offset : offset + length])


class Slot:
    """A slot image built the way Pool.commit builds it: a checkpoint, then records."""

    def __init__(self, md: PoolMetadata) -> None:
        self.md = md
        self.raw = bytearray(SLOT)
        image = encode_checkpoint(md, SLOT)
        self.raw[: len(image)] = image
        self.base = md.generation
        self.tail = len(image)
        for volume in md.volumes:
            volume.slabs.take_dirty()  # type: ignore[attr-defined]

    def commit(self) -> int:
        self.md.generation += 1
        slabs = {v.uuid: v.slabs.take_dirty() for v in self.md.volumes}  # type: ignore[attr-defined]
        record = encode_record(self.md, self.base, slabs, {})
        return self.put(record)

    def put(self, record: bytes) -> int:
        at = self.tail
        self.raw[at : at + len(record)] = record
        self.tail += len(record)
        return at

    def decode(self) -> PoolMetadata:
        return decode_slot(bytes(self.raw), POOL_UUID)


def same(a: PoolMetadata, b: PoolMetadata) -> bool:
    return bool(metadata_document(a) == metadata_document(b))


def test_checkpoint_and_records_round_trip() -> None:
    md = sample()
    slot = Slot(md)
    assert same(slot.decode(), md)
    home = md.volume("home")
    home.slabs[2] = [(1, 5), (3, 5)]
    slot.commit()
    del home.slabs[0]
    md.volume("scratch").size *= 2
    slot.commit()
    md.volumes.remove(md.volume("media.v2"))
    slot.commit()
    decoded = slot.decode()
    assert decoded.generation == 10
    assert same(decoded, md)
    assert isinstance(decoded.volume("home").slabs, TrackedMap)
    assert not decoded.volume("home").slabs.dirty  # type: ignore[attr-defined]


def test_a_record_holds_only_the_change() -> None:
    """The same one-slab change encodes to the same size whatever the map holds."""
    sizes = []
    for mapped in (10, 3000):
        md = sample()
        volume = md.volume("scratch")
        volume.size = 1 << 50
        volume.slabs.clear()
        for i in range(mapped):
            volume.slabs[i] = [(0, 0), (1, 0)]  # not valid as a whole: encode_record
        volume.slabs.take_dirty()  # type: ignore[attr-defined]
        volume.slabs[mapped] = [(2, 9), (3, 9)]
        md.generation += 1
        record = encode_record(md, 7, {volume.uuid: volume.slabs.take_dirty()}, {})  # type: ignore[attr-defined]
        sizes.append(len(record))
    assert sizes[0] == sizes[1] == BLOCK


def test_replay_stops_at_a_torn_record() -> None:
    md = sample()
    slot = Slot(md)
    slot.commit()
    md.volume("home").slabs[2] = [(1, 5), (3, 5)]
    at = slot.commit()
    slot.raw[at + 100] ^= 1
    decoded = slot.decode()
    assert decoded.generation == 8
    assert 2 not in decoded.volume("home").slabs


def test_replay_stops_at_a_record_that_does_not_follow() -> None:
    md = sample()
    slot = Slot(md)
    slot.commit()  # 8
    md.generation += 1  # 9 is skipped: 10 does not follow 8
    slot.commit()
    assert slot.decode().generation == 8


def test_replay_ignores_a_record_of_another_checkpoint_or_pool() -> None:
    md = sample()
    slot = Slot(md)
    md.generation += 1
    other_base = encode_record(md, slot.base + 100, {}, {})
    slot.put(other_base)
    assert slot.decode().generation == 7
    slot = Slot(sample())
    foreign = copy.deepcopy(slot.md)
    foreign.pool_uuid = str(uuid.UUID(int=99))
    foreign.generation += 1
    slot.put(encode_record(foreign, slot.base, {}, {}))
    assert slot.decode().generation == 7


def test_a_seal_record_marks_the_generation_sealed() -> None:
    md = sample()
    slot = Slot(md)
    slot.commit()
    read = reader(slot.raw)
    assert not index_slot(read, SLOT, POOL_UUID).sealed
    slot.put(encode_seal(POOL_UUID, md.generation, slot.base))
    index = index_slot(read, SLOT, POOL_UUID)
    assert index.sealed
    assert index.generation == 8
    slot.commit()  # a later commit follows the seal
    index = index_slot(reader(slot.raw), SLOT, POOL_UUID)
    assert (index.generation, index.sealed) == (9, False)


def test_a_version_1_slot_is_read_too() -> None:
    md = sample()
    raw = bytearray(SLOT)
    image = encode_metadata(md, SLOT)
    raw[: len(image)] = image
    index = index_slot(reader(raw), SLOT, POOL_UUID)
    assert index.checkpoint.version == 1
    assert same(replay(reader(raw), index, SLOT, POOL_UUID), md)


def test_a_checkpoint_that_does_not_fit_is_nospace() -> None:
    md = sample()
    with pytest.raises(NoSpace):
        encode_checkpoint(md, 1000)


# ---- crafted records: a valid checksum, a bad value --------------------------------------


def forge(slot: Slot, body: Any, *, generation: int | None = None, flags: int = 0,
          version: int = 2, compress: bool = True) -> None:
    """Append a record with a valid checksum around `body` (a JSON-able document)."""
    payload = json.dumps(body).encode() if not isinstance(body, bytes) else body
    if compress:
        payload = zlib.compress(payload)
    gen = slot.md.generation + 1 if generation is None else generation
    head = RECORD_HEADER.pack(RECORD_MAGIC, version, flags, gen, slot.base, len(payload),
                              uuid.UUID(POOL_UUID).bytes, 0)[:-8]
    record = head + struct.pack("<Q", xxhash.xxh3_64_intdigest(head + payload)) + payload
    slot.put(record.ljust(-(-len(record) // BLOCK) * BLOCK, b"\0"))


def good_body(md: PoolMetadata, generation: int) -> dict[str, Any]:
    state = metadata_document(md, maps=False)
    state["generation"] = generation
    return {"state": state, "slabs": {}, "tiers": {}}


def crafted() -> list[tuple[str, Any]]:
    md = sample()
    home = md.volume("home").uuid
    cases: list[tuple[str, Any]] = []

    def case(name: str, change: Any) -> None:
        body = good_body(md, 8)
        change(body)
        cases.append((name, body))

    case("extra key", lambda b: b.update(more=1))
    case("missing key", lambda b: b.pop("tiers"))
    case("slabs not object", lambda b: b.update(slabs=[]))
    case("unknown volume", lambda b: b["slabs"].update({str(uuid.UUID(int=5)): {"set": [],
                                                                                "free": []}}))
    case("delta keys", lambda b: b["slabs"].update({home: {"set": []}}))
    case("free not ints", lambda b: b["slabs"].update({home: {"set": [], "free": ["x"]}}))
    case("free descending", lambda b: b["slabs"].update({home: {"set": [], "free": [3, 1]}}))
    case("set and free", lambda b: b["slabs"].update({home: {"set": [[3, 0, 5, 1, 5]],
                                                              "free": [3]}}))
    case("row shape", lambda b: b["slabs"].update({home: {"set": [[3, 0]], "free": []}}))
    case("extent beyond disk", lambda b: b["slabs"].update(
        {home: {"set": [[2, 0, 10**6, 1, 5]], "free": []}}))
    case("index beyond volume", lambda b: b["slabs"].update(
        {home: {"set": [[10**6, 0, 9, 1, 9]], "free": []}}))
    case("extent used twice", lambda b: b["slabs"].update(
        {home: {"set": [[2, 0, 0, 1, 0]], "free": []}}))
    case("wrong width", lambda b: b["slabs"].update({home: {"set": [[2, 0, 9]], "free": []}}))
    case("body generation", lambda b: b["state"].update(generation=99))
    case("body pool", lambda b: b["state"].update(pool_uuid=str(uuid.UUID(int=6))))
    case("bad disk state", lambda b: b["state"]["disks"][0].update(state="fine"))
    case("tiers of untiered", lambda b: b["tiers"].update({home: {"set": [], "free": []}}))
    return cases


@pytest.mark.parametrize(("name", "body"), crafted(), ids=[c[0] for c in crafted()])
def test_a_crafted_record_with_a_valid_checksum_is_refused_in_one_line(
    name: str, body: Any
) -> None:
    slot = Slot(sample())
    forge(slot, body)
    with pytest.raises(FormatError) as refused:
        slot.decode()
    assert "\n" not in str(refused.value)
    assert len(str(refused.value)) < 300


@pytest.mark.parametrize(("what", "kw"), [
    ("version", {"version": 3}),
    ("flags", {"flags": 4}),
    ("seal with payload", {"flags": FLAG_SEAL, "generation": 7}),
    ("not json", {"compress": True}),
])
def test_crafted_record_headers_are_refused(what: str, kw: dict[str, Any]) -> None:
    slot = Slot(sample())
    body: Any = b"{nope" if what == "not json" else good_body(slot.md, 8)
    forge(slot, body, **kw)
    with pytest.raises(FormatError) as refused:
        slot.decode()
    assert "\n" not in str(refused.value)


def test_a_good_forged_record_is_accepted() -> None:
    """The forger itself is right: the same record without a bad value replays."""
    slot = Slot(sample())
    forge(slot, good_body(slot.md, 8))
    assert slot.decode().generation == 8


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=3000), st.integers(0, 3))
def test_garbage_after_the_checkpoint_never_raises_anything_else(junk: bytes, shift: int) -> None:
    slot = Slot(sample())
    at = slot.tail + shift * 64
    slot.raw[at : at + len(junk)] = junk
    try:
        slot.decode()
    except FormatError:
        pass


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=1, max_size=2000))
def test_garbage_as_a_record_payload_is_a_format_error(payload: bytes) -> None:
    slot = Slot(sample())
    forge(slot, payload, compress=False)
    try:
        slot.decode()
    except FormatError:
        pass


# ---- sizing ---------------------------------------------------------------------------------


def test_the_slot_bound_holds_a_full_map_of_single_extent_slabs() -> None:
    """Every extent mapped, each its own slab at the highest indexes: the encoded state
    stays within `max_state_size`, and `min_slot_size` leaves a journal after it."""
    md = sample()
    volume = md.volume("scratch")
    volume.layout = {"kind": "simple", "columns": 1, "copies": 1, "parity": 0,
                     "interleave": 64 << 10}
    volume.size = 1 << 60
    volume.slabs.clear()
    index = (1 << 60) // md.slab_size - 1
    for v in md.volumes:
        if v is not volume:
            v.slabs.clear()
    for disk in md.disks:
        for extent in range(disk.extent_count):
            volume.slabs[index] = [(disk.disk_id, extent)]
            index -= 1
    image = encode_checkpoint(md, 64 << 20)
    sizes = [d.size for d in md.disks]
    paths = sum(len(d.path_hint) + 256 for d in md.disks)
    bound = max_state_size(sizes, md.slab_size, paths)
    assert len(image) <= bound
    document = json.dumps(metadata_document(md), separators=(",", ":"))
    assert len(document) <= bound
    assert min_slot_size(sizes, md.slab_size, paths) >= bound + (16 << 10)


def test_the_slot_bound_holds_full_tier_maps_too() -> None:
    """A pool filled to the bound, with a tier: every extent mapped, each its own slab at
    the highest indexes, and a tiered volume whose ssd tier takes the pool's whole ssd
    capacity in default units, every slot mapped to a unit at a wide index (scattered, so
    that it compresses badly) and every pin used. Its checkpoint fits the slot `pool
    create` sizes (with the journal room the sizing promises), so the state commits; the
    bound once left tier maps out."""
    from blockspace.ondisk.journal import SIZED_TIER_UNIT
    from blockspace.ondisk.metadata import MAX_PINS, MAX_VOLUME_SIZE, TierInfo, VolumeRecord
    from blockspace.pool.pool import required_slot_size

    md = sample()
    simple = {"kind": "simple", "columns": 1, "copies": 1, "parity": 0,
              "interleave": 64 << 10}
    volume = md.volume("scratch")
    volume.layout = dict(simple)
    volume.size = 1 << 60
    for v in md.volumes:
        v.slabs.clear()
    index = (1 << 60) // md.slab_size - 1
    for disk in md.disks:
        for extent in range(disk.extent_count):
            volume.slabs[index] = [(disk.disk_id, extent)]
            index -= 1
    unit = SIZED_TIER_UNIT
    slots = sum(d.extent_count for d in md.disks if d.media == "ssd") * md.slab_size // unit
    size = MAX_VOLUME_SIZE // unit * unit
    units = size // unit
    pins = [(i * 2 * unit, unit, "ssd") for i in range(MAX_PINS)]
    rng = random.Random(16)  # units scattered at wide indexes, slots shuffled: what
    order = list(range(slots))  # compresses worst
    rng.shuffle(order)
    scattered = sorted(rng.sample(range(units // 2, units), slots))
    tiers = TierInfo(unit, "fast.ssd", "fast.hdd",
                     {u: (slot, rng.random() < 0.5) for u, slot in zip(scattered, order,
                                                                       strict=True)}, pins)
    md.volumes += [
        VolumeRecord("fast", str(uuid.UUID(int=90)), size, dict(simple), "thin", {}, 1.0, tiers),
        VolumeRecord("fast.ssd", str(uuid.UUID(int=91)), slots * unit, dict(simple), "thin", {},
                     1.0),
        VolumeRecord("fast.hdd", str(uuid.UUID(int=92)), size, dict(simple), "thin", {}, 1.0),
    ]
    needed = required_slot_size([d.size for d in md.disks], md.slab_size,
                                [d.path_hint for d in md.disks], [d.media for d in md.disks])
    md.meta_slot_size = needed
    image = encode_checkpoint(md, needed)  # NoSpace if the state outgrew the bound
    assert len(image) + (16 << 10) <= needed
    assert decode_slot(image.ljust(needed, b"\0"), md.pool_uuid).volume("fast").tiers == tiers


def test_a_checkpoint_encodes_the_version_1_document_in_pieces() -> None:
    """The maps are encoded a few thousand rows per call (the GIL is let go between them):
    the document is still exactly the version-1 one, tier maps included, and replays."""
    from blockspace.ondisk import journal
    from tests.unit.test_tier_metadata import tiered_sample

    md = tiered_sample()
    big = md.volume("media.v2")
    big.slabs.clear()
    for i in range(5000):  # more rows than one piece
        big.slabs[i] = [(0, 0), (1, 0), (2, 0), (3, 0)]  # shape only: not validated here
    expected = json.dumps(metadata_document(md), sort_keys=True, separators=(",", ":"))
    assert journal._document_in_pieces(md) == expected.encode()  # noqa: SLF001
    md = tiered_sample()
    md.volume("fast").tiers.map[7] = (1, True)  # type: ignore[union-attr]
    slot = Slot(md)
    decoded = slot.decode()
    assert decoded.volume("fast").tiers == md.volume("fast").tiers
    assert same(decoded, md)


@pytest.mark.parametrize("placement", [[(0, 9)], [(0, 9), (0, 10)], [(0, 9), (9, 9)],
                                       [(0, 10**6), (1, 9)]],
                         ids=["narrow", "same-disk", "unknown-disk", "beyond-disk"])
def test_a_record_of_a_bad_placement_is_never_written(placement: list[tuple[int, int]]) -> None:
    """Writing a record the replay would refuse is a bug: ValueError, nothing encoded."""
    md = sample()
    home = md.volume("home")
    home.slabs.take_dirty()  # type: ignore[attr-defined]
    home.slabs[2] = placement
    md.generation += 1
    with pytest.raises(ValueError, match="refusing to write invalid pool metadata"):
        encode_record(md, 7, {home.uuid: home.slabs.take_dirty()}, {})  # type: ignore[attr-defined]


def test_replay_builds_a_big_map_without_the_cyclic_collector() -> None:
    """Each pass of Python's cyclic collector walks every container made so far: while a
    replay builds a map of 500k slabs (millions of lists and tuples) those passes cost more
    than the decoding. None runs during a replay (one may run as it ends, when the collector
    is on again), rather than one per 700 containers made."""
    import gc

    md = sample()
    volume = md.volume("scratch")
    volume.layout = {"kind": "simple", "columns": 1, "copies": 1, "parity": 0,
                     "interleave": 64 << 10}
    volume.size = 1 << 50
    for v in md.volumes:
        v.slabs.clear()
    from tests.unit.test_metadata import disk_record

    md.disks[0] = disk_record(0, size=2000 << 30, media=md.disks[0].media)  # 31k extents
    for index in range(30_000):
        volume.slabs[index] = [(0, index)]
    image = encode_checkpoint(md, 64 << 20)
    passes: list[int] = []

    def count(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            passes.append(info["generation"])

    gc.collect()  # from zero: what the test itself allocated does not count
    gc.callbacks.append(count)
    try:
        assert gc.isenabled()
        decoded = decode_slot(image.ljust(1 << 20, b"\0"), md.pool_uuid)
    finally:
        gc.callbacks.remove(count)
    assert len(decoded.volume("scratch").slabs) == 30_000
    assert len(passes) <= 1, passes  # the one when it is back on (with it on: ~130)
    assert gc.isenabled()
