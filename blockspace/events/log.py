"""The per-pool event log: JSON lines in STATE_DIR/events/POOL.jsonl, rotated by size.

Bounded: once the file passes `max_bytes` it becomes POOL.jsonl.1 (the older ones shift up
to `.KEEP`, the oldest dropped), so the log never holds more than (keep + 1) * max_bytes.
Appends are single write(2) calls under an flock, so the daemon and an offline command never
interleave a line; a torn or damaged line (a crash mid-write) is skipped on reading."""

import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from blockspace.events.record import Event

MAX_BYTES = 1 << 20
KEEP = 3


def events_path(state_root: Path, pool: str) -> Path:
    return state_root / "events" / f"{pool}.jsonl"


def parse_line(line: bytes) -> Event | None:
    """The event on one line, or None for a torn or foreign line."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("class"), str):
        return None
    return event


class EventLog:
    def __init__(self, path: Path, *, max_bytes: int = MAX_BYTES, keep: int = KEEP) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep

    def rotated(self, index: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{index}")

    def append(self, event: Event) -> None:
        """Add one event (blocking: the daemon calls it off the trio thread)."""
        line = json.dumps(event, sort_keys=True).encode() + b"\n"
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # The file we locked may have been rotated away by another writer meanwhile.
            if os.fstat(fd).st_ino != _inode(self.path):
                os.close(fd)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line)
            if os.fstat(fd).st_size >= self.max_bytes:
                self._rotate()
        finally:
            os.close(fd)

    def _rotate(self) -> None:
        self.rotated(self.keep).unlink(missing_ok=True)
        for index in range(self.keep - 1, 0, -1):
            if self.rotated(index).exists():
                os.replace(self.rotated(index), self.rotated(index + 1))
        if self.keep > 0:
            os.replace(self.path, self.rotated(1))
        else:
            self.path.unlink()

    def files(self) -> list[Path]:
        """The log's files, oldest first."""
        older = [self.rotated(i) for i in range(self.keep, 0, -1)]
        return [p for p in [*older, self.path] if p.exists()]

    def read(self) -> list[Event]:
        """Every event still kept, oldest first."""
        return self.read_with_end()[0]

    def read_with_end(self) -> tuple[list[Event], tuple[int, int] | None]:
        """Every event still kept, and where the current file ended (inode, offset): what
        `follow` starts from, so no event written meanwhile falls between the two."""
        events = []
        end = None
        for path in self.files():
            try:
                with open(path, "rb") as handle:
                    data = handle.read()
                    inode = os.fstat(handle.fileno()).st_ino
            except FileNotFoundError:  # rotated away while we read
                continue
            complete = data[:data.rfind(b"\n") + 1]  # a line being written is for later
            if path == self.path:
                end = (inode, len(complete))
            for line in complete.splitlines():
                event = parse_line(line)
                if event is not None:
                    events.append(event)
        return events, end

    def follow(self, *, after: tuple[int, int] | None = None, interval: float = 0.2,
               stop: float | None = None) -> Iterator[Event]:
        """Events appended after `after` (from `read_with_end`; None: from now on), as
        `tail -F` finds them (across rotations); until the caller stops iterating, or until
        time.monotonic() passes `stop`."""
        handle = None
        inode = None
        pending = b""
        if self.path.exists():
            handle = open(self.path, "rb")  # noqa: SIM115 - kept open across iterations
            inode = os.fstat(handle.fileno()).st_ino
            if after is None:
                handle.seek(0, os.SEEK_END)
            elif after[0] == inode:
                handle.seek(after[1])
            # else: rotated since `after` was taken; the new file is read from its start
        try:
            while stop is None or time.monotonic() < stop:
                if handle is not None:
                    chunk = handle.read()
                    if chunk:
                        pending += chunk
                        *lines, pending = pending.split(b"\n")
                        for line in lines:
                            event = parse_line(line)
                            if event is not None:
                                yield event
                        continue
                current = _inode(self.path)
                if current is not None and current != inode:  # created or rotated
                    if handle is not None:
                        handle.close()
                    handle = open(self.path, "rb")  # noqa: SIM115
                    inode = os.fstat(handle.fileno()).st_ino
                    pending = b""
                    continue
                time.sleep(interval)
        finally:
            if handle is not None:
                handle.close()


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None
