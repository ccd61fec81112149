"""A disk of a pool: probe it, and do async pread/pwrite/fdatasync/zero without blocking trio.

One implementation of `Device` here (tests have a bytearray one,
`blockspace.testing.memory_device.MemoryDevice`; fault injection wraps either in
`blockspace.disks.faults.FaultyDevice`):

* `FileDevice`: an image file or a block device. Blocking syscalls run in the device's own
  pool of worker threads (fed by a `queue.SimpleQueue`); a finished job hands its result back
  to the waiting trio task with `TrioToken.run_sync_soon(reschedule, ...)`. That costs one
  thread wake-up and one loop wake-up per I/O, instead of the ~100 µs of a
  `trio.to_thread.run_sync` hop (see DESIGN.md, "The async I/O path").
  Reads first try `preadv(..., RWF_NOWAIT)` inline on the trio thread: data already in the
  page cache is returned without any thread hop (`DeviceStats.inline_reads`); a miss
  (EAGAIN) or a partial hit goes to the workers. Writes, flushes and zeroing always go to the
  workers, so a slow or hung disk never blocks the trio loop. `write_many` writes several
  pieces (a block and its checksum entries) in one job: one round trip instead of two.
  Completions arriving close together are handed back in one batch (`_Completions`): one
  loop wake-up for all of them.

Every OS failure becomes a `DeviceError` ("<path>: read at <offset>: <strerror>") whose
`os_errno` is the errno the OS reported. Requests on a closed device, or writes to a
read-only one, are refused up front with the errno the OS would give (EBADF); out-of-range
requests are refused before touching the disk, and they and short reads have os_errno None.
The class attribute `DeviceError.errno` stays EIO: that is what the FUSE layer returns.
ENOSPC and EDQUOT (the host file system under an image is full, or a quota) raise the
subclass `HostSpaceError` (errno ENOSPC): a fault of the host, which the pool does not hold
against the disk.

Cancellation: a request that is still queued when its task is cancelled is withdrawn (it
never runs and the task sees `trio.Cancelled`). Once a worker has started it, it cannot be
interrupted: the task waits for the syscall to finish, gets its result, and the cancellation
is delivered at its next checkpoint. So a cancelled `write` was either not done at all
(`Cancelled` raised by `write` itself) or done completely.
"""

from __future__ import annotations

import abc
import ctypes
import errno
import fcntl
import functools
import logging
import os
import queue
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self, TypeVar

import outcome
import trio

from blockspace.disks import uring
from blockspace.disks.locks import in_use_message
from blockspace.errors import BlockspaceError, DeviceError, HostSpaceError, InvalidInput
from blockspace.latency import OpCounter

log = logging.getLogger(__name__)

Buffer = bytes | bytearray | memoryview
T = TypeVar("T")

# ioctl numbers (linux/fs.h), x86_64 / aarch64 encoding.
BLKGETSIZE64 = 0x80081272  # _IOR(0x12, 114, size_t): device size in bytes (u64)
BLKSSZGET = 0x1268  # _IO(0x12, 104): logical block size (int)
BLKZEROOUT = 0x127F  # _IO(0x12, 127): zero a byte range, arg = u64 range[2] = {start, length}

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

ZERO_CHUNK = 1 << 20  # fallback zeroing writes this many bytes per pwrite

# io_uring results that mean "not this way", not "the disk failed": the worker retries.
_RING_RETRY_ERRNOS = frozenset({errno.EAGAIN, errno.EINVAL, errno.EOPNOTSUPP, errno.ECANCELED})
_RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None) if hasattr(os, "preadv") else None
_NOWAIT_FLAG = _RWF_NOWAIT or 0  # only used where _RWF_NOWAIT is known to exist
_IOV_MAX = 1024  # buffers one preadv takes (Linux UIO_MAXIOV)
# errnos of a host file system (or quota) without room: HostSpaceError, not a disk failure
HOST_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# errnos meaning "this way of zeroing is not available here": fall back to writing zeros
_ZERO_FALLBACK_ERRNOS = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS, errno.EINVAL})


