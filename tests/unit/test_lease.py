"""The writer's lease (issue 16 item 6): where it lives on a disk, its codec (every field
checked, a crafted lease refused with one line), and who may take it over."""

import dataclasses
import json
import struct
from typing import Any

import pytest
import xxhash

from blockspace.errors import FormatError
from blockspace.ondisk.label import (
    BLOCK,
    INTENT_SLOT_SIZE,
    LEASE_SIZE,
    MAX_META_SLOT_SIZE,
    MIN_META_SLOT_SIZE,
    compute_geometry,
    size_problem,
)
from blockspace.ondisk.lease import LEASE_MAGIC, Holder, Lease, decode_lease, encode_lease
from blockspace.pool.takeover import Reading, after_wait, first_look, judge, watch_time

MIB = 1 << 20
POOL = "3f2b6c1e-8a4d-4c6b-9f1e-2d3c4b5a6978"
DISK = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d"
BOOT = "0b8e5d4c-3a2f-4e1d-9c8b-7a6f5e4d3c2b"
ME = Holder("aaaa1111", "alpha", BOOT, 4242, 1000)
OTHER_HOST = Holder("bbbb2222", "beta", "1c8e5d4c-3a2f-4e1d-9c8b-7a6f5e4d3c2b", 77, 5)


def lease(holder: Holder = OTHER_HOST, counter: int = 9, state: str = "held") -> Lease:
    return Lease(POOL, DISK, holder, counter, 1_700_000_000.5, state)


# ---- where it lives ---------------------------------------------------------------------


def test_every_slot_size_leaves_room_for_the_lease_without_moving_data_start() -> None:
    """The lease goes into the padding between the intent slots and the first extent, for
    every metadata slot size a label may have: no existing pool needs to move its data."""
    for slot in range(MIN_META_SLOT_SIZE, MAX_META_SLOT_SIZE + 1, BLOCK):
        g = compute_geometry(1 << 40, MIB, slot)
        intent_end = g.meta_offset + 2 * slot + 2 * INTENT_SLOT_SIZE
        assert g.lease_offset == intent_end
        assert g.lease_offset + LEASE_SIZE <= g.data_start, slot
        assert g.data_start % MIB == 0


def test_a_device_shorter_than_its_label_is_named() -> None:
    g = compute_geometry(64 * MIB, MIB, 64 << 10)
    assert size_problem(g, 64 * MIB) is None
    assert size_problem(g, 65 * MIB) is None  # grown: still the disk
    problem = size_problem(g, 32 * MIB)
    assert problem is not None
    assert problem.startswith(f"device is {32 * MIB} bytes, label says {64 * MIB}")


# ---- the codec ------------------------------------------------------------------------------


def test_round_trip() -> None:
    for state in ("held", "released"):
        original = lease(state=state)
        raw = encode_lease(original)
        assert len(raw) == LEASE_SIZE
        assert decode_lease(raw, POOL, DISK) == original


def test_no_lease_is_none() -> None:
    """A disk of a pool made before leases (zeros or leftovers there), and the lease of
    another pool or disk (an earlier life of the disk): no writer of this pool holds it."""
    assert decode_lease(bytes(LEASE_SIZE), POOL, DISK) is None
    assert decode_lease(b"\xaa" * LEASE_SIZE, POOL, DISK) is None
    raw = encode_lease(lease())
    assert decode_lease(raw, "00000000-0000-4000-8000-000000000000", DISK) is None
    assert decode_lease(raw, POOL, "00000000-0000-4000-8000-000000000000") is None


def sealed(body: bytes | dict[str, Any], version: int = 1) -> bytes:
    """A lease block with a valid checksum over any content: what a forger writes."""
    if isinstance(body, dict):
        body = json.dumps(body).encode()
    header = struct.pack("<8sIIQ", LEASE_MAGIC, version, len(body), xxhash.xxh3_64_intdigest(body))
    return (header + body).ljust(LEASE_SIZE, b"\0")


def body() -> dict[str, Any]:
    raw = encode_lease(lease())
    (length,) = struct.unpack_from("<I", raw, 12)
    return dict(json.loads(raw[24:24 + length]))


def test_sealed_helper_matches_the_encoder() -> None:
    assert decode_lease(sealed(body()), POOL, DISK) == lease()


@pytest.mark.parametrize(("key", "value"), [
    ("pool_uuid", "not-a-uuid"), ("pool_uuid", POOL.upper()), ("disk_uuid", 7),
    ("host_id", ""), ("host_id", "a b"), ("host_id", "x" * 65), ("host_id", None),
    ("host_name", ""), ("host_name", "has space"), ("host_name", "\x01"),
    ("boot_id", "nope"), ("pid", 0), ("pid", -1), ("pid", 1 << 22 + 1), ("pid", True),
    ("pid", 1.5), ("pid_start", -1), ("pid_start", 1 << 63), ("counter", -1),
    ("counter", 1 << 63), ("counter", "9"), ("time", -1), ("time", 1e300), ("time", True),
    ("state", "HELD"), ("state", None), ("wait", -1), ("wait", 3601), ("wait", True),
    ("wait", "15"),
])
def test_every_field_is_checked(key: str, value: object) -> None:
    forged = body()
    forged[key] = value
    with pytest.raises(FormatError) as caught:
        decode_lease(sealed(forged), POOL, DISK)
    assert "\n" not in str(caught.value)


