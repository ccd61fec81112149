"""The event log (bounded, rotated, torn lines skipped, followed across rotations), hook
selection, trust and environment, the pool history's choice of commands, threshold and
progress transitions."""

import json
import os
import stat
import threading
import time
from pathlib import Path

import pytest
import trio

from blockspace.events import history
from blockspace.events.bus import EventBus, crossed
from blockspace.events.hooks import hook_env, hook_matches, hooks_for, run_hook, trusted
from blockspace.events.log import EventLog, events_path
from blockspace.events.record import describe, make_event
from blockspace.service.observe import progress_events


def event(n: int) -> dict[str, object]:
    return make_event("disk_state", "tank", now=float(n), disk=n, state="failed",
                      reason="x" * 50)


def test_the_log_keeps_events_in_order_and_stays_bounded(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "events" / "tank.jsonl", max_bytes=2000, keep=2)
    for n in range(200):
        log.append(event(n))
    files = log.files()
    assert [p.name for p in files] == ["tank.jsonl.2", "tank.jsonl.1", "tank.jsonl"]
    # Bounded: never more than (keep + 1) files of about max_bytes each.
    assert sum(p.stat().st_size for p in files) <= 3 * (2000 + 200)
    kept = [e["disk"] for e in log.read()]
    assert kept == list(range(200 - len(kept), 200))  # the newest, oldest first, no gap
    assert len(kept) > 20
    assert stat.S_IMODE(log.path.stat().st_mode) == 0o600


def test_a_torn_or_foreign_line_is_skipped(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "tank.jsonl")
    log.append(event(1))
    with open(log.path, "ab") as handle:
        handle.write(b'{"class": "disk_st')  # a crash in the middle of a line
        handle.write(b"\n[1, 2]\n\xff\xfe\n")
    log.append(event(2))
    assert [e["disk"] for e in log.read()] == [1, 2]


def test_follow_sees_new_events_across_a_rotation(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "tank.jsonl", max_bytes=600, keep=1)
    log.append(event(0))  # before the follow: not reported again

    def writer() -> None:
        for n in range(1, 11):  # a rotation every few events
            time.sleep(0.02)
            log.append(event(n))

    thread = threading.Thread(target=writer)
    thread.start()
    seen = []
    for found in log.follow(interval=0.01, stop=time.monotonic() + 10):
        seen.append(found["disk"])
        if len(seen) == 10:
            break
    thread.join()
    assert seen == list(range(1, 11))
    assert log.rotated(1).exists()


def test_follow_of_a_log_not_yet_created(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "sub" / "tank.jsonl")
    threading.Timer(0.05, lambda: log.append(event(7))).start()
    found = next(log.follow(interval=0.01, stop=time.monotonic() + 10))
    assert found["disk"] == 7


def test_events_are_flat_records_of_known_classes() -> None:
    with pytest.raises(ValueError, match="unknown event class"):
        make_event("disk-state", "tank")
    with pytest.raises(TypeError, match="must be a scalar"):
        make_event("mount", "tank", where=["a"])
    assert describe(make_event("mount", "tank", now=1.0, health="online")) == \
        "mount health=online"


def test_hooks_are_chosen_by_class_prefix(tmp_path: Path) -> None:
    for name in ("all-syslog", "disk_state-mail", "disk_state_x-no", "scrub_finish-x",
                 ".all-hidden", "README"):
        (tmp_path / name).write_text("#!/bin/sh\n")
    names = [p.name for p in hooks_for(tmp_path, "disk_state")]
    assert names == ["all-syslog", "disk_state-mail"]
    assert hooks_for(tmp_path / "absent", "disk_state") == []
    assert hook_matches("all-x", "mount")
    assert not hook_matches("mountx-y", "mount")


def test_only_a_hook_nobody_else_can_write_runs(tmp_path: Path) -> None:
    hook = tmp_path / "all-x"
    hook.write_text("#!/bin/sh\n")
    hook.chmod(0o644)
    assert trusted(hook) == "not executable"
    hook.chmod(0o775)
    assert trusted(hook) == "writable by group or others"
    hook.chmod(0o755)
    assert trusted(hook) is None
    (tmp_path / "d").mkdir()
    assert trusted(tmp_path / "d") == "not a regular file"


def test_hook_environment_carries_every_field() -> None:
    env = hook_env(make_event("disk_state", "tank", now=0.0, disk=2, state="failed",
                              ok=True, gone=None))
    assert env["BLOCKSPACE_EVENT_CLASS"] == "disk_state"
    assert env["BLOCKSPACE_EVENT_POOL"] == "tank"
    assert env["BLOCKSPACE_EVENT_DISK"] == "2"
    assert env["BLOCKSPACE_EVENT_OK"] == "true"
    assert env["BLOCKSPACE_EVENT_TIME"] == "0.0"
    assert env["BLOCKSPACE_EVENT_TIME_ISO"] == "1970-01-01T00:00:00+00:00"
    assert "BLOCKSPACE_EVENT_GONE" not in env
    assert "PATH" in env


def test_a_hook_runs_with_the_event_and_a_stuck_one_is_killed(tmp_path: Path) -> None:
    out = tmp_path / "out.env"
    hook = tmp_path / "all-record"
    hook.write_text(f"#!/bin/sh\nenv > {out}\necho said something\n")
    stuck = tmp_path / "all-stuck"
    stuck.write_text("#!/bin/sh\nexec sleep 60\n")
    for path in (hook, stuck):
        path.chmod(0o755)
    happened = make_event("scrub_finish", "tank", result="done")

    async def main() -> tuple[int | None, int | None, float]:
        status = await run_hook(hook, happened)
        began = time.monotonic()
        killed = await run_hook(stuck, happened, limit=0.3)
        return status, killed, time.monotonic() - began

    status, killed, took = trio.run(main)
    assert status == 0
    assert "BLOCKSPACE_EVENT_RESULT=done" in out.read_text().splitlines()
    assert killed is None
    assert took < 10