# --------------------------------------------------------------------------------------------
# probing


@dataclass(frozen=True)
class DeviceInfo:
    """What `probe` found out about a path."""

    path: str
    size: int  # bytes
    is_block: bool
    rotational: bool | None  # None for image files, or when sysfs does not say


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _block_size_bytes(fd: int) -> int:
    return int(struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, bytes(8)))[0])


def _logical_block_size(fd: int) -> int:
    try:
        value = int(struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, bytes(4)))[0])
    except OSError:
        return 512
    return value if value > 0 else 512


def _read_rotational(sysdir: str) -> bool | None:
    try:
        with open(os.path.join(sysdir, "queue", "rotational")) as f:
            return f.read().strip() == "1"
    except (OSError, ValueError):
        return None


def _rotational(path: str, rdev: int) -> bool | None:
    """queue/rotational of a block device from sysfs; a partition asks its parent disk."""
    candidates = [f"/sys/dev/block/{os.major(rdev)}:{os.minor(rdev)}"]
    candidates.append(os.path.join("/sys/class/block", os.path.basename(os.path.realpath(path))))
    for candidate in candidates:
        sysdir = os.path.realpath(candidate)
        if not os.path.isdir(sysdir):
            continue
        found = _read_rotational(sysdir)
        if found is None and os.path.exists(os.path.join(sysdir, "partition")):
            found = _read_rotational(os.path.dirname(sysdir))
        if found is not None:
            return found
    return None


