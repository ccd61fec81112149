"""Jobs carried out by a few long-lived trio tasks that take them in turn, instead of a task
started per job: for NBD's 4K requests the spawn and first scheduling of a task each were a
visible share of a request's CPU. A busy worker takes the next job without a trip through the
scheduler; an idle one is woken for a new job (one wake, no spawn).

The caller bounds how many jobs are queued or running (the NBD connection's slots); the pool
bounds only its tasks. A job that raises ends the pool's nursery, as a task of its own would.
"""

from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio


class WorkQueue:
    def __init__(self, nursery: trio.Nursery, handler: Callable[..., Awaitable[None]], *,
                 workers: int) -> None:
        if workers < 1:
            raise ValueError("a work queue needs at least one worker")
        self._nursery = nursery
        self._handler = handler
        self._limit = workers
        self._jobs: deque[tuple[Any, ...]] = deque()
        self._started = 0
        self._idle = 0  # parked and not yet woken
        self._lot = trio.lowlevel.ParkingLot()
        self._closing = False

    @property
    def workers(self) -> int:
        return self._started

    def submit(self, *job: Any) -> None:
        """`handler(*job)` soon, in one of the workers; never waits."""
        if self._closing:
            raise RuntimeError("submit to a closed work queue")
        self._jobs.append(job)
        if self._idle:
            self._idle -= 1  # counted here, so two submits in a row wake two workers
            self._lot.unpark(count=1)
        elif self._started < self._limit:
            self._started += 1
            self._nursery.start_soon(self._work)

    def close(self) -> None:
        """No more jobs: the workers finish what is queued, then return."""
        self._closing = True
        self._idle = 0
        self._lot.unpark_all()

    async def _work(self) -> None:
        jobs = self._jobs
        while True:
            if jobs:
                await self._handler(*jobs.popleft())
                continue
            if self._closing:
                return
            self._idle += 1
            await self._lot.park()
