"""Fault injection in the device I/O: a `FaultyDevice` wraps a real `Device` and, following a
`FaultSpec` that can be changed at run time, fails, slows, throttles, corrupts or drops its
requests.

The kernel here has no device-mapper (see DESIGN.md), so this is where dm-flakey, dm-delay and
dm-dust style faults live. The daemon wraps every disk in a `FaultyDevice` only when the pool
is mounted with `--allow-fault-injection`; otherwise the `fault_*` control requests are
refused (blockspace/service/fault_requests.py), so a production mount can never be made to
fail on purpose by accident.

The faults (all of them may be combined, except `dead`, which overrides the others):

* read_error / write_error: probability (0..1) that a read / a write or zero fails with EIO;
  1.0 means always. With `ranges`, only requests overlapping one of the byte ranges can fail.
* latency / jitter: every async request first sleeps latency +- uniform(jitter) seconds.
  A long latency (minutes) is a disk that stops answering. Changing or clearing the spec
  ends the waits of requests already sleeping.
* bandwidth: a token bucket (bytes per second, 100 ms of burst) that reads and writes draw
  from; a request waits for its bytes.
* bitflip: probability that a read returns its data with one random bit flipped (the disk
  is untouched: it is a flip on the wire, not rot on the platter).
* dead: every request fails with EIO until the spec is cleared.
* flakey_up / flakey_down: in the manner of dm-flakey, the disk is fine for `up` seconds,
  then misbehaves for `down` seconds, and so on, counted from when the spec was set. While
  down every request fails with EIO, or with `drop_writes` writes (and zeroing) report
  success without reaching the disk while reads work. `drop_writes` without a flakey period
  drops every write (a disk that lies about its writes).

Sleeps use trio (`trio.sleep`, `trio.current_time()`), so the trio loop never blocks and
tests can run on `trio.testing.MockClock`. The blocking `*_sync` methods apply the same
error, death, drop and bit-flip rules but never sleep. Each device has its own
`random.Random`, seeded from the spec (or from a random seed, which is reported), so a run is
reproducible. Every injected error is a `DeviceError` with `os_errno` EIO whose message says
which fault it was.
"""

from __future__ import annotations

import errno
import math
import os
import random
import time
from dataclasses import asdict, dataclass, fields
from typing import Any

import trio

from blockspace.disks import uring
from blockspace.disks.devices import Buffer, Device, DeviceStats, byte_view
from blockspace.errors import DeviceError, InvalidInput
from blockspace.latency import OpCounter
from blockspace.units import format_size

BURST_SECONDS = 0.1  # the bandwidth bucket holds this many seconds' worth of bytes
MAX_SEED = 2**63 - 1


# --------------------------------------------------------------------------------------------
# the spec


def _percent(p: float) -> str:
    text = f"{p * 100:.6f}".rstrip("0").rstrip(".")
    return f"{text}%"


def format_duration(seconds: float) -> str:
    """0.02 -> '20ms', 1.5 -> '1.5s', 0.0005 -> '500us'."""
    if seconds == 0:
        return "0s"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if seconds >= scale or unit == "us":
            text = f"{seconds / scale:.3f}".rstrip("0").rstrip(".")
            return f"{text}{unit}"
    raise AssertionError("unreachable")  # pragma: no cover