def probe(path: str) -> DeviceInfo:
    """Size, kind and media of an image file or block device. Raises InvalidInput if `path`
    is missing, not a regular file or block device, or cannot be opened for reading."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such file or device") from None
    except OSError as e:
        raise InvalidInput(f"{path}: {e.strerror or e}") from None
    is_block = stat.S_ISBLK(st.st_mode)
    if not is_block and not stat.S_ISREG(st.st_mode):
        raise InvalidInput(
            f"{path}: not a regular file or block device (it is {_kind(st.st_mode)})"
        )
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise InvalidInput(f"{path}: cannot open for reading: {e.strerror or e}") from None
    try:
        if not is_block:
            return DeviceInfo(path, os.fstat(fd).st_size, False, None)
        try:
            size = _block_size_bytes(fd)
        except OSError as e:
            raise InvalidInput(f"{path}: cannot get the device size: {e.strerror or e}") from None
    finally:
        os.close(fd)
    return DeviceInfo(path, size, True, _rotational(path, st.st_rdev))


# --------------------------------------------------------------------------------------------
# the Device interface


@dataclass(frozen=True)
class DeviceStats:
    """Counters of one device since it was opened. `errors` counts failed I/O (OS errors and
    injected faults), not rejected out-of-range requests."""

    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    errors: int = 0
    inline_reads: int = 0  # reads completed on the trio thread through preadv(RWF_NOWAIT)
    flushes: int = 0


def _os_error(path: str, what: str, exc: OSError) -> DeviceError:
    # No room on the host file system (or quota): the disk itself is fine.
    kind = HostSpaceError if exc.errno in HOST_SPACE_ERRNOS else DeviceError
    err = kind(f"{path}: {what}: {exc.strerror or os.strerror(exc.errno or 0) or exc}")
    err.os_errno = exc.errno  # type: ignore[attr-defined]
    return err


def _plain_error(path: str, what: str, message: str, os_errno: int | None = None) -> DeviceError:
    err = DeviceError(f"{path}: {what}: {message}")
    err.os_errno = os_errno  # type: ignore[attr-defined]
    return err


def byte_view(data: Buffer) -> memoryview:
    """`data` as a flat view of unsigned bytes, uncopied: what devices measure and slice."""
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


class Device(abc.ABC):
    """One disk. Offsets and lengths are bytes; a request must lie inside [0, size)."""

    path: str
    size: int

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        self._closed = False
        self._reads = 0
        self._writes = 0
        self._bytes_read = 0
        self._bytes_written = 0
        self._errors = 0
        self._inline_reads = 0
        self._flushes = 0
        # Latency of the requests that wait for the disk (a worker thread's job, or this
        # device's own io_uring submission); inline cached reads and the batched ring writes
        # of several disks at once are counted in `statistics()` only.
        self._latency = OpCounter()

    def request_latency(self) -> OpCounter:
        return self._latency

    # -- async API
    @abc.abstractmethod
    async def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes at `offset`; DeviceError on any failure or short read."""

    async def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        """Fill the writable buffer `buf` from `offset` (subclasses avoid the copy)."""
        view = byte_view(buf)
        view[:] = await self.read(offset, view.nbytes)

    def read_now(self, offset: int, length: int) -> bytes | None:
        """The bytes at once if they can be had without blocking (from the page cache) and
        without any fault in the way; None otherwise, and the caller uses `read`. Never
        raises: a real error is for `read` to find and report."""
        return None

    def read_now_into(self, offset: int, buffers: list[memoryview]) -> bool:
        """`read_now` straight into `buffers`, filled one after the other from `offset`
        (a scattered read: a request's stripe units land where they belong, uncopied).
        False where `read_now` would give None; the buffers then hold anything."""
        return False

    @abc.abstractmethod
    async def write(self, offset: int, data: Buffer) -> None:
        """Write all of `data` at `offset`. Do not modify `data` until this returns."""

    async def write_many(self, pieces: list[tuple[int, Buffer]]) -> None:
        """Write each (offset, data) piece, in order, as one request where the device can
        (`FileDevice`: one worker job, so one thread round trip instead of one per piece).
        If a piece fails the later ones are not written. This fallback writes them one by
        one through `write`, so wrappers (fault injection) see every piece."""
        for offset, data in pieces:
            await self.write(offset, data)

    def ring_chain(self, pieces: list[tuple[int, Buffer]]) -> uring.Chain | None:
        """These writes as an io_uring chain, for a caller that submits several devices'
        writes at once (`uring.Batch`) and then calls `ring_written`; None where this
        device does not write through the ring or the request is not plainly valid (then
        `write_many` does it, and reports what is wrong)."""
        return None

    def ring_written(self, chain: uring.Chain) -> None:  # noqa: B027 - optional hook
        """Count a chain from `ring_chain` that was written in full."""

    @abc.abstractmethod
    async def flush(self) -> None:
        """Make every completed write durable (fdatasync)."""

    @abc.abstractmethod
    async def zero(self, offset: int, length: int) -> None:
        """Make the range read as zeros (punching holes / unmapping where possible)."""

    # -- blocking API, for offline CLI use (no trio)
    @abc.abstractmethod
    def read_sync(self, offset: int, length: int) -> bytes: ...

    @abc.abstractmethod
    def write_sync(self, offset: int, data: Buffer) -> None: ...

    @abc.abstractmethod
    def flush_sync(self) -> None: ...

    @abc.abstractmethod
    def zero_sync(self, offset: int, length: int) -> None: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Release the device; idempotent. Later I/O raises DeviceError."""

    def host_room(self) -> int | None:
        """Bytes the host file system under this device still has free; None where that is
        not known (a block device, memory)."""
        return None

    def reserve_sync(self, offset: int, length: int) -> None:  # noqa: B027 - optional hook
        """Zeros written over the range, so the host has allocated it and later writes there
        need no new room (a sparse image's metadata area, before anything is put in it).
        HostSpaceError if the host has no room; a no-op where the device need not (block
        devices, memory)."""

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> DeviceStats:
        return DeviceStats(
            reads=self._reads,
            writes=self._writes,
            bytes_read=self._bytes_read,
            bytes_written=self._bytes_written,
            errors=self._errors,
            inline_reads=self._inline_reads,
            flushes=self._flushes,
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<{type(self).__name__} {self.path!r} size={self.size}{state}>"

    # -- helpers for subclasses
    def _check(self, what: str, offset: int, length: int) -> None:
        """Reject I/O on a closed device or outside [0, size) before touching the disk."""
        if self._closed:
            raise _plain_error(self.path, what, "device is closed", errno.EBADF)
        if offset < 0 or length < 0 or offset + length > self.size:
            raise _plain_error(
                self.path,
                what,
                f"range of {length} bytes is outside the device (size {self.size})",
            )


# --------------------------------------------------------------------------------------------
# worker pool


class _Completions:
    """Results of worker jobs on their way back to the trio thread, delivered in batches:
    the first result of a batch asks the loop (`TrioToken.run_sync_soon`, a socket write and
    a loop wake-up) to run `_deliver`; results that arrive before it runs join the same
    batch for the price of a lock. One per trio run (see `_completions`)."""

    def __init__(self, token: trio.lowlevel.TrioToken) -> None:
        self._token = token
        self._lock = threading.Lock()
        self._ready: list[tuple[trio.lowlevel.Task, outcome.Outcome[Any]]] = []
        self._armed = False

    def put(self, task: trio.lowlevel.Task, result: outcome.Outcome[Any]) -> None:
        """From a worker thread: hand `result` to `task`."""
        with self._lock:
            self._ready.append((task, result))
            if self._armed:
                return
            self._armed = True
        try:
            self._token.run_sync_soon(self._deliver)
        except trio.RunFinishedError:  # pragma: no cover - the run ended without the task
            pass

    def _deliver(self) -> None:
        """On the trio thread: wake every task whose result has arrived."""
        with self._lock:
            ready, self._ready = self._ready, []
            self._armed = False
        reschedule = trio.lowlevel.reschedule
        for task, result in ready:
            reschedule(task, result)


_COMPLETIONS: trio.lowlevel.RunVar[_Completions] = trio.lowlevel.RunVar("blockspace_completions")


def _completions() -> _Completions:
    try:
        return _COMPLETIONS.get()
    except LookupError:
        found = _Completions(trio.lowlevel.current_trio_token())
        _COMPLETIONS.set(found)
        return found


# A job: (function, args, completions, waiting task, claim, reply). `claim` and `reply` are
# one-element lists; whoever pops `claim` first (the worker starting the job, or the task's
# abort callback) owns the start, and whoever pops `reply` first owns the wake-up: a task
# cancelled while its I/O hangs (a dead disk) is released at once and the late result
# dropped. list.pop is atomic, so no lock is needed.
_Job = tuple[
    Callable[..., Any],
    tuple[Any, ...],
    _Completions,
    trio.lowlevel.Task,
    list[None],
    list[None],
]


def _worker_loop(jobs: queue.SimpleQueue[_Job | None]) -> None:
    """Body of a worker thread. Holds no reference to the device between jobs, so an
    unclosed device can still be garbage-collected (its __del__ stops the workers)."""
    while True:
        job = jobs.get()
        if job is None:
            return
        fn, args, completions, task, claim, reply = job
        job = None
        try:
            claim.pop()
        except IndexError:  # withdrawn by cancellation before it started
            fn = args = completions = task = claim = reply = None  # type: ignore[assignment]
            continue
        result = outcome.capture(fn, *args)
        try:
            reply.pop()
        except IndexError:  # the task gave up waiting (cancelled): drop the result
            pass
        else:
            completions.put(task, result)
        fn = args = completions = task = claim = reply = result = None  # type: ignore[assignment]


@functools.cache
def _libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):  # pragma: no cover - not glibc/musl
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return,unused-ignore]


@functools.cache
def _zeros() -> bytes:
    return bytes(ZERO_CHUNK)


class FileDevice(Device):
    """An image file or a block device, opened O_RDWR (or O_RDONLY), optionally locked
    exclusively (flock, plus O_EXCL for block devices, which also refuses mounted disks)."""

    def __init__(
        self, path: str, *, writable: bool = True, workers: int = 4, exclusive: bool = True
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self._fd = -1
        self._threads: list[threading.Thread] = []
        info = probe(path)
        super().__init__(path, info.size)
        self.info = info
        self.writable = writable
        self.exclusive = exclusive
        self._workers = workers
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._start_lock = threading.Lock()
        self._nowait = _RWF_NOWAIT is not None
        self._use_ring = True  # writes through io_uring where the run has one
        self._ring_writes = 0

        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        if exclusive and info.is_block:
            flags |= os.O_EXCL
        in_use = BlockspaceError(f"{path} is in use by another process (a mounted pool?)")
        try:
            fd = os.open(path, flags)
        except OSError as e:
            if e.errno == errno.EBUSY and exclusive and info.is_block:
                raise in_use from None
            raise _os_error(path, "open", e) from None
        try:
            if exclusive:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise BlockspaceError(in_use_message(path, fd)) from None
            self._block_size = _logical_block_size(fd) if info.is_block else 1
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    @property
    def is_block(self) -> bool:
        return self.info.is_block

    def fileno(self) -> int:
        return self._fd

    # -- worker plumbing
    def _start_workers(self) -> None:
        with self._start_lock:
            if self._threads or self._closed:
                return
            name = os.path.basename(self.path) or self.path
            for i in range(self._workers):
                thread = threading.Thread(
                    target=_worker_loop,
                    args=(self._jobs,),
                    name=f"blockspace-io {name}#{i}",
                    daemon=True,
                )
                thread.start()
                self._threads.append(thread)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(*args) in a worker thread and wait for it without blocking trio."""
        if not self._threads:
            self._start_workers()
        task = trio.lowlevel.current_task()
        claim: list[None] = [None]
        reply: list[None] = [None]
        began = time.perf_counter()
        self._jobs.put((fn, args, _completions(), task, claim, reply))

        def abort(_raise_cancel: Any) -> trio.lowlevel.Abort:
            try:
                claim.pop()
            except IndexError:
                # Already running: the syscall cannot be stopped, but the task need not wait
                # for it (a hung disk must not hang the caller's timeout). Unless the result
                # is already on its way, abandon it.
                try:
                    reply.pop()
                except IndexError:
                    return trio.lowlevel.Abort.FAILED
            return trio.lowlevel.Abort.SUCCEEDED

        try:
            result: T = await trio.lowlevel.wait_task_rescheduled(abort)
        except DeviceError:
            self._latency.add(0, time.perf_counter() - began, True)
            raise
        self._latency.add(0, time.perf_counter() - began, False)
        return result

    # -- blocking primitives (run in workers, or directly by the *_sync methods)
    def _pread(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as e:
            raise _os_error(self.path, f"read at {offset}", e) from None
        if len(data) == length:
            return data
        buf = bytearray(length)
        buf[: len(data)] = data
        self._preadinto(memoryview(buf)[len(data) :], offset + len(data), offset, length)
        return bytes(buf)

    def _preadinto(self, view: memoryview, at: int, offset: int, length: int) -> None:
        """Fill `view` from `at`; `offset`/`length` describe the whole request, for errors."""
        done = 0
        while done < view.nbytes:
            try:
                n = os.preadv(self._fd, [view[done:]], at + done)
            except OSError as e:
                raise _os_error(self.path, f"read at {offset}", e) from None
            if n == 0:
                got = at + done - offset
                raise _plain_error(
                    self.path, f"read at {offset}", f"short read ({got} of {length} bytes)"
                )
            done += n

    def _pwrite(self, offset: int, data: Buffer) -> int:
        view = byte_view(data)
        done = 0
        while done < view.nbytes:
            try:
                n = os.pwrite(self._fd, view[done:], offset + done)
            except OSError as e:
                raise _os_error(self.path, f"write at {offset}", e) from None
            if n == 0:  # pragma: no cover - pwrite makes progress or fails
                raise _plain_error(self.path, f"write at {offset}", "no progress", errno.EIO)
            done += n
        return done

    def _fdatasync(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as e:
            raise _os_error(self.path, "flush", e) from None

    def _write_zeros(self, offset: int, length: int) -> None:
        zeros = _zeros()
        end = offset + length
        while offset < end:
            n = min(ZERO_CHUNK, end - offset)
            self._pwrite(offset, zeros if n == ZERO_CHUNK else memoryview(zeros)[:n])
            offset += n

    def _zero(self, offset: int, length: int) -> None:
        if length == 0:
            return
        what = f"zero at {offset}"
        if not self.info.is_block:
            fallocate = _libc_fallocate()
            if fallocate is not None:
                mode = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                if fallocate(self._fd, mode, offset, length) == 0:
                    return
                code = ctypes.get_errno()
                if code not in _ZERO_FALLBACK_ERRNOS:
                    raise _os_error(self.path, what, OSError(code, os.strerror(code)))
            self._write_zeros(offset, length)
            return
        # block device: BLKZEROOUT on the logical-block-aligned middle, writes for the edges
        bs = self._block_size
        start = -(-offset // bs) * bs
        end = (offset + length) // bs * bs
        if start >= end:
            self._write_zeros(offset, length)
            return
        try:
            fcntl.ioctl(self._fd, BLKZEROOUT, struct.pack("QQ", start, end - start))
        except OSError as e:
            if e.errno not in _ZERO_FALLBACK_ERRNOS:
                raise _os_error(self.path, what, e) from None
            self._write_zeros(start, end - start)
        if offset < start:
            self._write_zeros(offset, start - offset)
        if end < offset + length:
            self._write_zeros(end, offset + length - end)

    def reserve_sync(self, offset: int, length: int) -> None:
        # Written, not fallocate'd: an unwritten extent of ext4 is a hole to SEEK_DATA until
        # written, and then still needs an extent conversion; zeros are plainly allocated.
        what = f"reserve at {offset}"
        self._check(what, offset, length)
        self._check_writable(what)
        if self.info.is_block or length == 0:
            return
        self._write_zeros(offset, length)

    def host_room(self) -> int | None:
        if self.info.is_block or self._closed:
            return None
        try:
            st = os.fstatvfs(self._fd)  # a local statfs: no I/O to wait for
        except OSError:
            return None
        return st.f_bfree * st.f_frsize  # we write as root: the reserved blocks count

    def _check_writable(self, what: str) -> None:
        if not self.writable:
            raise _plain_error(self.path, what, "device is opened read-only", errno.EBADF)

    # -- async API
    async def read(self, offset: int, length: int) -> bytes:
        what = f"read at {offset}"
        self._check(what, offset, length)
        if length == 0:
            await trio.lowlevel.checkpoint()
            self._reads += 1
            return b""
        if self._nowait:
            buf = bytearray(length)
            got = await self._read_inline(buf, offset)
            if got == length:
                return bytes(buf)
            if got > 0:  # partly cached: a worker reads the rest into the same buffer
                await self._readinto_rest(memoryview(buf), offset, got)
                return bytes(buf)
        try:
            data = await self._run(self._pread, offset, length)
        except DeviceError:
            self._errors += 1
            raise
        self._reads += 1
        self._bytes_read += length
        return data

    def read_now(self, offset: int, length: int) -> bytes | None:
        if not self._nowait or self._closed or length <= 0 or offset < 0 \
                or offset + length > self.size:
            return None
        buf = bytearray(length)
        return bytes(buf) if self._preadv_nowait([buf], offset, length) == length else None

    def read_now_into(self, offset: int, buffers: list[memoryview]) -> bool:
        length = sum(buffer.nbytes for buffer in buffers)
        if not self._nowait or self._closed or length <= 0 or offset < 0 \
                or offset + length > self.size or len(buffers) > _IOV_MAX:
            return False
        return self._preadv_nowait(buffers, offset, length) == length

    async def readinto(self, offset: int, buf: bytearray | memoryview) -> None:
        view = byte_view(buf)
        length = view.nbytes
        self._check(f"read at {offset}", offset, length)
        if length == 0:
            await trio.lowlevel.checkpoint()
            self._reads += 1
            return
        got = await self._read_inline(view, offset) if self._nowait else 0
        if got < length:
            await self._readinto_rest(view, offset, got)

    async def _read_inline(self, buf: bytearray | memoryview, offset: int) -> int:
        """Try a non-blocking read from the page cache on the trio thread. Returns the bytes
        read: all of them (counted and checkpointed, done), some, or 0 (go to a worker)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        n = self._preadv_nowait([buf], offset, len(buf))
        if n == len(buf):
            await trio.lowlevel.cancel_shielded_checkpoint()
        return n

    def _preadv_nowait(self, buffers: list[Any], offset: int, length: int) -> int:
        """preadv(RWF_NOWAIT) into `buffers` (`length` bytes in all): the bytes read
        (counted when that is all of them), or 0 when it would block or fails (a worker
        retries and reports a real error)."""
        try:
            n = os.preadv(self._fd, buffers, offset, _NOWAIT_FLAG)
        except BlockingIOError:
            return 0
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._nowait = False  # this file/kernel has no RWF_NOWAIT; stop trying
            return 0
        if n == length:
            self._reads += 1
            self._inline_reads += 1
            self._bytes_read += n
        return n

    async def _readinto_rest(self, view: memoryview, offset: int, got: int) -> None:
        length = view.nbytes
        try:
            await self._run(self._preadinto, view[got:], offset + got, offset, length)
        except DeviceError:
            self._errors += 1
            raise
        self._reads += 1
        self._bytes_read += length

    async def write(self, offset: int, data: Buffer) -> None:
        what = f"write at {offset}"
        length = byte_view(data).nbytes
        self._check(what, offset, length)
        self._check_writable(what)
        if length == 0:
            await trio.lowlevel.checkpoint()
            return
        try:
            await self._write_pieces([(offset, data)])
        except DeviceError:
            self._errors += 1
            raise
        self._writes += 1
        self._bytes_written += length

    async def write_many(self, pieces: list[tuple[int, Buffer]]) -> None:
        lengths = []
        for offset, data in pieces:
            what = f"write at {offset}"
            length = byte_view(data).nbytes
            self._check(what, offset, length)
            self._check_writable(what)
            lengths.append(length)
        if not any(lengths):
            await trio.lowlevel.checkpoint()
            return
        try:
            await self._write_pieces(pieces)
        except DeviceError:
            self._errors += 1
            raise
        self._writes += sum(1 for length in lengths if length)
        self._bytes_written += sum(lengths)

    def ring_chain(self, pieces: list[tuple[int, Buffer]]) -> uring.Chain | None:
        if not self._use_ring or self._closed or not self.writable:
            return None
        views = []
        for offset, data in pieces:
            view = byte_view(data)
            if offset < 0 or offset + view.nbytes > self.size:
                return None
            if view.nbytes:
                views.append((offset, view))
        if not views or uring.current() is None:
            return None
        return uring.Chain(self._fd, views)

    def ring_written(self, chain: uring.Chain) -> None:
        self._ring_writes += 1
        self._writes += len(chain.pieces)
        self._bytes_written += sum(view.nbytes for _, view in chain.pieces)

    def _pwrite_many(self, pieces: list[tuple[int, Buffer]]) -> None:
        for offset, data in pieces:
            self._pwrite(offset, data)

    async def _write_pieces(self, pieces: list[tuple[int, Buffer]]) -> None:
        """Write the pieces in order: through io_uring when this run has a ring, else (or
        for whatever the ring could not finish) through a worker."""
        views = [(offset, byte_view(data)) for offset, data in pieces]
        views = [(offset, view) for offset, view in views if view.nbytes]
        ring = uring.current() if self._use_ring else None
        if ring is None:
            await self._run(self._pwrite_many, views)
            return
        began = time.perf_counter()
        try:
            results = await ring.write(self._fd, views)
            self._latency.add(0, time.perf_counter() - began, False)
        except OSError as e:  # the ring refused the request: the worker does it
            log.debug("%s: io_uring submission failed (%s), using a worker", self.path, e)
            await self._run(self._pwrite_many, views)
            return
        self._ring_writes += 1
        index = uring.check(results, [view.nbytes for _, view in views])
        if index is None:
            return
        offset, view = views[index]
        result = results[index]
        if result < 0 and -result not in _RING_RETRY_ERRNOS:
            raise _os_error(self.path, f"write at {offset}", uring.error_of(result))
        if -result in (errno.EINVAL, errno.EOPNOTSUPP):
            self._use_ring = False  # this file cannot take io_uring writes
        done = max(result, 0)  # a short write: the worker finishes it and the rest
        await self._run(self._pwrite_many, [(offset + done, view[done:]), *views[index + 1 :]])

    async def flush(self) -> None:
        self._check("flush", 0, 0)
        try:
            await self._run(self._fdatasync)
        except DeviceError:
            self._errors += 1
            raise
        self._flushes += 1

    async def zero(self, offset: int, length: int) -> None:
        what = f"zero at {offset}"
        self._check(what, offset, length)
        self._check_writable(what)
        try:
            await self._run(self._zero, offset, length)
        except DeviceError:
            self._errors += 1
            raise

    # -- blocking API
    def read_sync(self, offset: int, length: int) -> bytes:
        self._check(f"read at {offset}", offset, length)
        try:
            data = self._pread(offset, length)
        except DeviceError:
            self._errors += 1
            raise
        self._reads += 1
        self._bytes_read += length
        return data

    def write_sync(self, offset: int, data: Buffer) -> None:
        what = f"write at {offset}"
        length = byte_view(data).nbytes
        self._check(what, offset, length)
        self._check_writable(what)
        try:
            self._pwrite(offset, data)
        except DeviceError:
            self._errors += 1
            raise
        self._writes += 1
        self._bytes_written += length

    def flush_sync(self) -> None:
        self._check("flush", 0, 0)
        try:
            self._fdatasync()
        except DeviceError:
            self._errors += 1
            raise
        self._flushes += 1

    def zero_sync(self, offset: int, length: int) -> None:
        what = f"zero at {offset}"
        self._check(what, offset, length)
        self._check_writable(what)
        try:
            self._zero(offset, length)
        except DeviceError:
            self._errors += 1
            raise

    def close(self) -> None:
        """Stop the workers (requests already queued finish first), then close the fd, which
        drops the lock. Blocks until queued I/O is done: call it when no I/O is in flight,
        from the thread that submits I/O."""
        if self._closed:
            return
        self._closed = True
        with self._start_lock:
            threads, self._threads = self._threads, []
        for _ in threads:
            self._jobs.put(None)
        for thread in threads:
            if thread is not threading.current_thread():
                thread.join()
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)

    def __del__(self) -> None:
        # Unclosed and unreachable: no job can be pending (jobs reference the device), so
        # the fd can go. Stop the idle workers without waiting for them.
        threads = getattr(self, "_threads", None)
        if threads:
            for _ in threads:
                self._jobs.put(None)
        fd = getattr(self, "_fd", -1)
        if fd >= 0:
            self._fd = -1
            try:
                os.close(fd)
            except OSError:
                pass


def open_device(path: str, *, writable: bool = True) -> FileDevice:
    """Open an image file or block device as a pool disk (exclusively locked)."""
    return FileDevice(path, writable=writable)