def test_the_bus_writes_queued_events_at_a_stop_and_runs_their_hooks(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    hook = hooks / "unmount-mark"
    hook.write_text(f"#!/bin/sh\ntouch {tmp_path}/ran\n")
    hook.chmod(0o755)
    log = EventLog(events_path(tmp_path, "tank"))

    async def main() -> None:
        bus = EventBus("tank", log, hooks)
        async with trio.open_nursery() as nursery:
            await nursery.start(bus.run)
            bus.emit("mount", mountpoint="/m")
            await trio.sleep(0.5)
            nursery.cancel_scope.cancel()  # the daemon's nursery ends before its finally
        bus.emit("unmount", mountpoint="/m")
        with trio.CancelScope(shield=True):
            await bus.drain()

    trio.run(main)
    assert [e["class"] for e in log.read()] == ["mount", "unmount"]
    assert (tmp_path / "ran").exists()


def test_thresholds_crossed_both_ways() -> None:
    limits = (80.0, 90.0, 95.0)
    assert crossed(limits, 70.0, 92.0) == [(80.0, "up"), (90.0, "up")]
    assert crossed(limits, 96.0, 85.0) == [(90.0, "down"), (95.0, "down")]
    assert crossed(limits, 80.0, 85.0) == []  # already past 80
    assert crossed(limits, float("nan"), 99.0) == []


def test_progress_events_start_and_finish_once_even_for_a_fast_run() -> None:
    seen: dict[str, float] = {}
    assert progress_events("scrub", seen, {"state": "idle", "started": 0.0}) == []
    fast = {"state": "done", "started": 10.0, "finished": 10.2, "volume": None,
            "bytes_checked": 5, "report": {"repaired_blocks": 1, "unrecoverable": []}}
    found = progress_events("scrub", seen, fast)
    assert [c for c, _ in found] == ["scrub_start", "scrub_finish"]
    assert found[1][1]["result"] == "done"
    assert found[1][1]["repaired"] == 1
    assert progress_events("scrub", seen, fast) == []  # nothing new
    running = {"state": "running", "started": 20.0, "finished": 0.0, "reason": "repair"}
    assert [c for c, _ in progress_events("rebuild", seen, running)] == ["rebuild_start"]
    assert progress_events("rebuild", seen, running) == []


def test_history_records_changing_commands_only() -> None:
    assert history.changed_pool("volume", "create", {"pool": "tank"}) == "tank"
    assert history.changed_pool("pool", "create", {"name": "tank"}) == "tank"
    assert history.changed_pool("pool", "status", {"name": "tank"}) is None
    assert history.changed_pool("scrub", None, {"pool": "tank", "action": None}) == "tank"
    assert history.changed_pool("scrub", None, {"pool": "tank", "action": "status"}) is None
    assert history.changed_pool("pool", "import", {"name": None}) is None
    assert history.changed_pool("mount", None, {"pool": "tank", "foreground": False}) == "tank"
    assert history.changed_pool("mount", None, {"pool": "tank", "foreground": True}) is None
    assert history.command_words(["--state-dir", "/s", "--json", "volume", "grow", "tank",
                                  "v", "--size", "2G", "-v", "--state-dir=/x"]) == \
        ["volume", "grow", "tank", "v", "--size", "2G"]


def test_history_entries_say_who_and_when(tmp_path: Path) -> None:
    history.record(tmp_path, "tank", ["blockspace", "volume", "create", "tank", "v"])
    (line,) = history.history_path(tmp_path, "tank").read_text().splitlines()
    entry = json.loads(line)
    assert entry["command"] == "blockspace volume create tank v"
    assert entry["uid"] == os.getuid()
    assert entry["user"]
    assert abs(entry["time"] - time.time()) < 60


def test_follow_goes_on_where_the_read_ended(tmp_path: Path) -> None:
    log = EventLog(tmp_path / "tank.jsonl")
    log.append(event(1))
    events, end = log.read_with_end()
    log.append(event(2))  # between the read and the follow: still followed, once
    found = next(log.follow(after=end, interval=0.01, stop=time.monotonic() + 10))
    assert [e["disk"] for e in events] == [1]
    assert found["disk"] == 2
    # A log that did not exist at the read is followed from its start.
    other = EventLog(tmp_path / "other.jsonl")
    assert other.read_with_end() == ([], None)
    other.append(event(3))
    assert next(other.follow(after=(0, 0), stop=time.monotonic() + 10))["disk"] == 3


def test_the_example_syslog_hook(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """contrib/hooks/all-syslog.sh, with a stand-in `logger` that records its arguments."""
    said = tmp_path / "said"
    logger = tmp_path / "bin" / "logger"
    logger.parent.mkdir()
    logger.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {said}\n')
    logger.chmod(0o755)
    monkeypatch.setenv("PATH", f"{logger.parent}:{os.environ['PATH']}")
    hook = Path(__file__).parents[2] / "contrib" / "hooks" / "all-syslog.sh"
    failed = make_event("disk_state", "tank", disk=1, state="failed", reason="dead")
    assert trio.run(run_hook, hook, failed) == 0
    assert said.read_text().splitlines() == [
        "-t", "blockspace", "-p", "daemon.err",
        "pool tank: disk_state DISK=1 REASON=dead STATE=failed "]
