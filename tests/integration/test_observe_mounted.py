"""Events, hooks, iostat, metrics and volume show on a real mounted daemon: I/O through the
FUSE file moves the counters that `iostat` and a Prometheus scrape report, a disk failed by
`fault inject` is an event in `events --json` (and in a running `events --follow`), and a
hook got the event in its environment."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .helpers import BlockspaceEnv, InProcessCLI, MiB, missing_prerequisites, wait_until

MISSING = missing_prerequisites()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """name{label=value,...} -> value of every sample at the endpoint."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


class LineReader:
    """The lines a process prints, read by a thread (no line stuck in a buffer that a
    select() on the pipe would not see)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: queue.Queue[str] = queue.Queue()
        self.thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self.thread.start()

    def _read(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.put(line)

    def until(self, marker: str, timeout: float) -> list[str]:
        """Lines up to the first that contains `marker` (or all there were by the timeout)."""
        got: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                continue
            got.append(line)
            if marker in line:
                break
        return got


@pytest.mark.integration
@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
def test_events_hooks_iostat_metrics_and_placement_on_a_real_mount(
    blockspace_env: BlockspaceEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    env = blockspace_env
    bs = InProcessCLI(env, capsys)
    images = env.make_images([256 * MiB, 256 * MiB])
    bs.json("pool", "create", "tank", *map(str, images), "--slab-size", "32M")
    bs.json("volume", "create", "tank", "vol0", "--size", "64M", "--resiliency", "mirror")
    hooks = env.root / "hooks"
    hooks.mkdir()
    got = env.root / "hook-output"
    got.mkdir()
    hook = hooks / "all-record"
    hook.write_text(f'#!/bin/sh\nenv | grep ^BLOCKSPACE_ > "{got}/$BLOCKSPACE_EVENT_CLASS.env"\n')
    hook.chmod(0o755)
    port = free_port()

    mountpoint, pid = bs.mount("--allow-fault-injection", "--hooks-dir", str(hooks),
                               "--metrics", f"127.0.0.1:{port}")
    follow = subprocess.Popen(
        [sys.executable, "-m", "blockspace", "--state-dir", str(env.state_dir), "events",
         "tank", "--follow", "--json", "--follow-for", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, PYTHONPATH=os.environ.get("PYTHONPATH", "")),
    )
    try:
        # The follower prints the log so far (the mount) and then waits for more.
        printed = LineReader(follow)
        first = printed.until('"mount"', 60)
        assert any('"mount"' in line for line in first), (
            first, follow.poll(), (env.state_dir / "events" / "tank.jsonl").read_text())

        idle = scrape(port)
        assert idle["blockspace_volume_writes_total{pool=tank,volume=vol0}"] == 0
        data = random.Random(1).randbytes(4 * MiB)
        fd = os.open(mountpoint / "vol0", os.O_RDWR)
        try:
            assert os.pwrite(fd, data, 0) == len(data)
            os.fsync(fd)
            assert os.pread(fd, len(data), 0) == data

            stats = bs.json("iostat", "tank")
            (volume,) = stats["volumes"]
            assert volume["name"] == "vol0"
            assert volume["write_ops"] > 0
            assert volume["read_ops"] > 0
            assert volume["write_bytes"] > 0
            assert volume["write_latency"] > 0
            assert all(d["write_ops"] > 0 for d in stats["disks"])
            code, out, _ = bs("iostat", "-v", "tank", "0.2", "2")
            assert code == 0
            assert out.count("disk 1") == 2

            busy = scrape(port)
            disk0 = "disk=0,path=" + str(images[0]) + ",pool=tank"
            vol = "{pool=tank,volume=vol0}"
            assert busy[f"blockspace_volume_writes_total{vol}"] > 0
            assert busy[f"blockspace_volume_written_bytes_total{vol}"] >= len(data)
            assert busy[f"blockspace_volume_read_bytes_total{vol}"] >= len(data)
            assert busy[f"blockspace_volume_write_latency_seconds_count{vol}"] > 0
            assert busy[f"blockspace_disk_written_bytes_total{{{disk0}}}"] >= len(data)
            assert busy["blockspace_pool_allocated_bytes{pool=tank}"] > 0
            assert busy[f"blockspace_disk_state{{{disk0},state=online}}"] == 1
            assert busy[f"blockspace_disk_request_latency_seconds_count{{{disk0}}}"] > 0
            assert busy[f"blockspace_disk_request_latency_seconds_sum{{{disk0}}}"] > 0

            report = bs.json("fault", "inject", "tank", str(images[1]), "--dead")
            assert report["id"] == 1
            assert os.pwrite(fd, data, 8 * MiB) == len(data)
            os.fsync(fd)
        finally:
            os.close(fd)

        def disk_failed() -> list[dict[str, Any]]:
            return [e for e in bs.json("events", "tank")
                    if e["class"] == "disk_state" and e["disk"] == 1]

        assert wait_until(lambda: bool(disk_failed()), 30)
        (failed,) = disk_failed()
        assert failed["state"] == "failed"
        assert failed["old_state"] == "online"
        assert "dead disk" in failed["reason"]
        assert failed["pool"] == "tank"

        followed = printed.until('"disk_state"', 30)
        assert json.loads(followed[-1])["disk"] == 1

        hook_env = got / "disk_state.env"
        assert wait_until(hook_env.exists, 30)
        variables = dict(line.split("=", 1) for line in hook_env.read_text().splitlines())
        assert variables["BLOCKSPACE_EVENT_CLASS"] == "disk_state"
        assert variables["BLOCKSPACE_EVENT_POOL"] == "tank"
        assert variables["BLOCKSPACE_EVENT_DISK"] == "1"
        assert variables["BLOCKSPACE_EVENT_STATE"] == "failed"
        assert float(variables["BLOCKSPACE_EVENT_TIME"]) == failed["time"]

        after = scrape(port)
        assert after[f"blockspace_disk_state{{disk=1,path={images[1]},pool=tank,state=failed}}"] \
            == 1
        assert after[f"blockspace_volume_writes_total{vol}"] > \
            busy[f"blockspace_volume_writes_total{vol}"]

        shown = bs.json("volume", "show", "tank", "vol0", "--map")
        assert shown["extent_states"]["missing"] == shown["slabs"] > 0
        for slab in shown["map"]:
            states = {e["disk"]: e["state"] for e in slab["extents"]}
            assert states == {0: "online", 1: "missing"}
    finally:
        follow.kill()
        follow.wait(timeout=30)
        with contextlib.suppress(ValueError):
            follow.stdout.close() if follow.stdout else None
        bs.unmount(mountpoint, pid)

    events = bs.json("events", "tank")
    assert events[-1]["class"] == "unmount"
    with pytest.raises(urllib.error.URLError):
        scrape(port)  # the endpoint went with the daemon
    assert (got / "unmount.env").exists()
    history = [e["command"] for e in bs.json("pool", "history", "tank")]
    mounts = [c for c in history if c.startswith("blockspace mount ")]
    assert len(mounts) == 1  # the command, not also the daemon it started (--foreground)
    assert mounts[0].startswith("blockspace mount tank ")
    assert "blockspace volume create tank vol0 --size 64M --resiliency mirror" in history
    assert Path(env.state_dir / "events" / "tank.jsonl").stat().st_mode & 0o077 == 0


@pytest.mark.integration
@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
def test_a_metrics_port_in_use_fails_the_mount_cleanly(
    blockspace_env: BlockspaceEnv, capsys: pytest.CaptureFixture[str]
) -> None:
    env = blockspace_env
    bs = InProcessCLI(env, capsys)
    images = env.make_images([128 * MiB, 128 * MiB])
    bs.json("pool", "create", "tank", *map(str, images), "--slab-size", "32M")
    mountpoint = env.root / "pool-tank"
    mountpoint.mkdir()
    env.fuse_mounts.append(mountpoint)  # cleaned up should the mount succeed after all
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = bs("mount", "tank", str(mountpoint), "--metrics", f"127.0.0.1:{port}")
    assert code == 1
    assert out == ""
    assert err.strip() == (f"blockspace: error: mount failed: --metrics 127.0.0.1:{port}: "
                           "Address already in use")
    assert not os.path.ismount(mountpoint)
    assert bs.json("pool", "status", "tank")["mountpoint"] is None
    env.fuse_mounts.remove(mountpoint)