@dataclass(frozen=True)
class FaultSpec:
    """What a `FaultyDevice` does wrong. The default spec does nothing."""

    read_error: float = 0.0  # probability per read, 0..1
    write_error: float = 0.0  # probability per write / zero, 0..1
    ranges: tuple[tuple[int, int], ...] = ()  # (offset, length): errors only here
    latency: float = 0.0  # seconds added to every async request
    jitter: float = 0.0  # +- seconds, uniform, at most `latency`
    bandwidth: int = 0  # bytes per second; 0 = unlimited
    bitflip: float = 0.0  # probability per read of one flipped bit in the returned data
    dead: bool = False
    flakey_up: float = 0.0  # seconds; both 0 = not flakey
    flakey_down: float = 0.0
    drop_writes: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    # -- validation (the daemon gets these from the wire: nothing is trusted)
    def validate(self) -> None:
        for name in ("read_error", "write_error", "bitflip"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise InvalidInput(f"{name} must be a probability between 0 and 1, not {value!r}")
        for name in ("latency", "jitter", "flakey_up", "flakey_down"):
            value = getattr(self, name)
            if not _is_number(value) or not 0.0 <= value <= 86400.0:
                raise InvalidInput(f"{name} must be between 0 and 86400 seconds, not {value!r}")
        if self.jitter > self.latency:
            raise InvalidInput("jitter cannot exceed the latency")
        if (
            isinstance(self.bandwidth, bool)
            or not isinstance(self.bandwidth, int)
            or self.bandwidth < 0
        ):
            raise InvalidInput(f"bandwidth must be a whole number of bytes per second >= 0, "
                               f"not {self.bandwidth!r}")
        if (self.flakey_up > 0) != (self.flakey_down > 0):
            raise InvalidInput("a flakey disk needs both an up and a down period (UP:DOWN)")
        for name in ("dead", "drop_writes"):
            if not isinstance(getattr(self, name), bool):
                raise InvalidInput(f"{name} must be true or false")
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, int)
            or not 0 <= self.seed <= MAX_SEED
        ):
            raise InvalidInput(f"seed must be a whole number from 0 to {MAX_SEED}")
        if not isinstance(self.ranges, tuple):
            raise InvalidInput("ranges must be a list of [offset, length] pairs")
        for item in self.ranges:
            if (
                not isinstance(item, tuple)
                or len(item) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in item)
                or item[0] < 0
                or item[1] <= 0
            ):
                raise InvalidInput(
                    f"a range is [offset, length] with offset >= 0 and length > 0, not {item!r}"
                )
        if self.ranges and not (self.read_error or self.write_error):
            raise InvalidInput("ranges restrict read or write errors: give a read or write "
                               "error probability too")
        if self.dead and self.active_kinds() != ["dead"]:
            raise InvalidInput("a dead disk fails every request: dead cannot be combined "
                               "with other faults")

    @property
    def flakey(self) -> bool:
        return self.flakey_up > 0 and self.flakey_down > 0

    def active_kinds(self) -> list[str]:
        kinds = []
        if self.dead:
            kinds.append("dead")
        if self.read_error:
            kinds.append("read_error")
        if self.write_error:
            kinds.append("write_error")
        if self.latency or self.jitter:
            kinds.append("latency")
        if self.bandwidth:
            kinds.append("bandwidth")
        if self.bitflip:
            kinds.append("bitflip")
        if self.flakey:
            kinds.append("flakey")
        if self.drop_writes:
            kinds.append("drop_writes")
        return kinds

    @property
    def empty(self) -> bool:
        return not self.active_kinds()

    # -- wire format
    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["ranges"] = [list(r) for r in self.ranges]
        return data

    @classmethod
    def from_dict(cls, data: Any) -> FaultSpec:
        if not isinstance(data, dict):
            raise InvalidInput("a fault spec is a JSON object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInput(f"unknown fault setting {unknown[0]!r}")
        values = dict(data)
        ranges = values.get("ranges", ())
        if not isinstance(ranges, (list, tuple)):
            raise InvalidInput("ranges must be a list of [offset, length] pairs")
        values["ranges"] = tuple(
            tuple(r) if isinstance(r, (list, tuple)) else r for r in ranges  # type: ignore[misc]
        )
        for name in ("read_error", "write_error", "bitflip", "latency", "jitter",
                     "flakey_up", "flakey_down"):
            if name in values and isinstance(values[name], int) and not isinstance(
                values[name], bool
            ):
                values[name] = float(values[name])
        return cls(**values)

    def describe(self) -> str:
        """One line for people: 'read error 1%, latency 20ms±5ms'."""
        parts = []
        if self.dead:
            parts.append("dead")
        where = ""
        if self.ranges:
            where = " in " + ", ".join(
                f"{format_size(o)}+{format_size(n)}" for o, n in self.ranges
            )
        if self.read_error:
            parts.append(f"read error {_percent(self.read_error)}{where}")
        if self.write_error:
            parts.append(f"write error {_percent(self.write_error)}{where}")
        if self.latency or self.jitter:
            jitter = f"±{format_duration(self.jitter)}" if self.jitter else ""
            parts.append(f"latency {format_duration(self.latency)}{jitter}")
        if self.bandwidth:
            parts.append(f"bandwidth {format_size(self.bandwidth)}/s")
        if self.bitflip:
            parts.append(f"bit flips {_percent(self.bitflip)} of reads")
        if self.flakey:
            mode = "drops writes" if self.drop_writes else "EIO"
            parts.append(f"flakey up {format_duration(self.flakey_up)} / down "
                         f"{format_duration(self.flakey_down)} ({mode})")
        elif self.drop_writes:
            parts.append("drops every write")
        if self.seed is not None and parts:
            parts.append(f"seed {self.seed}")
        return ", ".join(parts) if parts else "none"


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


# --------------------------------------------------------------------------------------------
# the device


@dataclass(frozen=True)
class FaultyDeviceStats(DeviceStats):
    """The wrapped device's counters (with injected errors counted in `errors`), plus what
    the fault layer did."""

    injected_read_errors: int = 0
    injected_write_errors: int = 0
    injected_flush_errors: int = 0
    dropped_writes: int = 0
    bit_flips: int = 0
    delayed_requests: int = 0
    delay_seconds: float = 0.0  # added latency, summed over requests
    throttle_seconds: float = 0.0  # waits for the bandwidth bucket, summed over requests


def _now() -> tuple[str, float]:
    try:
        return "trio", trio.current_time()
    except RuntimeError:  # not inside trio.run: the offline CLI's blocking calls
        return "monotonic", time.monotonic()


class FaultyDevice(Device):
    """A `Device` that forwards to `inner`, with the faults of `spec` applied."""

    def __init__(self, inner: Device, spec: FaultSpec | None = None) -> None:
        super().__init__(inner.path, inner.size)
        self.inner = inner
        self._injected = {"read": 0, "write": 0, "flush": 0}
        self._dropped = 0
        self._flips = 0
        self._delayed = 0
        self._delay_total = 0.0
        self._throttle_total = 0.0
        self.spec = FaultSpec()
        self.seed = 0
        self._rng = random.Random(0)
        self._epoch: tuple[str, float] | None = None
        self._tokens = 0.0
        self._bucket_time: float | None = None
        self._changed: trio.Event | None = None  # set when the spec changes: ends the waits
        self.set_spec(spec or FaultSpec())

    # -- configuration
    def set_spec(self, spec: FaultSpec) -> None:
        """Replace the faults (a fresh random stream, flakey period and bandwidth bucket)."""
        self.spec = spec
        self.seed = spec.seed if spec.seed is not None else random.SystemRandom().randrange(
            MAX_SEED
        )
        self._rng = random.Random(self.seed)
        self._epoch = _now()
        self._tokens = spec.bandwidth * BURST_SECONDS
        self._bucket_time = None
        changed, self._changed = self._changed, None
        if changed is not None:  # requests sleeping under the old spec go on at once
            changed.set()

    def clear(self) -> None:
        self.set_spec(FaultSpec())

    def fault_state(self) -> dict[str, Any]:
        """What the control socket reports for this device."""
        active = not self.spec.empty
        return {
            "path": self.path,
            "spec": self.spec.to_dict() if active else None,
            "description": self.spec.describe(),
            "seed": self.seed if active else None,
            "flakey_phase": self._flakey_phase() if self.spec.flakey else None,
            "statistics": asdict(self.statistics()),
        }

    # -- statistics
    def request_latency(self) -> OpCounter:
        return self.inner.request_latency()  # injected delays fall outside it

    def statistics(self) -> FaultyDeviceStats:
        inner = self.inner.statistics()
        base = asdict(inner)
        base["errors"] = inner.errors + sum(self._injected.values())
        return FaultyDeviceStats(
            **base,
            injected_read_errors=self._injected["read"],
            injected_write_errors=self._injected["write"],
            injected_flush_errors=self._injected["flush"],
            dropped_writes=self._dropped,
            bit_flips=self._flips,
            delayed_requests=self._delayed,
            delay_seconds=self._delay_total,
            throttle_seconds=self._throttle_total,
        )

    # -- the rules
    def _fail(self, kind: str, what: str, fault: str) -> DeviceError:
        self._injected[kind] += 1
        err = DeviceError(
            f"{self.path}: {what}: {os.strerror(errno.EIO)} (injected fault: {fault})"
        )
        err.os_errno = errno.EIO  # type: ignore[attr-defined]
        return err

    def _flakey_phase(self) -> str:
        spec = self.spec
        if not spec.flakey:
            return "up"
        clock, now = _now()
        if self._epoch is None or self._epoch[0] != clock:
            self._epoch = (clock, now)  # first use under another clock: the cycle starts now
        elapsed = now - self._epoch[1]
        position = elapsed % (spec.flakey_up + spec.flakey_down)
        return "up" if position < spec.flakey_up else "down"

    def _in_ranges(self, offset: int, length: int) -> bool:
        if not self.spec.ranges:
            return True
        end = offset + max(length, 1)
        return any(offset < o + n and o < end for o, n in self.spec.ranges)

    def _chance(self, probability: float) -> bool:
        if probability <= 0:
            return False
        if probability >= 1:
            return True
        return self._rng.random() < probability

    def _before(self, kind: str, what: str, offset: int, length: int) -> bool:
        """Apply death, flakey periods, drops and error probabilities to one request of
        `kind` ("read", "write" (incl. zero) or "flush"). Raises the injected error;
        returns True when a write is to be dropped (reported done, never done)."""
        spec = self.spec
        if spec.dead:
            raise self._fail(kind, what, "dead disk")
        if spec.flakey and self._flakey_phase() == "down":
            if not spec.drop_writes:
                raise self._fail(kind, what, "flakey disk in its down period")
            if kind == "write":
                return True
        elif spec.drop_writes and not spec.flakey and kind == "write":
            return True
        if kind == "read" and self._in_ranges(offset, length) and self._chance(spec.read_error):
            raise self._fail(kind, what, self._error_name("read", spec.read_error))
        if kind == "write" and self._in_ranges(offset, length) and self._chance(
            spec.write_error
        ):
            raise self._fail(kind, what, self._error_name("write", spec.write_error))
        return False

    def _error_name(self, kind: str, probability: float) -> str:
        text = f"{kind} error"
        if probability < 1:
            text += f" with probability {_percent(probability)}"
        if self.spec.ranges:
            text += " in a bad range"
        return text

    def _flip(self, view: memoryview) -> None:
        if view.nbytes and self._chance(self.spec.bitflip):
            bit = self._rng.randrange(view.nbytes * 8)
            view[bit // 8] ^= 1 << (bit % 8)
            self._flips += 1

    async def _delay(self, nbytes: int) -> None:
        """Latency with jitter, then the bandwidth bucket; at least one checkpoint."""
        spec = self.spec
        slept = False
        if spec.latency > 0 or spec.jitter > 0:
            delay = spec.latency
            if spec.jitter > 0:
                delay += self._rng.uniform(-spec.jitter, spec.jitter)
            delay = max(0.0, delay)
            self._delayed += 1
            self._delay_total += delay
            await self._sleep(delay)
            slept = True
            if self.spec is not spec:  # changed while we slept: the new faults apply
                return
        if spec.bandwidth > 0 and nbytes > 0:
            rate = float(spec.bandwidth)
            now = trio.current_time()
            if self._bucket_time is not None:
                self._tokens = min(rate * BURST_SECONDS,
                                   self._tokens + (now - self._bucket_time) * rate)
            self._bucket_time = now
            self._tokens -= nbytes  # reserve now: later requests queue behind this one
            if self._tokens < 0:
                wait = -self._tokens / rate
                self._throttle_total += wait
                await self._sleep(wait)
                slept = True
        if not slept:
            await trio.lowlevel.checkpoint()

    async def _sleep(self, seconds: float) -> None:
        """trio.sleep, cut short when the spec changes (`fault clear` frees a stalled disk)."""
        if self._changed is None:
            self._changed = trio.Event()
        with trio.move_on_after(seconds):
            await self._changed.wait()

    # -- async API
    async def read(self, offset: int, length: int) -> bytes:
        what = f"read at {offset}"
        self._check(what, offset, length)
        await self._delay(length)
        self._before("read", what, offset, length)
        data = await self.inner.read(offset, length)
        if self.spec.bitflip and data:
            buf = bytearray(data)
            self._flip(memoryview(buf))
            return bytes(buf)
        return data

    def read_now(self, offset: int, length: int) -> bytes | None:
        if not self.spec.empty:
            return None  # faults act on the async path only
        return self.inner.read_now(offset, length)

    def read_now_into(self, offset: int, buffers: list[memoryview]) -> bool:
        if not self.spec.empty:
            return False  # faults act on the async path only
        return self.inner.read_now_into(offset, buffers)

    def ring_chain(self, pieces: list[tuple[int, Buffer]]) -> uring.Chain | None:
        if not self.spec.empty:
            return None  # faults act on the async path only
        return self.inner.ring_chain(pieces)

    def ring_written(self, chain: uring.Chain) -> None:
        self.inner.ring_written(chain)

    async def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        view = byte_view(buf)
        what = f"read at {offset}"
        self._check(what, offset, view.nbytes)
        await self._delay(view.nbytes)
        self._before("read", what, offset, view.nbytes)
        await self.inner.readinto(offset, view)
        if self.spec.bitflip:
            self._flip(view)

    async def write(self, offset: int, data: Buffer) -> None:
        what = f"write at {offset}"
        length = byte_view(data).nbytes
        self._check(what, offset, length)
        await self._delay(length)
        if self._before("write", what, offset, length):
            self._dropped += 1
            return
        await self.inner.write(offset, data)

    async def flush(self) -> None:
        self._check("flush", 0, 0)
        await self._delay(0)
        self._before("flush", "flush", 0, 0)
        await self.inner.flush()

    async def zero(self, offset: int, length: int) -> None:
        what = f"zero at {offset}"
        self._check(what, offset, length)
        await self._delay(0)
        if self._before("write", what, offset, length):
            self._dropped += 1
            return
        await self.inner.zero(offset, length)

    # -- blocking API: same rules, never sleeps
    def read_sync(self, offset: int, length: int) -> bytes:
        what = f"read at {offset}"
        self._check(what, offset, length)
        self._before("read", what, offset, length)
        data = self.inner.read_sync(offset, length)
        if self.spec.bitflip and data:
            buf = bytearray(data)
            self._flip(memoryview(buf))
            return bytes(buf)
        return data

    def write_sync(self, offset: int, data: Buffer) -> None:
        what = f"write at {offset}"
        self._check(what, offset, byte_view(data).nbytes)
        if self._before("write", what, offset, byte_view(data).nbytes):
            self._dropped += 1
            return
        self.inner.write_sync(offset, data)

    def flush_sync(self) -> None:
        self._check("flush", 0, 0)
        self._before("flush", "flush", 0, 0)
        self.inner.flush_sync()

    def reserve_sync(self, offset: int, length: int) -> None:
        self.inner.reserve_sync(offset, length)

    def host_room(self) -> int | None:
        return self.inner.host_room()

    def zero_sync(self, offset: int, length: int) -> None:
        what = f"zero at {offset}"
        self._check(what, offset, length)
        if self._before("write", what, offset, length):
            self._dropped += 1
            return
        self.inner.zero_sync(offset, length)

    def close(self) -> None:
        self._closed = True
        self.inner.close()

    @property
    def closed(self) -> bool:
        return self._closed or self.inner.closed

    def __getattr__(self, name: str) -> Any:
        # Anything else a caller asks of the real device (fileno, info, is_block, ...).
        if name.startswith("_") or name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"<FaultyDevice {self.inner!r} faults: {self.spec.describe()}>"