def test_crafted_blocks_are_refused() -> None:
    good = body()
    missing = dict(good)
    del missing["pid"]
    extra = dict(good, admin=True)
    cases = [
        sealed(missing), sealed(extra), sealed(b"[1, 2]"), sealed(b"\xff\xfe"),
        sealed(b'{"pid": 1, "pid": 2}'), sealed(good, version=2), sealed(b"{"),
        sealed(json.dumps(good).replace('"counter": 9', '"counter": NaN').encode()),
    ]
    raw = bytearray(encode_lease(lease()))
    raw[40] ^= 1  # the body, under the checksum
    cases.append(bytes(raw))
    raw = bytearray(encode_lease(lease()))
    raw[-1] = 1  # the padding
    cases.append(bytes(raw))
    raw = bytearray(encode_lease(lease()))
    struct.pack_into("<I", raw, 12, LEASE_SIZE)  # a length past the block
    cases.append(bytes(raw))
    for case in cases:
        with pytest.raises(FormatError):
            decode_lease(case, POOL, DISK)
    with pytest.raises(FormatError):
        decode_lease(b"short", POOL, DISK)


def test_an_invalid_lease_is_not_encoded() -> None:
    with pytest.raises(ValueError, match="invalid lease"):
        encode_lease(dataclasses.replace(lease(), state="maybe"))
    with pytest.raises(ValueError, match="invalid lease"):
        encode_lease(lease(holder=dataclasses.replace(ME, pid=0)))


# ---- who may take it --------------------------------------------------------------------------


def reading(found: Lease | None, *, alive: bool = False, damage: str | None = None,
            digest: int = 1, disk_id: int = 0) -> Reading:
    return Reading(disk_id, found, damage=damage, digest=digest, alive=alive)


def test_a_released_lease_or_none_is_taken_at_once() -> None:
    assert judge(reading(None), ME).verdict == "take"
    assert judge(reading(lease(state="released")), ME).verdict == "take"
    assert judge(reading(lease(holder=ME)), ME).verdict == "take"  # our own


def test_our_hosts_lease_is_taken_when_its_process_is_gone() -> None:
    other_pid = dataclasses.replace(ME, pid=99, pid_start=3)
    assert judge(reading(lease(holder=other_pid), alive=False), ME).verdict == "take"
    decision = judge(reading(lease(holder=other_pid), alive=True), ME)
    assert decision.verdict == "refuse"
    assert "pid 99 on this host" in decision.reason
    # Another boot of this host: whatever runs under that pid now is not the holder.
    old_boot = dataclasses.replace(other_pid, boot_id=OTHER_HOST.boot_id)
    assert judge(reading(lease(holder=old_boot), alive=True), ME).verdict == "take"


def test_another_hosts_lease_is_watched_then_refused_while_it_beats() -> None:
    before = [reading(lease(counter=9), digest=1)]
    decision = first_look(before, ME)
    assert decision.verdict == "wait"
    assert "host beta" in decision.reason
    assert "pid 77" in decision.reason
    after = [reading(lease(counter=10), digest=2)]
    decision = after_wait(before, after, ME, waited=15)
    assert decision.verdict == "refuse"
    assert "host beta" in decision.reason
    assert "changed within 15s" in decision.reason


def test_another_hosts_lease_that_stood_still_for_the_timeout_is_taken() -> None:
    before = [reading(lease(counter=9), digest=1)]
    decision = after_wait(before, list(before), ME, waited=15)
    assert decision.verdict == "take"
    assert "did not change for 15s" in decision.reason
    # It was released meanwhile: taken too.
    released = [reading(lease(counter=10, state="released"), digest=3)]
    assert after_wait(before, released, ME, waited=15).verdict == "take"


def test_an_unreadable_lease_is_watched_like_another_hosts() -> None:
    before = [reading(None, damage="lease checksum mismatch", digest=5)]
    assert first_look(before, ME).verdict == "wait"
    assert after_wait(before, list(before), ME, waited=1).verdict == "take"
    changed = [reading(None, damage="lease checksum mismatch", digest=6)]
    assert after_wait(before, changed, ME, waited=1).verdict == "refuse"


def test_force_takes_any_lease() -> None:
    for found in (reading(lease()), reading(None, damage="x"),
                  reading(lease(holder=dataclasses.replace(ME, pid=9)), alive=True)):
        assert judge(found, ME, force=True).verdict == "take"
    before = [reading(lease(counter=9), digest=1)]
    after = [reading(lease(counter=10), digest=2)]
    assert after_wait(before, after, ME, waited=1, force=True).verdict == "take"


def test_the_pool_takes_the_worst_verdict_of_its_disks() -> None:
    readings = [reading(None, disk_id=0), reading(lease(), disk_id=1, digest=1),
                reading(lease(holder=dataclasses.replace(ME, pid=8)), alive=True, disk_id=2)]
    assert first_look(readings[:1], ME).verdict == "take"
    assert first_look(readings[:2], ME).verdict == "wait"
    decision = first_look(readings, ME)
    assert decision.verdict == "refuse"
    assert decision.reason.startswith("disk 2:")
    assert first_look([], ME).verdict == "take"


def test_the_watch_lasts_as_long_as_the_slowest_holder_asks() -> None:
    """A holder whose beats may be further apart (a long I/O timeout) says so in its lease;
    a taker watches at least that long, never less than its own timeout."""
    slow = dataclasses.replace(lease(), wait=120.0)
    quick = dataclasses.replace(lease(), wait=1.0)
    assert watch_time([reading(slow), reading(quick, disk_id=1)], ME, 15) == 120
    assert watch_time([reading(quick)], ME, 15) == 15
    released = dataclasses.replace(slow, state="released")
    ours = dataclasses.replace(slow, holder=dataclasses.replace(ME, pid=5))
    assert watch_time([reading(released), reading(ours), reading(None)], ME, 15) == 15
