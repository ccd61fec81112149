"""The daemon's logging (service/logging_setup.py): the rate limit, the journal's line format
and when it is chosen, the logrotate-safe file."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockspace.repair.scrub import ScrubReport
from blockspace.service import logging_setup
from blockspace.service.logging_setup import JournalFormatter, RateLimitFilter, journal_stream


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(msg: str, *args: object, level: int = logging.WARNING,
           key: object = None) -> logging.LogRecord:
    made = logging.LogRecord("blockspace.pool.pool", level, __file__, 1, msg, args, None)
    if key is not None:
        made.ratelimit_key = key
    return made


def limited(burst: int = 3, interval: float = 60.0) -> tuple[RateLimitFilter, Clock, list[str]]:
    clock = Clock()
    limiter = RateLimitFilter(burst=burst, interval=interval, clock=clock)
    summaries: list[str] = []
    limiter.sink = lambda r: summaries.append(r.getMessage())
    return limiter, clock, summaries


def test_the_same_message_passes_burst_times_then_is_counted_and_summarized_once() -> None:
    limiter, clock, summaries = limited(burst=3)
    passed = [limiter.filter(record("disk %d: read failed at %d", 2, n)) for n in range(25)]
    assert passed == [True] * 3 + [False] * 22
    assert summaries == []  # still inside the window
    clock.now += 61
    assert limiter.filter(record("disk %d: read failed at %d", 2, 99))  # a new window
    assert len(summaries) == 1
    assert summaries[0].startswith("... repeated 22 times in 61s")
    assert summaries[0].endswith("disk 2: read failed at 24")  # the last one dropped
    clock.now += 61
    assert limiter.filter(record("disk %d: read failed at %d", 2, 100))
    assert len(summaries) == 1  # nothing was dropped in the last window: no summary


def test_different_keys_are_limited_separately() -> None:
    limiter, _, _ = limited(burst=1)
    assert limiter.filter(record("a %d", 1))
    assert not limiter.filter(record("a %d", 2))
    assert limiter.filter(record("b %d", 1))  # another format string
    assert limiter.filter(record("a %d", 1, level=logging.ERROR))  # another level
    assert limiter.filter(record("x", key=("io", 1)))
    assert limiter.filter(record("x", key=("io", 2)))  # an explicit key per disk
    assert not limiter.filter(record("x", key=("io", 1)))


def test_a_storm_that_stops_is_summarized_by_later_traffic_or_at_flush() -> None:
    limiter, clock, summaries = limited(burst=1)
    for _ in range(5):
        limiter.filter(record("storm"))
    clock.now += 61
    assert limiter.filter(record("something else"))  # the sweep closes the storm's window
    assert summaries == ["... repeated 4 times in 61s (not logged), the last: storm"]
    for _ in range(3):
        limiter.filter(record("second storm"))
    limiter.flush()
    assert summaries[-1].startswith("... repeated 2 times")


def test_the_summary_goes_through_the_handler_with_the_level_of_the_dropped_lines(
    tmp_path: Path,
) -> None:
    handler = logging.FileHandler(tmp_path / "log")
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    clock = Clock()
    limiter = RateLimitFilter(burst=2, interval=10, clock=clock)
    limiter.attach(handler)
    for n in range(10):
        handler.handle(record("disk 1: read failed at %d", n, level=logging.ERROR))
    clock.now += 11
    handler.handle(record("disk 1: read failed at %d", 10, level=logging.ERROR))
    handler.close()
    lines = (tmp_path / "log").read_text().splitlines()
    assert lines[:2] == ["ERROR disk 1: read failed at 0", "ERROR disk 1: read failed at 1"]
    assert lines[2].startswith("ERROR ... repeated 8 times in 11s")
    assert lines[3] == "ERROR disk 1: read failed at 10"
    assert len(lines) == 4


def test_journal_lines_carry_the_syslog_priority_and_no_timestamp() -> None:
    formatter = JournalFormatter()
    assert formatter.format(record("disk %d failed", 2, level=logging.ERROR)) == \
        "<3>blockspace.pool.pool: disk 2 failed"
    assert formatter.format(record("w", level=logging.WARNING)).startswith("<4>")
    assert formatter.format(record("i", level=logging.INFO)).startswith("<6>")
    assert formatter.format(record("d", level=logging.DEBUG)).startswith("<7>")
    assert formatter.format(record("c", level=logging.CRITICAL)).startswith("<2>")
    two = formatter.format(record("first\nsecond", level=logging.ERROR))
    assert two.splitlines() == ["<3>blockspace.pool.pool: first", "<3>second"]


def test_journal_stream_must_name_our_stderr(tmp_path: Path) -> None:
    with open(tmp_path / "f", "w") as handle:
        st = os.fstat(handle.fileno())
        assert journal_stream({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}, handle.fileno())
        assert not journal_stream({"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"},
                                  handle.fileno())
        assert not journal_stream({"JOURNAL_STREAM": "garbage"}, handle.fileno())
        assert not journal_stream({}, handle.fileno())


JOURNAL_CHILD = """
import logging, os, sys
from blockspace.service.logging_setup import setup_logging
st = os.fstat(2)
env = {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"} if sys.argv[1] == "journal" else {}
setup_logging(sys.argv[2], environ=env)
log = logging.getLogger("blockspace.test")
log.error("disk %d: gone", 3)
for n in range(30):
    log.warning("storm %d", n)
"""


@pytest.mark.parametrize("mode", ["journal", "file"])
def test_setup_logging_picks_the_journal_when_systemd_gave_the_stream(
    tmp_path: Path, mode: str
) -> None:
    log_file = tmp_path / "log" / "tank.log"
    result = subprocess.run(
        [sys.executable, "-c", JOURNAL_CHILD, mode, str(log_file)],
        capture_output=True, text=True, timeout=60, check=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    if mode == "journal":
        lines = result.stderr.splitlines()
        assert lines[0] == "<3>blockspace.test: disk 3: gone"
        assert all(line.startswith("<4>blockspace.test: storm ") for line in lines[1:11])
        # at exit, the summary of the 20 dropped
        assert lines[11].startswith("<4>blockspace.test: ... repeated 20 times")
        assert len(lines) == 12
        assert not log_file.exists()
    else:
        assert result.stderr == ""
        lines = log_file.read_text().splitlines()
        assert "ERROR blockspace.test: disk 3: gone" in lines[0]
        assert lines[0][:4].isdigit()  # a timestamp: the file has no journald to add one
        assert len(lines) == 12


def test_the_log_file_is_reopened_after_logrotate_moved_it(tmp_path: Path) -> None:
    log_file = tmp_path / "tank.log"
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        logging_setup.setup_logging(str(log_file), environ={})
        logging.getLogger("blockspace.t").info("before")
        log_file.rename(tmp_path / "tank.log.1")  # what logrotate does (no copytruncate)
        logging.getLogger("blockspace.t").info("after")
        for handler in root.handlers:
            handler.flush()
        assert "before" in (tmp_path / "tank.log.1").read_text()
        assert "after" not in (tmp_path / "tank.log.1").read_text()
        assert "after" in log_file.read_text()
    finally:
        for handler in root.handlers:
            handler.close()
        root.handlers[:], level = saved
        root.setLevel(level)


def test_the_scrub_summary_is_a_readable_line() -> None:
    report = ScrubReport(bytes_checked=3 << 30, blocks_checked=786432, checksum_errors=2,
                         mismatches=1, repaired_blocks=3,
                         unrecoverable=[("vol0", 4096, 8192)])
    line = report.summary()
    assert line == ("3G checked (786432 blocks), 2 checksum errors, 1 mismatches, "
                    "3 blocks repaired, 1 unrecoverable ranges: vol0 at 4096 length 8192")
    assert "{" not in ScrubReport().summary()
