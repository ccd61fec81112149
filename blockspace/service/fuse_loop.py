"""Requests already queued on /dev/fuse are read at once, not after a trip through trio.

pyfuse3 (3.5) serves one request per pass of trio's scheduler: each of its worker tasks takes
a lock, waits in `trio.lowlevel.wait_readable` for /dev/fuse (an `epoll_ctl`, an `epoll_wait`
and a scheduler pass), reads one request and handles it. At queue depth 16 the kernel has
requests waiting, yet every one of them pays that trip: strace counts the same six syscalls
per 4 KiB read at queue depth 1 and 16, and daemon CPU per request does not fall with depth
(docs/benchmarks.md, "Queue depth"). Its loop looks the wait up by name on every request
(`pyfuse3._wait_fuse_readable`, a module global of its Cython code), so `install` swaps in
`QueuedFirst`: a non-blocking `poll` first, and trio's wait only when nothing is queued.

What the swap must keep:

* one task at a time waits on the fd (trio refuses two), and a task woken by epoll whose
  request another task took in between must not go on to a blocking read: it polls again;
* the daemon's other tasks (lease heartbeat, I/O timeouts, the control socket) still run when
  requests never await (cached reads): every `FAIRNESS`-th request passes a checkpoint;
* `terminate` still ends every worker: pyfuse3 checks its own exit flag only inside the wait
  we replace, so `terminate()` here sets ours before calling pyfuse3's.

pyfuse3's spawn rule counts the tasks in its own wait, which the swap bypasses: it starts a
task per request until `max_tasks`, and none ends while serving. `MAX_TASKS` bounds them
(each holds a receive buffer). `BLOCKSPACE_FUSE_LOOP=stock` keeps pyfuse3's loop as it is, and
a pyfuse3 without the hook keeps it too.
"""

from __future__ import annotations

import logging
import os
import select
from collections.abc import Awaitable, Callable, Iterable

import pyfuse3
import trio

log = logging.getLogger(__name__)

HOOK = "_wait_fuse_readable"  # the name pyfuse3's session loop calls its wait by
DISABLE_ENV = "BLOCKSPACE_FUSE_LOOP"  # "stock": leave pyfuse3's loop alone
FAIRNESS = 16  # a checkpoint every this many requests read at once
MAX_TASKS = 16  # pyfuse3 worker tasks with the swap (the kernel sends 12 in the background)
STOCK_MAX_TASKS = 99  # pyfuse3.main's own default
STOCK_WAIT: Callable[[], Awaitable[bool]] | None = getattr(pyfuse3, HOOK, None)


class QueuedFirst:
    """pyfuse3's wait for /dev/fuse, polling before it waits. Returns True when a read of
    `fd` will not block, False when the session is over (`terminate`, or the fd closed)."""

    def __init__(self, fd: int, *, fairness: int = FAIRNESS) -> None:
        self._fd = fd
        self._poll = select.poll()
        self._poll.register(fd, select.POLLIN)
        self._lock = trio.Lock()  # one waiter on the fd at a time
        self._fairness = fairness
        self._in_a_row = 0
        self.closed = False
        self.at_once = 0  # requests read without waiting
        self.after_wait = 0  # requests read after waiting in trio

    def _queued(self) -> bool:
        # POLLERR/POLLHUP count: the read that follows reports them (ENODEV ends the session).
        return bool(self._poll.poll(0))

    async def __call__(self) -> bool:
        waited = False
        while not self.closed:
            if self._queued():
                self._in_a_row += 1
                if self._in_a_row < self._fairness:
                    # No await between this poll and pyfuse3's read: nobody can take it.
                    if waited:
                        self.after_wait += 1
                    else:
                        self.at_once += 1
                    return True
                self._in_a_row = 0
                await trio.lowlevel.checkpoint()
                continue  # another task may have read it meanwhile
            self._in_a_row = 0
            waited = True
            try:
                async with self._lock:
                    if self.closed:
                        break
                    await trio.lowlevel.wait_readable(self._fd)
            except trio.ClosedResourceError:  # pyfuse3.terminate closes the fd for waiters
                self.closed = True
        return False

    def terminate(self) -> None:
        self.closed = True


def fuse_fds() -> set[int]:
    """This process's open /dev/fuse descriptors."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                found.add(int(name))
        except (OSError, ValueError):
            continue  # closed meanwhile (the listing's own fd)
    return found


def session_fd(before: Iterable[int], after: Iterable[int]) -> int | None:
    """The session's fd: the one /dev/fuse descriptor pyfuse3.init opened, if exactly one."""
    opened = set(after) - set(before)
    return opened.pop() if len(opened) == 1 else None


class FuseLoop:
    """The daemon's handle on pyfuse3's loop: `init` in place of pyfuse3.init, then `main`
    and `terminate` in place of pyfuse3's."""

    def __init__(self) -> None:
        self.waiter: QueuedFirst | None = None

    def init(self, operations: pyfuse3.Operations, mountpoint: str, options: set[str]) -> None:
        before = fuse_fds()
        pyfuse3.init(operations, mountpoint, options)
        if STOCK_WAIT is not None:
            setattr(pyfuse3, HOOK, STOCK_WAIT)  # an earlier mount in this process swapped it
        if os.environ.get(DISABLE_ENV) == "stock":
            log.info("FUSE loop: pyfuse3's own (%s=stock)", DISABLE_ENV)
            return
        fd = session_fd(before, fuse_fds())
        if fd is None or STOCK_WAIT is None:
            log.info("FUSE loop: pyfuse3's own (no %s hook or no single session fd)", HOOK)
            return
        self.waiter = QueuedFirst(fd)
        setattr(pyfuse3, HOOK, self.waiter)

    async def main(self) -> None:
        await pyfuse3.main(max_tasks=MAX_TASKS if self.waiter is not None else STOCK_MAX_TASKS)

    def terminate(self) -> None:
        if self.waiter is not None:
            self.waiter.terminate()
        pyfuse3.terminate()

    def summary(self) -> str:
        if self.waiter is None:
            return "FUSE loop: pyfuse3's own"
        return (f"FUSE loop: {self.waiter.at_once} requests read at once, "
                f"{self.waiter.after_wait} after a wait")
