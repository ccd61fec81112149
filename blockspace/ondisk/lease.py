"""The writer's lease: one 4 KiB block per disk (at `DiskGeometry.lease_offset`) saying which
process on which host writes the pool, beaten while it does (ZFS's multihost protection is the
model). Pure code: bytes in, objects out; who may take a lease over is blockspace/pool/takeover.py.

Layout of the block (little-endian), framed like the disk label::

    magic b"BLKSPCLS" | u32 format version | u32 body length | u64 xxh3_64(body) | body | zeros

The body is compact UTF-8 JSON with sorted keys; decoding checks every field, so a crafted
lease is refused with one line (FormatError), never trusted or crashed on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from blockspace.errors import FormatError
from blockspace.ondisk.framing import BLOCK_HEADER, decode_json_body, frame_block, unframe_block
from blockspace.ondisk.label import LEASE_SIZE, check_uuid, timestamp

LEASE_FORMAT_VERSION = 1
LEASE_MAGIC = b"BLKSPCLS"
STATES = ("held", "released")
MAX_PID = 1 << 22  # the kernel's PID_MAX_LIMIT
MAX_COUNTER = (1 << 63) - 1
MAX_PID_START = (1 << 63) - 1  # clock ticks since boot (/proc/PID/stat field 22)
MAX_WAIT = 3600.0  # the longest a lease may ask a taker to watch it (more: --force)

_MAX_BODY = LEASE_SIZE - BLOCK_HEADER.size
_HOST_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}", re.ASCII)
_HOST_NAME_RE = re.compile(r"[\x21-\x7e]{1,255}", re.ASCII)  # printable, no spaces
_KEYS = frozenset({"pool_uuid", "disk_uuid", "host_id", "host_name", "boot_id", "pid",
                   "pid_start", "counter", "time", "state", "wait"})

BytesLike = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Holder:
    """A writing process: its host (machine id, and a name to show), the boot of that host,
    and the process (pid, and its start time, so a reused pid is not taken for it)."""

    host_id: str
    host_name: str
    boot_id: str
    pid: int
    pid_start: int

    def same_host(self, other: Holder) -> bool:
        return self.host_id == other.host_id

    def describe(self) -> str:
        return f"host {self.host_name} (machine id {self.host_id}), pid {self.pid}"


@dataclass(frozen=True)
class Lease:
    pool_uuid: str
    disk_uuid: str
    holder: Holder
    counter: int  # the heartbeat: +1 at every beat
    time: float  # the holder's wall clock at that beat (shown, never compared across hosts)
    state: str  # "held" or "released"
    # How long a taker must see the counter stand still before the holder counts as dead:
    # the holder's own bound on the gap between two beats (its beat interval and I/O
    # timeout), as ZFS records its multihost interval.
    wait: float = 15.0

    @property
    def held(self) -> bool:
        return self.state == "held"


def _body(lease: Lease) -> dict[str, Any]:
    h = lease.holder
    return {"pool_uuid": lease.pool_uuid, "disk_uuid": lease.disk_uuid, "host_id": h.host_id,
            "host_name": h.host_name, "boot_id": h.boot_id, "pid": h.pid,
            "pid_start": h.pid_start, "counter": lease.counter, "time": lease.time,
            "state": lease.state, "wait": lease.wait}


def _int(body: dict[str, Any], key: str, lo: int, hi: int) -> int:
    value = body[key]
    if type(value) is not int or not lo <= value <= hi:
        raise FormatError(f"lease field {key} is not an integer in range: {value!r:.40}")
    return value


def _text(body: dict[str, Any], key: str, pattern: re.Pattern[str]) -> str:
    value = body[key]
    if not isinstance(value, str) or pattern.fullmatch(value) is None:
        raise FormatError(f"lease field {key} is not valid: {value!r:.40}")
    return value


def _seconds(body: dict[str, Any], key: str) -> float:
    value = body[key]
    if type(value) not in (int, float) or not 0 <= value <= MAX_WAIT:
        raise FormatError(f"lease field {key} is not a number of seconds in range: "
                          f"{value!r:.40}")
    return float(value)


def _from_body(body: object) -> Lease:
    if not isinstance(body, dict):
        raise FormatError("lease body is not a JSON object")
    if set(body) != _KEYS:
        missing = sorted(_KEYS - set(body))
        extra = sorted(repr(k)[:40] for k in set(body) - _KEYS)[:5]
        raise FormatError(f"lease fields wrong: missing {missing}, unexpected {extra}")
    state = body["state"]
    if state not in STATES:
        raise FormatError(f"lease state {state!r:.40} is not one of {', '.join(STATES)}")
    holder = Holder(
        host_id=_text(body, "host_id", _HOST_ID_RE),
        host_name=_text(body, "host_name", _HOST_NAME_RE),
        boot_id=check_uuid("lease boot_id", body["boot_id"]),
        pid=_int(body, "pid", 1, MAX_PID),
        pid_start=_int(body, "pid_start", 0, MAX_PID_START),
    )
    return Lease(
        pool_uuid=check_uuid("lease pool_uuid", body["pool_uuid"]),
        disk_uuid=check_uuid("lease disk_uuid", body["disk_uuid"]),
        holder=holder,
        counter=_int(body, "counter", 0, MAX_COUNTER),
        time=timestamp("lease time", body["time"]),
        state=state,
        wait=_seconds(body, "wait"),
    )


def encode_lease(lease: Lease) -> bytes:
    """Exactly LEASE_SIZE bytes. ValueError for a lease that would not decode."""
    body_dict = _body(lease)
    try:
        _from_body(body_dict)
    except FormatError as error:
        raise ValueError(f"refusing to encode an invalid lease: {error}") from None
    body = json.dumps(body_dict, sort_keys=True, separators=(",", ":"),
                      allow_nan=False).encode("utf-8")
    if len(body) > _MAX_BODY:  # cannot happen: every field is bounded well below
        raise ValueError(f"lease body too large ({len(body)} bytes)")
    return frame_block(LEASE_MAGIC, LEASE_FORMAT_VERSION, body, LEASE_SIZE)


def decode_lease(raw: BytesLike, pool_uuid: str, disk_uuid: str) -> Lease | None:
    """The lease in one block, or None when there is none: no lease magic (a pool made
    before leases, a disk never written) or the lease of another pool or disk (a leftover of
    an earlier life, which no writer of this pool holds). FormatError when the block carries
    the magic but is damaged or crafted."""
    raw = bytes(raw)
    if len(raw) != LEASE_SIZE:
        raise FormatError(f"lease block is {len(raw)} bytes, expected {LEASE_SIZE}")
    body = unframe_block(raw, LEASE_MAGIC, LEASE_FORMAT_VERSION, "lease")
    if body is None:
        return None
    lease = _from_body(decode_json_body(body, "lease body"))
    if lease.pool_uuid != pool_uuid or lease.disk_uuid != disk_uuid:
        return None
    return lease
