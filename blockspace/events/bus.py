"""The daemon's event bus: `emit` from anywhere on the trio thread without blocking (the I/O
path calls it); a task appends to the log off the trio thread and another runs the hooks.

Bounded: each queue holds QUEUE events; past that an event is dropped and counted (the
log says so), never waited for: an event is never worth stalling I/O."""

import logging
import math
from pathlib import Path
from typing import Any

import trio

from blockspace.events.hooks import HOOK_TIMEOUT, run_hooks
from blockspace.events.log import EventLog
from blockspace.events.record import Event, describe, make_event

log = logging.getLogger(__name__)

QUEUE = 1000


class EventBus:
    def __init__(self, pool: str, event_log: EventLog, hooks: Path | None, *,
                 hook_timeout: float = HOOK_TIMEOUT) -> None:
        self.pool = pool
        self.log = event_log
        self.hooks = hooks
        self.hook_timeout = hook_timeout
        self.dropped = 0
        self._to_log, self._log_queue = trio.open_memory_channel[Event](QUEUE)
        self._to_hooks, self._hook_queue = trio.open_memory_channel[Event](QUEUE)

    def emit(self, event_class: str, **fields: Any) -> None:
        event = make_event(event_class, self.pool, **fields)
        log.info("event %s", describe(event))
        for channel in (self._to_log, self._to_hooks):
            try:
                channel.send_nowait(event)
            except trio.WouldBlock:
                self.dropped += 1
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                pass

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._write_log)
            if self.hooks is not None:
                nursery.start_soon(self._run_hooks, self.hooks)
            task_status.started()

    async def drain(self, grace: float = 5.0) -> None:
        """At a stop, when the tasks of `run` are cancelled already: the events still queued
        (the last one, "unmount", among them) go to the log and their hooks here, for at
        most `grace` seconds."""
        self._to_log.close()
        self._to_hooks.close()
        with trio.move_on_after(grace):
            for event in _pending(self._log_queue):
                await trio.to_thread.run_sync(self._append, event)
            if self.hooks is not None:
                for event in _pending(self._hook_queue):
                    await run_hooks(self.hooks, event, self.hook_timeout)

    async def _write_log(self) -> None:
        async for event in self._log_queue:
            await trio.to_thread.run_sync(self._append, event)

    def _append(self, event: Event) -> None:
        try:
            if self.dropped:
                dropped, self.dropped = self.dropped, 0
                log.error("event log: %d events dropped (queue full)", dropped)
            self.log.append(event)
        except OSError as error:  # the host's file system: logged, never fatal
            log.error("event log %s: %s", self.log.path, error.strerror or error)

    async def _run_hooks(self, directory: Path) -> None:
        async for event in self._hook_queue:
            await run_hooks(directory, event, self.hook_timeout)


def _pending(queue: trio.MemoryReceiveChannel[Event]) -> list[Event]:
    """What is left in a queue whose sending side is closed."""
    events = []
    while True:
        try:
            events.append(queue.receive_nowait())
        except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
            return events


def crossed(thresholds: tuple[float, ...], before: float, after: float) -> list[tuple[float, str]]:
    """Thresholds (percent) that a fullness change from `before` to `after` crossed, with
    the direction: ("up" when it reached one, "down" when it fell below)."""
    result = []
    for limit in thresholds:
        if not math.isfinite(before):
            continue
        if before < limit <= after:
            result.append((limit, "up"))
        elif after < limit <= before:
            result.append((limit, "down"))
    return result
