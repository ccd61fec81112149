"""Where the daemon's log goes, and how much of it gets there.

Started by systemd (`JOURNAL_STREAM` names the stderr it gave us), each line goes to stderr
with its syslog priority as a `<N>` prefix and no timestamp: journald reads the prefix,
stamps the time itself and files the line under the unit. Otherwise the log is a file in the
state directory, written through `WatchedFileHandler`, which reopens it when logrotate moved
it away (no copytruncate needed, nothing lost to a rotation).

Either way a `RateLimitFilter` keeps one storm from drowning everything else: the same
message key at most `burst` times per `interval`, then one "... repeated K times" line.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path

# syslog priorities (sd-daemon(3)): what journald reads from a "<N>" line prefix
PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
              (logging.INFO, 6))
DEBUG_PRIORITY = 7

DEFAULT_BURST = 10  # lines of one key per interval before the rest are only counted
DEFAULT_INTERVAL = 60.0
MAX_KEYS = 4096  # keys tracked at once; the oldest quiet ones are forgotten first

FILE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def syslog_priority(levelno: int) -> int:
    for level, priority in PRIORITIES:
        if levelno >= level:
            return priority
    return DEBUG_PRIORITY


class JournalFormatter(logging.Formatter):
    """`<priority>logger: message`, every line of a multi-line record (a traceback) prefixed,
    since journald takes each line as an entry of its own."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def journal_stream(environ: Mapping[str, str], fd: int = 2) -> bool:
    """Is `fd` the journal stream systemd gave this service? `JOURNAL_STREAM` is
    "DEVICE:INODE" of it; a child whose stderr was redirected inherits the variable but not
    the stream, so the pair must match (systemd.exec(5))."""
    value = environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    try:
        st = os.fstat(fd)
        return (int(device), int(inode)) == (st.st_dev, st.st_ino)
    except (ValueError, OSError):
        return False


@dataclass
class _Window:
    start: float
    count: int = 0
    suppressed: int = 0
    last: logging.LogRecord | None = None  # the last record not logged


class RateLimitFilter(logging.Filter):
    """At most `burst` records of one key per `interval` seconds pass; the rest are counted,
    and when the window ends one summary record says how many were dropped, with the text of
    the last one ("... repeated K times in 60s: disk 2: read of ... failed").

    The key is the record's `ratelimit_key` (pass it in `extra=`) or, by default, the logger,
    the level and the format string, so "disk %d: read failed at %d" is one key whatever the
    offset. The summary goes to `sink` (the handler, set by `attach`) when the next record
    arrives after the window, or at `flush` (the process's exit)."""

    def __init__(self, burst: int = DEFAULT_BURST, interval: float = DEFAULT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.burst = burst
        self.interval = interval
        self.clock = clock
        self.sink: Callable[[logging.LogRecord], object] | None = None
        self._windows: dict[Hashable, _Window] = {}
        self._next_sweep = 0.0

    def attach(self, handler: logging.Handler) -> None:
        handler.addFilter(self)
        self.sink = handler.handle

    @staticmethod
    def key(record: logging.LogRecord) -> Hashable:
        explicit = getattr(record, "ratelimit_key", None)
        if explicit is not None:
            return explicit
        return (record.name, record.levelno, str(record.msg))

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "ratelimit_summary", False):
            return True
        now = self.clock()
        if now >= self._next_sweep:  # storms that stopped still get their summary
            self._next_sweep = now + min(1.0, self.interval)
            self._sweep(now)
        key = self.key(record)
        window = self._windows.get(key)
        if window is not None and now - window.start >= self.interval:
            self._close(key, window, now)
            window = None
        if window is None:
            if len(self._windows) >= MAX_KEYS:
                self._forget_oldest(now)
            window = self._windows[key] = _Window(now)
        window.count += 1
        if window.count <= self.burst:
            return True
        window.suppressed += 1
        window.last = record
        return False

    def flush(self) -> None:
        """Emit every pending summary now (at exit: the last storm is not lost)."""
        now = self.clock()
        for key, window in list(self._windows.items()):
            self._close(key, window, now)

    def _sweep(self, now: float) -> None:
        for key, window in list(self._windows.items()):
            if now - window.start >= self.interval:
                self._close(key, window, now)

    def _forget_oldest(self, now: float) -> None:
        oldest = min(self._windows, key=lambda k: self._windows[k].start)
        self._close(oldest, self._windows[oldest], now)

    def _close(self, key: Hashable, window: _Window, now: float) -> None:
        del self._windows[key]
        if window.suppressed and window.last is not None and self.sink is not None:
            self.sink(summary_record(window.last, window.suppressed,
                                     max(now - window.start, 0.0)))


def summary_record(last: logging.LogRecord, repeated: int, seconds: float) -> logging.LogRecord:
    text = f"... repeated {repeated} times in {seconds:.0f}s (not logged), the last: " \
           f"{last.getMessage()}"
    record = logging.LogRecord(last.name, last.levelno, last.pathname, last.lineno, text,
                               None, None)
    record.ratelimit_summary = True
    return record


def setup_logging(log_file: str, level: int = logging.INFO, *,
                  environ: Mapping[str, str] | None = None) -> RateLimitFilter:
    """The daemon's logging: the journal when systemd's stream is our stderr, else `log_file`
    (reopened after a rotation), else plain stderr; rate-limited in every case."""
    environ = os.environ if environ is None else environ
    handler: logging.Handler
    if journal_stream(environ):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JournalFormatter())
    elif log_file:
        Path(log_file).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        handler = logging.handlers.WatchedFileHandler(log_file)
        handler.setFormatter(logging.Formatter(FILE_FORMAT))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FILE_FORMAT))
    limiter = RateLimitFilter()
    limiter.attach(handler)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    atexit.register(limiter.flush)  # runs before logging's own shutdown (registered earlier)
    return limiter
