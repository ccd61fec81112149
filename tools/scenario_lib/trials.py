"""The scenarios: a real workload (ext4 on a loop device on the volume file, files written and
fsynced by writer processes) while faults are injected into the pool's disks, and at the end a
check of every acknowledged byte.

A trial's verdict:
  pass              every promise kept: no error reached the application, every acknowledged
                    byte reads back, the pool ends healthy.
  expected failure  the faults exceed what the layout can survive (a simple volume losing a
                    disk; one disk more than the tolerance) and the pool failed *cleanly*: the
                    application got EIO, `pool status` says the volume is failed, no byte read
                    back wrong, and every block whose copies or stripe survived still reads.
  FAILED            a promise was broken (wrong bytes, lost acknowledged data within the
                    tolerance, an error the application should not have seen, a pool that
                    does not come back healthy, a hang) or an expected failure was not clean.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import placement
from .system import TOOLS, CommandFailed, Env, mounts, process_alive, run, tool, wait_until
from .workload import BLOCK, describe, iter_log

KiB = 1 << 10
MiB = 1 << 20
USABLE = ("online", "retiring", "resyncing", "failing")


@dataclass(frozen=True)
class Layout:
    name: str
    args: tuple[str, ...]
    width: int  # disks per slab; the trials' pools have exactly this many (or one more)
    tolerance: int


LAYOUTS: dict[str, Layout] = {
    layout.name: layout
    for layout in (
        Layout("simple", ("--resiliency", "simple", "--columns", "2"), 2, 0),
        Layout("mirror-2", ("--resiliency", "mirror", "--copies", "2"), 2, 1),
        Layout("mirror-3", ("--resiliency", "mirror", "--copies", "3"), 3, 2),
        Layout("parity-1", ("--resiliency", "parity", "--parity", "1", "--columns", "2"), 3, 1),
        Layout("parity-2", ("--resiliency", "parity", "--parity", "2", "--columns", "2"), 4, 2),
    )
}


@dataclass(frozen=True)
class Sizes:
    name: str
    disk: int
    volume: str
    slab: str
    base_bytes: int  # written and fsynced before any fault
    phase_bytes: int  # acknowledged per writing phase
    min_file: int
    max_file: int
    flakey_seconds: float
    slow_seconds: float
    rot_blocks: int
    rate: int  # bytes per second per writer at most: the file system must not fill up
    writers: int = 2


FULL = Sizes("full", 512 * MiB, "400M", "16M", 48 * MiB, 32 * MiB, 3 * KiB, 2 * MiB + 5,
             10.0, 10.0, 256, 6 * MiB)
QUICK = Sizes("quick", 256 * MiB, "200M", "16M", 8 * MiB, 6 * MiB, 1 * KiB, 384 * KiB + 7,
              6.0, 4.0, 48, 4 * MiB)


@dataclass
class Result:
    scenario: str
    layout: str
    faults: str
    expected: str  # pass | fail | either
    verdict: str = "FAILED"
    seconds: float = 0.0
    files_acked: int = 0
    bytes_acked: int = 0
    bytes_checked: int = 0
    bytes_ok: int = 0
    bytes_unreadable: int = 0
    bytes_wrong: int = 0
    app_errors: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[tuple[float, str]] = field(default_factory=list)
    commands: list[str] = field(default_factory=list)
    workdir: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Abort(Exception):
    """The trial cannot go on; the message is recorded as a problem."""


class Trial:
    pool = "sc"
    volume = "vol"

    def __init__(self, scenario: str, layout: Layout, sizes: Sizes, seed: int,
                 workroot: Path | None, *, keep: bool = False, provisioning: str = "thin",
                 echo: Callable[[str], None] | None = None) -> None:
        self.scenario = scenario
        self.provisioning = provisioning
        self.layout = layout
        self.sizes = sizes
        self.seed = zlib.crc32(f"{seed}/{scenario}/{layout.name}".encode())
        self.keep = keep
        self.echo = echo
        self.started = time.monotonic()
        self.env = Env.create(workroot, f"{scenario}-{layout.name}-")
        self.logs = self.env.root / "logs"
        self.logs.mkdir()
        self.images: dict[int, Path] = {}
        self.pool_mnt: Path | None = None
        self.pid: int | None = None
        self.loop: str | None = None
        self.fs: Path | None = None
        self.writers: dict[str, list[subprocess.Popen[bytes]]] = {}
        self.base_extents: dict[str, list[tuple[int, int, int]]] = {}
        self.result = Result(scenario, layout.name, "", "pass")
        self.volume_bytes = int(sizes.volume.rstrip("M")) * MiB
        self.failure_seen = False
        self.injected_dead: set[int] = set()  # disks made --dead and not cleared since
        self.may_be_failing: set[int] = set()  # rotted disks, which may turn "failing"
        self._checks = 0
        self._replacements = 0

    # ---- bookkeeping ----------------------------------------------------------------------

    def step(self, text: str) -> None:
        elapsed = round(time.monotonic() - self.started, 2)
        self.result.timeline.append((elapsed, text))
        if self.echo is not None:
            self.echo(f"  [{elapsed:7.2f}s] {self.scenario}/{self.layout.name}: {text}")

    def problem(self, text: str) -> None:
        self.step("PROBLEM: " + text)
        self.result.problems.append(text)

    def note(self, text: str) -> None:
        self.step("note: " + text)
        self.result.notes.append(text)

    # ---- pool, volume, file system ---------------------------------------------------------

    def setup(self, disks: int) -> None:
        paths = [self.env.make_image(f"disk{i}.img", self.sizes.disk) for i in range(disks)]
        status = self.env.cli_json("pool", "create", self.pool, *map(str, paths),
                                   "--slab-size", self.sizes.slab)
        for disk in status["disks"]:
            self.images[int(disk["id"])] = Path(disk["path"])
        self.env.cli("volume", "create", self.pool, self.volume, "--size", self.sizes.volume,
                     *self.layout.args, "--provisioning", self.provisioning)
        self.mount_pool()
        assert self.pool_mnt is not None
        self.loop = self.env.attach_loop(self.pool_mnt / self.volume)
        self.env.mkfs(self.loop)
        self.fs = self.env.mount_fs(self.loop)
        self.step(f"pool of {disks} disks, {self.layout.name} volume ({self.provisioning}), "
                  "ext4 mounted")

    def mount_pool(self, *, faults: bool = True) -> None:
        flags = ["--allow-fault-injection"] if faults else []
        try:
            self.pool_mnt, self.pid = self.env.mount_pool(self.pool, *flags)
        except CommandFailed as error:
            raise Abort(f"pool does not mount: {error}\n{self.env.log_tail(self.pool)}") from None

    def down(self) -> None:
        """ext4, loop device, pool: all taken down cleanly."""
        if self.fs is not None:
            self.env.umount_fs(self.fs)
            self.fs = None
        if self.loop is not None:
            self.env.detach_loop(self.loop)
            self.loop = None
        if self.pool_mnt is not None and self.pid is not None:
            self.env.unmount_pool(self.pool_mnt, self.pid, force=True)
            self.pool_mnt = self.pid = None
        self.step("unmounted ext4, loop device and pool")

    def up(self, *, faults: bool = True, fsck: bool = True, read_only: bool = False) -> bool:
        """Mount the pool, attach the loop device, fsck (must be clean unless read_only) and
        mount ext4. Returns False (with a note) when ext4 cannot be mounted read-only."""
        self.mount_pool(faults=faults)
        assert self.pool_mnt is not None
        self.loop = self.env.attach_loop(self.pool_mnt / self.volume)
        if fsck:
            result = run([tool("fsck.ext4"), "-fn", self.loop], check=False, timeout=600)
            if result.returncode != 0:
                message = f"fsck.ext4 -fn exit {result.returncode}: " + " | ".join(
                    result.stdout.strip().splitlines()[-3:])
                if read_only:
                    self.note(message)
                else:
                    self.problem(message)
            else:
                self.step("fsck.ext4 -fn clean")
        options = ("ro",) if read_only else ()
        try:
            self.fs = self.env.mount_fs(self.loop, *options)
        except CommandFailed as error:
            if not read_only:
                raise Abort(f"ext4 does not mount: {error}") from None
            try:
                self.fs = self.env.mount_fs(self.loop, "ro", "noload")
                self.note("ext4 mounts only with ro,noload (journal unreadable)")
            except CommandFailed as error2:
                self.note(f"ext4 does not mount even read-only: {error2}")
                return False
        return True

    def cycle(self, *, faults: bool = False) -> None:
        """Everything down and up again (a production mount unless `faults`), fsck clean."""
        self.down()
        self.up(faults=faults)
        self.step("remounted pool, fsck, ext4")

    # ---- CLI shortcuts ------------------------------------------------------------------------

    def daemon_alive(self) -> None:
        """Abort (a problem) when the pool's daemon died: its log says why."""
        if self.pid is not None and not process_alive(self.pid):
            pid, self.pid = self.pid, None
            raise Abort(f"the pool daemon (pid {pid}) exited on its own; its log ends:\n"
                        + self.env.log_tail(self.pool, 12))

    def status(self) -> dict[str, Any]:
        """`pool status --json` (it exits 3 when the pool is failed: still a status)."""
        self.daemon_alive()
        result = self.env.cli("--json", "pool", "status", self.pool, check=False)
        try:
            status: dict[str, Any] = json.loads(result.stdout)
        except json.JSONDecodeError:
            raise Abort(f"pool status: exit {result.returncode}: "
                        f"{result.stderr.strip()[-500:]}") from None
        return status

    @staticmethod
    def states(status: dict[str, Any]) -> dict[int, str]:
        return {int(d["id"]): d["state"] for d in status["disks"]}

    def volume_state(self, status: dict[str, Any]) -> str:
        for volume in status["volumes"]:
            if volume["name"] == self.volume:
                return str(volume["state"])
        raise Abort(f"volume {self.volume} missing from pool status")

    def not_usable(self, status: dict[str, Any]) -> set[int]:
        return {i for i, state in self.states(status).items() if state not in USABLE}

    def inject(self, disk: int, *flags: str) -> None:
        self.env.cli("fault", "inject", self.pool, str(disk), *flags, "--seed", str(self.seed))
        if "--dead" in flags:
            self.injected_dead.add(disk)
        self.step(f"fault inject disk {disk} {' '.join(flags)}")

    def kill_at_once(self, disks: list[int]) -> None:
        """`fault inject D --dead` on several disks at the same instant: one request per disk
        on the daemon's control socket, released together from threads (separate CLI runs
        are a second apart, enough for an automatic repair to start in between)."""
        from blockspace.admin.registry import Registry
        from blockspace.disks.faults import FaultSpec
        from blockspace.service import control

        info = Registry(self.env.state_dir).mount_info(self.pool)
        if info is None:
            raise Abort("pool not mounted")
        barrier = threading.Barrier(len(disks))
        errors: list[str] = []

        def kill(disk: int) -> None:
            barrier.wait()
            try:
                control.request(Path(info.socket), "fault_inject", disk=str(disk),
                                spec=FaultSpec(dead=True).to_dict())
            except Exception as error:
                errors.append(f"disk {disk}: {error}")

        threads = [threading.Thread(target=kill, args=(d,)) for d in disks]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.env.commands.append(" & ".join(
            f"blockspace fault inject {self.pool} {d} --dead" for d in disks))
        if errors:
            raise Abort(f"fault inject failed: {errors}")
        self.injected_dead.update(disks)
        self.step(f"fault inject disks {disks} --dead (at once, over the control socket)")

    def clear_faults(self) -> None:
        self.daemon_alive()
        self.env.cli("fault", "clear", self.pool)
        self.injected_dead.clear()
        self.step("fault clear")

    def replace(self, disk: int) -> dict[str, Any] | None:
        """`disk replace POOL disk NEW --wait` onto a fresh image; the result, or None (with a
        problem recorded) when it was refused or failed."""
        self._replacements += 1
        new = self.env.make_image(f"new{self._replacements}.img", self.sizes.disk)
        started = time.monotonic()
        result = self.env.cli("--json", "disk", "replace", self.pool, str(disk), str(new),
                              "--wait", check=False, timeout=900)
        seconds = time.monotonic() - started
        try:
            info: dict[str, Any] = json.loads(result.stdout)
        except json.JSONDecodeError:
            self.problem(f"disk replace {disk}: refused, exit {result.returncode}: "
                         f"{result.stderr.strip()[-300:]}")
            return None
        status = self.status()
        for d in status["disks"]:
            if d["path"] == str(new):
                self.images[int(d["id"])] = new
        self.step(f"disk replace {disk}: {info.get('state')}, {info.get('done')}/"
                  f"{info.get('total')} extents, {info.get('bytes_moved', 0) / MiB:.0f} MiB in "
                  f"{seconds:.1f}s")
        if info.get("state") != "done" or info.get("failed") or result.returncode != 0:
            self.problem(f"disk replace {disk} ended {info.get('state')}: "
                         f"{info.get('failed')} extents failed: {info.get('errors')}")
        else:
            moved = info.get("bytes_moved", 0) / MiB
            self.note(f"replace of disk {disk} rebuilt {moved:.0f} MiB in {seconds:.1f}s"
                      + (f" ({moved / seconds:.0f} MiB/s)" if seconds > 0 and moved else ""))
        return info

    def scrub(self) -> dict[str, Any] | None:
        result = self.env.cli("--json", "scrub", self.pool, "--wait", check=False, timeout=900)
        if result.returncode not in (0, 3):
            self.problem(f"scrub: exit {result.returncode}: {result.stderr.strip()}")
            return None
        info: dict[str, Any] = json.loads(result.stdout)
        report = info.get("report", {})
        self.step(f"scrub {info.get('state')}: checksum errors {report.get('checksum_errors')}, "
                  f"mismatches {report.get('mismatches')}, repaired "
                  f"{report.get('repaired_blocks')}, unrecoverable "
                  f"{len(report.get('unrecoverable', []))}")
        return info

    def scrub_after_rebuild(self) -> None:
        """A scrub right after a rebuild must find the copies and parity consistent: anything
        it has to repair is redundancy the rebuild claimed but did not restore."""
        scrub = self.scrub()
        if not scrub:
            return
        report = scrub.get("report", {})
        if report.get("unrecoverable"):
            self.problem(f"scrub after the rebuild finds unrecoverable data: "
                         f"{report['unrecoverable'][:3]}")
        if report.get("mismatches") or report.get("checksum_errors"):
            self.problem(f"scrub after the rebuild found {report.get('mismatches')} mismatched "
                         f"and {report.get('checksum_errors')} bad blocks (repaired "
                         f"{report.get('repaired_blocks')}): the rebuild left redundancy "
                         "inconsistent")

    def wait_online(self, when: str, timeout: float = 300.0) -> None:
        """Until every disk is online (a catch-up or resync finished); a problem if not."""
        states: dict[int, str] = {}

        def online() -> bool:
            nonlocal states
            states = self.states(self.status())
            return all(s == "online" for s in states.values())

        if wait_until(online, timeout, interval=0.5):
            self.step(f"{when}: every disk online")
        else:
            self.problem(f"{when}: disks not online after {timeout:.0f}s: {states}")

    def expect_healthy(self, when: str) -> None:
        status = self.status()
        states = self.states(status)
        # A rotted disk may rightly be "failing" (a warning: replace it), with the pool
        # "degraded" for it; everything else must be online.
        warned = {i for i in self.may_be_failing if states.get(i) == "failing"}
        bad = {i: s for i, s in states.items() if s != "online" and i not in warned}
        health_ok = status["health"] == "online" or (warned and status["health"] == "degraded")
        if warned:
            self.note(f"{when}: disks {sorted(warned)} failing (checksum errors)")
        if not health_ok or self.volume_state(status) != "online" or bad:
            self.problem(f"{when}: pool {status['health']}, volume {self.volume_state(status)}, "
                         f"disks not online: {bad}")
        else:
            self.step(f"{when}: pool and volume online")

    # ---- writers ----------------------------------------------------------------------------

    def start_writers(self, phase: str, *, total: int = 0) -> None:
        assert self.fs is not None
        stop = self.env.root / f"stop-{phase}"
        processes = []
        for k in range(self.sizes.writers):
            prefix = f"{phase}{k}"
            argv = [sys.executable, "-m", "scenario_lib.workload", "write",
                    "--dir", str(self.fs), "--log", str(self.logs / f"{prefix}.jsonl"),
                    "--seed", str(self.seed), "--prefix", prefix,
                    "--min-size", str(self.sizes.min_file), "--max-size", str(self.sizes.max_file),
                    "--stop-file", str(stop)]
            # Never more than 70% of the volume in all: a full file system is not the test.
            budget = int(self.volume_bytes * 0.7) - sum(self.acked().values())
            share = max(MiB, budget // self.sizes.writers)
            if total:
                share = min(share, -(-total // self.sizes.writers))
            argv += ["--max-bytes", str(share), "--rate", str(self.sizes.rate)]
            with open(self.logs / f"{prefix}.stderr", "wb") as stderr:
                processes.append(self.env.spawn(
                    argv, env=dict(os.environ, PYTHONPATH=str(TOOLS)),
                    stdout=subprocess.DEVNULL, stderr=stderr))
        self.writers[phase] = processes
        self.step(f"{len(processes)} writers started ({phase})")

    def events(self, phase: str | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for log in sorted(self.logs.glob("*.jsonl")):
            if phase is None or log.stem.rstrip("0123456789") == phase:
                out.extend(iter_log(str(log)))
        return out

    def acked(self, phase: str | None = None) -> dict[str, int]:
        return {e["name"]: int(e["size"]) for e in self.events(phase) if e["ev"] == "ack"}

    def errors(self, phase: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.events(phase) if e["ev"] == "err"]

    def phase_bytes(self, phase: str) -> int:
        return sum(self.acked(phase).values())

    def wait_bytes(self, phase: str, target: int, timeout: float = 240.0) -> bool:
        """Until the phase's writers have `target` acknowledged bytes; False if they all
        stopped first (gave up) or the time ran out (a problem: the foreground stalled)."""
        deadline = time.monotonic() + timeout
        while True:
            done = self.phase_bytes(phase)
            if done >= target:
                return True
            if all(p.poll() is not None for p in self.writers[phase]):
                return False
            if time.monotonic() > deadline:
                self.problem(f"writes stalled: {done / MiB:.1f} of {target / MiB:.1f} MiB "
                             f"acknowledged after {timeout:.0f}s ({phase})")
                return False
            time.sleep(0.1)

    def stop_writers(self, phase: str, timeout: float = 180.0) -> None:
        (self.env.root / f"stop-{phase}").touch()
        for process in self.writers.get(phase, []):
            try:
                process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.problem(f"writer {process.pid} did not finish within {timeout:.0f}s of "
                             "being told to stop (stuck in I/O)")
                process.kill()
        self.step(f"writers stopped ({phase}): {self.phase_bytes(phase) / MiB:.1f} MiB "
                  f"acknowledged, {len(self.errors(phase))} errors")

    def write_base(self) -> None:
        """The data that is on the volume, fsynced, before any fault."""
        self.start_writers("base", total=self.sizes.base_bytes)
        for process in self.writers["base"]:
            process.wait(timeout=600)
        errors = self.errors("base")
        if errors:
            raise Abort(f"writes failed before any fault: {errors[0]}")
        assert self.fs is not None
        for name in self.acked("base"):
            self.base_extents[name] = placement.fiemap(str(self.fs / name))
        self.step(f"base data: {len(self.base_extents)} files, "
                  f"{self.phase_bytes('base') / MiB:.1f} MiB fsynced")

    def app_errors(self, phase: str, *, allowed: bool) -> list[dict[str, Any]]:
        errors = self.errors(phase)
        if errors:
            first = errors[0]
            text = (f"{len(errors)} writes failed in the application ({phase}); first: "
                    f"{first['op']} {first['name']}: {first['error']}")
            if allowed:
                self.note(text)
            else:
                self.problem(text)
        return errors

    # ---- checks -----------------------------------------------------------------------------

    def run_check(self, label: str, files: list[dict[str, Any]], *, device: str | None = None,
                  timeout: float = 900.0) -> list[dict[str, Any]]:
        self._checks += 1
        plan_path = self.logs / f"check{self._checks}.plan.json"
        out_path = self.logs / f"check{self._checks}.result.json"
        plan = {"root": str(self.fs) if self.fs is not None else None, "device": device,
                "files": files}
        plan_path.write_text(json.dumps(plan))
        try:
            run([sys.executable, "-m", "scenario_lib.workload", "check", "--plan", str(plan_path),
                 "--out", str(out_path), "--seed", str(self.seed)],
                env=dict(os.environ, PYTHONPATH=str(TOOLS)), timeout=timeout)
        except CommandFailed as error:
            raise Abort(f"check '{label}' did not complete: {error}") from None
        results: list[dict[str, Any]] = json.loads(out_path.read_text())["files"]
        return results

    def summarize(self, label: str, results: list[dict[str, Any]]) -> dict[str, Any]:
        summary = {
            "label": label,
            "files": len(results),
            "bytes": sum(r["size"] for r in results),
            "ok_bytes": sum(r["ok_bytes"] for r in results),
            "unreadable_bytes": sum(r["size"] - r["ok_bytes"] for r in results
                                    if not r["wrong"]),
            "wrong_blocks": sum(len(r["wrong"]) for r in results),
            "eio_blocks": sum(len(r["eio"]) for r in results),
            "files_bad": {s: sum(r["status"] == s for r in results)
                          for s in ("eio", "wrong", "missing")},
        }
        wrong = [r for r in results if r["wrong"]]
        if wrong:
            first = wrong[0]
            names = sorted({e["name"] for e in self.events() if e.get("name")})
            found = [f"block {s['block']}: {describe(bytes.fromhex(s['head']), self.seed, names)}"
                     for s in first.get("wrong_samples", [])[:2]]
            summary["first_wrong"] = {"name": first["name"], "blocks": first["wrong"][:8],
                                      "via": first["via"], "holds": found}
            self.problem(f"{label}: WRONG BYTES in {len(wrong)} files "
                         f"({summary['wrong_blocks']} blocks of 4 KiB); first: {first['name']} "
                         f"blocks {first['wrong'][:8]} (read via {first['via']}; "
                         f"{'; '.join(found)})")
        self.result.checks.append(summary)
        self.step(f"check '{label}': {summary['files']} files, {summary['ok_bytes'] / MiB:.1f} "
                  f"of {summary['bytes'] / MiB:.1f} MiB ok, "
                  f"{summary['unreadable_bytes'] / MiB:.2f} MiB unreadable, "
                  f"{summary['wrong_blocks']} wrong blocks")
        return summary

    def check_all(self, label: str, *, must_be_ok: bool, final: bool = True) -> dict[str, Any]:
        """Every acknowledged file, through the file system (the application's view)."""
        acked = self.acked()
        files = [{"name": n, "size": s} for n, s in sorted(acked.items())]
        results = self.run_check(label, files)
        summary = self.summarize(label, results)
        if must_be_ok:
            bad = [r for r in results if r["status"] != "ok" and not r["wrong"]]
            if bad:
                first = bad[0]
                self.problem(
                    f"{label}: {len(bad)} acknowledged files not readable; first: {first['name']}"
                    f" ({first['status']}: eio blocks {first['eio'][:6]}, error {first['error']})")
        if final:
            self.record_final(summary, len(acked))
        return summary

    def record_final(self, summary: dict[str, Any], files_acked: int) -> None:
        self.result.files_acked = files_acked
        self.result.bytes_acked = sum(self.acked().values())
        self.result.bytes_checked = summary["bytes"]
        self.result.bytes_ok = summary["ok_bytes"]
        self.result.bytes_unreadable = summary["unreadable_bytes"]
        self.result.bytes_wrong = summary["wrong_blocks"] * BLOCK

    def model_check(self, label: str, dead: set[int],
                    rotted: frozenset[tuple[int, int]] = frozenset(),
                    *, via_device: bool = True) -> dict[str, Any]:
        """The base files, block by block, against what the pool can still have: a block whose
        copies (or enough of its stripe) are on surviving, uncorrupted disks must read back
        right; one that lost them must fail with EIO. Read straight from the loop device at the
        blocks FIEMAP gave (so ext4's own losses do not hide anything) or through ext4."""
        pool_map = placement.read_pool_map(str(p) for p in self.images.values())
        volume_map = placement.VolumeMap(pool_map, self.volume)
        files = [{"name": n, "size": s,
                  "extents": self.base_extents[n] if via_device else None}
                 for n, s in sorted(self.acked("base").items())]
        results = self.run_check(label, files, device=self.loop if via_device else None)
        summary = self.summarize(label, results)
        expected_lost = lost = collateral = survived = 0
        first_collateral = None
        for entry, result in zip(files, results, strict=True):
            bad = set(result["eio"]) | set(result["missing"])
            name, size = str(entry["name"]), int(entry["size"])  # type: ignore[arg-type]
            for index, volume_offset in placement.file_blocks(self.base_extents[name], size):
                places = [volume_map.locate(v) for v in placement.volume_blocks(volume_offset)]
                can = all(p is None or volume_map.readable(p, dead, rotted) for p in places)
                place = next((p for p in places if p is not None), None)
                if not can:
                    expected_lost += 1
                if index in bad:
                    lost += 1
                    if can:
                        collateral += 1
                        if first_collateral is None:
                            first_collateral = (name, index, volume_offset, place)
                elif not can and index not in result["wrong"]:
                    survived += 1
        summary.update(expected_lost=expected_lost, lost=lost, collateral=collateral,
                       survived=survived, dead=sorted(dead), rotted=len(rotted))
        self.step(f"model '{label}': {expected_lost} blocks beyond repair by the layout, "
                  f"{lost} unreadable, {collateral} unreadable although recoverable, "
                  f"{survived} readable although predicted lost")
        if collateral:
            name, index, offset, place = first_collateral  # type: ignore[misc]
            self.problem(f"{label}: {collateral} blocks unreadable although their data survives "
                         f"on healthy disks (dead {sorted(dead)}); first {name} block {index} "
                         f"(volume offset {offset}, copies {place.copies if place else None})")
        if survived:
            self.note(f"{label}: {survived} blocks read back right although the model says "
                      "their copies were lost (repaired before the loss?)")
        return summary

    def scan(self, label: str) -> dict[str, Any] | None:
        assert self.loop is not None
        out = self.logs / "scan.json"
        try:
            run([sys.executable, "-m", "scenario_lib.workload", "scan", "--device", self.loop,
                 "--out", str(out)], env=dict(os.environ, PYTHONPATH=str(TOOLS)), timeout=900)
        except CommandFailed as error:
            self.problem(f"{label}: raw read of the volume did not complete: {error}")
            return None
        info: dict[str, Any] = json.loads(out.read_text())
        self.step(f"{label}: raw read of the volume: {info['eio_bytes'] / MiB:.1f} of "
                  f"{info['size'] / MiB:.0f} MiB fail with EIO in "
                  f"{len(info['eio_ranges'])} ranges (64 KiB resolution)")
        return info

    # ---- the clean failure ------------------------------------------------------------------

    def clean_failure(self, phase: str, *, remount: bool = True,
                      rotted: frozenset[tuple[int, int]] = frozenset(),
                      try_replace: Iterable[int] = ()) -> None:
        """After a loss beyond the layout's tolerance (writers already stopped): the error
        must be visible (EIO to the application, the volume `failed`), nothing may read back
        wrong, and every block that still has its data on surviving disks must read. Then
        `fault clear` and a remount: what comes back is recorded."""
        errors = self.app_errors(phase, allowed=True)
        status = self.status()
        volume_state = self.volume_state(status)
        dead = self.not_usable(status) | self.injected_dead
        unnoticed = sorted(self.injected_dead - self.not_usable(status))
        if unnoticed:
            self.note(f"disks {unnoticed} are dead (every request fails) but pool status still "
                      "shows them online")
        self.step(f"after the loss: pool {status['health']}, volume {volume_state}, "
                  f"disks {self.states(status)}")
        scan = self.scan("after the loss")
        model = self.model_check("base files, block level, after the loss", dead, rotted)
        files = self.check_all("all acknowledged files through ext4, after the loss",
                               must_be_ok=False)
        unreadable = (model["lost"] > 0 or files["unreadable_bytes"] > 0
                      or bool(scan and scan["eio_bytes"]))
        visible = bool(errors) or unreadable
        # A slab that lost more disks than the tolerance must show in the volume's state; rot
        # cannot (it is found block by block, and counted in the disks' checksum errors).
        volume_map = placement.VolumeMap(
            placement.read_pool_map(str(p) for p in self.images.values()), self.volume)
        lost_slabs = volume_map.lost_slabs(dead)
        if lost_slabs and volume_state != "failed":
            self.problem(f"slabs {lost_slabs[:8]} lost more disks than the tolerance "
                         f"({self.layout.tolerance}) but pool status says the volume is "
                         f"{volume_state}")
        if not lost_slabs and len(dead) > self.layout.tolerance:
            self.note(f"{len(dead)} disks are out but every slab kept enough of its extents "
                      "(an automatic repair ran between the losses)")
        if visible and (volume_state == "failed" or not lost_slabs):
            self.failure_seen = True
        elif not visible:
            self.note("the loss never surfaced: no write failed and every block still reads")
        self.result.notes.append(
            f"after the loss: volume {volume_state}, {len(errors)} failed writes, "
            f"{model['lost']} of {model['expected_lost']} lost base blocks return EIO, "
            f"{model['collateral']} collateral, "
            + (f"{scan['eio_bytes'] / MiB:.1f} MiB of the volume unreadable" if scan else ""))
        for disk in try_replace:
            self.attempt_replace_beyond(disk)
        if not remount:
            return
        # Bring the disks back: `disk online` resyncs what they missed, and the data must
        # come back with them ("it comes back when the disk does"); then restart.
        self.clear_faults()
        out = sorted(self.not_usable(self.status()))
        readmitted = False
        if out:
            result = self.env.cli("--json", "disk", "online", self.pool, *map(str, out),
                                  "--wait", check=False, timeout=900)
            readmitted = result.returncode == 0
            self.step(f"disk online {out}: exit {result.returncode}")
            if not readmitted:
                self.problem(f"disks {out} did not come back online after fault clear: "
                             f"{result.stderr.strip()[-300:]}")
        status = self.status()
        before = self.states(status)
        try:
            self.down()
        except CommandFailed as error:
            self.problem(f"could not take the failed pool down cleanly: {error}")
            return
        try:
            self.mount_pool()
        except Abort as error:
            self.problem(f"after fault clear the pool does not mount again: {error}")
            return
        status = self.status()
        after = self.states(status)
        volume_state = self.volume_state(status)
        back = sorted(d for d in before if before[d] not in USABLE and after.get(d) in USABLE)
        stay = sorted(d for d in before if before[d] not in USABLE and after.get(d) not in USABLE)
        parts = [f"after fault clear + remount: volume {volume_state}, disks {after}"]
        if stay:
            parts.append(f"disks {stay} stay {', '.join(sorted({after[d] for d in stay}))} "
                         "(not re-admitted)")
        if back:
            parts.append(f"disks {back} are back in service")
        self.note("; ".join(parts))
        if back:
            self.problem(f"disks {back} were out of service before the remount and are back "
                         "online after it without a rebuild (stale contents trusted again)")
        if readmitted and (stay or volume_state != "online"):
            self.problem(f"after disk online and a remount: volume {volume_state}, disks {after}")
        assert self.pool_mnt is not None
        self.loop = self.env.attach_loop(self.pool_mnt / self.volume)
        back_model = self.model_check("base files, block level, after disk online + remount",
                                      self.not_usable(status), rotted)
        if readmitted and back_model["lost"]:
            self.problem(f"{back_model['lost']} base blocks still fail after the disks came "
                         "back online")
        if self.up_fs_read_only():
            summary = self.check_all("all acknowledged files through ext4, after remount",
                                     must_be_ok=False)
            self.note(f"after remount, through ext4 (ro): {summary['ok_bytes'] / MiB:.1f} of "
                      f"{summary['bytes'] / MiB:.1f} MiB of acknowledged data readable")

    def up_fs_read_only(self) -> bool:
        assert self.loop is not None
        result = run([tool("fsck.ext4"), "-fn", self.loop], check=False, timeout=600)
        self.note(f"fsck.ext4 -fn after remount: exit {result.returncode}"
                  + (" (clean)" if result.returncode == 0 else " (errors: ext4 metadata lost)"))
        for options in (("ro",), ("ro", "noload")):
            try:
                self.fs = self.env.mount_fs(self.loop, *options)
                if options != ("ro",):
                    self.note("ext4 mounts only with ro,noload")
                return True
            except CommandFailed:
                continue
        self.note("ext4 does not mount any more, even read-only")
        return False

    def attempt_replace_beyond(self, disk: int) -> None:
        """Replacing a disk whose data has no surviving redundancy: must be refused or end
        with the unrecoverable extents reported, never invent data."""
        self._replacements += 1
        new = self.env.make_image(f"new{self._replacements}.img", self.sizes.disk)
        result = self.env.cli("--json", "disk", "replace", self.pool, str(disk), str(new),
                              "--wait", check=False, timeout=900)
        try:
            info = json.loads(result.stdout)
        except json.JSONDecodeError:
            self.note(f"disk replace {disk} (nothing to rebuild from): refused, exit "
                      f"{result.returncode}: {result.stderr.strip()[-300:]}")
            return
        errors = info.get("errors") or []
        self.note(f"disk replace {disk} (nothing to rebuild from): exit {result.returncode}, "
                  f"rebuild {info.get('state')}, {info.get('done')}/{info.get('total')} extents "
                  f"moved, {info.get('failed')} failed"
                  + (f" (first: {errors[0]})" if errors else ""))
        status = self.status()
        for d in status["disks"]:
            if d["path"] == str(new):
                self.images[int(d["id"])] = new

    # ---- teardown ---------------------------------------------------------------------------

    def finish(self) -> Result:
        result = self.result
        problems = self.env.cleanup(keep=self.keep)
        for text in problems:
            result.problems.append("cleanup: " + text)
        if self.keep:
            result.workdir = str(self.env.root) if self.env.root.exists() else None
        result.commands = self.env.commands
        result.app_errors = len(self.errors())
        if result.problems:
            result.verdict = "FAILED"
        elif result.expected == "fail":
            if self.failure_seen:
                result.verdict = "expected failure"
            else:
                result.verdict = "FAILED"
                result.problems.append("a clean failure was expected but none surfaced")
        elif result.expected == "either":
            result.verdict = "expected failure" if self.failure_seen else "pass"
        else:
            result.verdict = "pass"
        result.seconds = round(time.monotonic() - self.started, 1)
        return result


# ---- the scenarios ----------------------------------------------------------------------------


def loss_within_tolerance(t: Trial) -> None:
    """Fail tolerance-many disks mid-write (a simple volume: one, which it cannot survive);
    writes go on; `disk replace` each dead disk with a fresh image; verify everything."""
    layout = t.layout
    kill = list(range(1, 1 + max(layout.tolerance, 1)))
    t.result.expected = "pass" if layout.tolerance else "fail"
    t.result.faults = (f"dead {'+'.join(f'd{d}' for d in kill)} mid-write, "
                       + ("replace each" if layout.tolerance else "replace attempted"))
    t.setup(layout.width)
    t.write_base()
    t.start_writers("f")
    per_step = t.sizes.phase_bytes // (len(kill) + 1)
    for disk in kill:
        t.wait_bytes("f", t.phase_bytes("f") + per_step)
        t.inject(disk, "--dead")
    t.wait_bytes("f", t.phase_bytes("f") + per_step)  # writes go on, degraded
    t.stop_writers("f")
    if not layout.tolerance:
        t.clean_failure("f", try_replace=kill)
        return
    t.app_errors("f", allowed=False)
    status = t.status()
    states = t.states(status)
    if any(states[d] != "failed" for d in kill):
        t.problem(f"the dead disks are not all `failed` in pool status: {states}")
    if t.volume_state(status) != "degraded":
        t.problem(f"volume is {t.volume_state(status)} with {len(kill)} disks dead, "
                  "expected degraded")
    t.check_all("degraded: every acknowledged file", must_be_ok=True, final=False)
    t.start_writers("r")
    t.wait_bytes("r", t.sizes.phase_bytes // 4)
    for disk in kill:
        t.replace(disk)
    t.wait_bytes("r", t.phase_bytes("r") + t.sizes.phase_bytes // 4)
    t.stop_writers("r")
    t.app_errors("r", allowed=False)
    t.expect_healthy("after replace")
    t.check_all("after replace: every acknowledged file", must_be_ok=True, final=False)
    t.scrub_after_rebuild()
    t.cycle()
    t.expect_healthy("after remount")
    t.check_all("after replace + remount: every acknowledged file", must_be_ok=True)


def loss_beyond_tolerance(t: Trial) -> None:
    """Fail one disk more than the tolerance, all at once, mid-write: the clean failure."""
    layout = t.layout
    t.result.expected = "fail"
    t.setup(layout.width + 1)
    t.write_base()
    # Which tolerance+1 disks to kill: the set that loses some base data for sure while
    # leaving the most of it on surviving slabs (the spare disk makes that possible), so both
    # "lost blocks fail with EIO" and "surviving blocks are intact" are put to the test.
    pool_map = placement.read_pool_map(str(p) for p in t.images.values())
    volume_map = placement.VolumeMap(pool_map, t.volume)
    places = [volume_map.locate(v)
              for name, extents in t.base_extents.items()
              for _, offset in placement.file_blocks(extents, t.acked("base")[name])
              for v in placement.volume_blocks(offset)]
    located = [p for p in places if p is not None]

    def score(dead: Iterable[int]) -> tuple[int, int]:
        lost = sum(not volume_map.readable(p, set(dead)) for p in located)
        return (min(lost, len(located) - lost), lost)

    kill = list(max(itertools.combinations(sorted(t.images), layout.tolerance + 1), key=score))
    _, lost = score(tuple(kill))
    t.step(f"killing disks {kill}: {lost} of {len(located)} base blocks will have no copy left")
    t.result.faults = f"dead {'+'.join(f'd{d}' for d in kill)} at once, mid-write"
    t.start_writers("f")
    t.wait_bytes("f", t.sizes.phase_bytes // 3)
    t.kill_at_once(kill)
    # Writes go on until the application has seen the failure (or wrote a phase's worth).
    target = t.phase_bytes("f") + t.sizes.phase_bytes
    deadline = time.monotonic() + 30
    while (time.monotonic() < deadline and not t.errors("f") and t.phase_bytes("f") < target
           and any(p.poll() is None for p in t.writers["f"])):
        time.sleep(0.2)
    time.sleep(1.0)
    t.stop_writers("f")
    t.clean_failure("f")


def flakey(t: Trial) -> None:
    """One disk flakey (up 2 s, down 1 s: every request fails) while the writers run."""
    layout = t.layout
    t.result.expected = "pass" if layout.tolerance else "either"
    t.result.faults = f"flakey 2:1 d1 for {t.sizes.flakey_seconds:.0f}s mid-write"
    t.setup(layout.width)
    t.write_base()
    t.start_writers("f")
    t.wait_bytes("f", t.sizes.phase_bytes // 4)
    before = t.phase_bytes("f")
    t.inject(1, "--flakey", "2:1")
    time.sleep(t.sizes.flakey_seconds)
    during = t.phase_bytes("f") - before
    t.clear_faults()
    t.step(f"{during / MiB:.1f} MiB acknowledged while the disk was flakey")
    t.wait_bytes("f", t.phase_bytes("f") + t.sizes.phase_bytes // 4, timeout=120)
    t.stop_writers("f")
    status = t.status()
    states = t.states(status)
    failed = sorted(d for d, s in states.items() if s not in USABLE)
    t.note(f"after the flakey period: disks {states}, volume {t.volume_state(status)}")
    if not layout.tolerance and (failed or t.errors("f")):
        t.clean_failure("f")
        return
    t.app_errors("f", allowed=False)
    if during == 0:
        t.problem("no write was acknowledged while the disk was flakey")
    t.check_all("after the flakey period: every acknowledged file", must_be_ok=True,
                final=False)
    for disk in failed:
        t.replace(disk)
    t.expect_healthy("after the flakey period" + (" and replace" if failed else ""))
    t.cycle()
    t.expect_healthy("after remount")
    t.check_all("after remount: every acknowledged file", must_be_ok=True)


def slow(t: Trial) -> None:
    """One disk slow (50 ms +- 20 ms per request) while the writers run: the foreground goes
    on (slower), nothing fails, the disk is not thrown out."""
    layout = t.layout
    t.result.expected = "pass"
    t.result.faults = f"latency 50ms±20ms d1 for {t.sizes.slow_seconds:.0f}s mid-write"
    t.setup(layout.width)
    started = time.monotonic()
    t.write_base()
    healthy_rate = t.phase_bytes("base") / (time.monotonic() - started)
    t.start_writers("f")
    t.wait_bytes("f", t.sizes.phase_bytes // 4)
    before = t.phase_bytes("f")
    files_before = len(t.acked("f"))
    t.inject(1, "--latency", "50ms", "--jitter", "20ms")
    time.sleep(t.sizes.slow_seconds)
    during = t.phase_bytes("f") - before
    files_during = len(t.acked("f")) - files_before
    t.clear_faults()
    t.note(f"writes (capped at {t.sizes.writers * t.sizes.rate / MiB:.0f} MiB/s): "
           f"{healthy_rate / MiB:.1f} MiB/s healthy, "
           f"{during / MiB / t.sizes.slow_seconds:.2f} MiB/s ({files_during} files) "
           "with the slow disk")
    if files_during == 0:
        t.problem(f"no file was acknowledged in {t.sizes.slow_seconds:.0f}s with one slow disk")
    t.wait_bytes("f", t.phase_bytes("f") + t.sizes.phase_bytes // 4, timeout=120)
    t.stop_writers("f")
    t.app_errors("f", allowed=False)
    status = t.status()
    if any(s != "online" for s in t.states(status).values()):
        t.problem(f"a slow disk was taken out of service: {t.states(status)}")
    t.expect_healthy("after the slow period")
    t.cycle()
    t.check_all("after remount: every acknowledged file", must_be_ok=True)


def bitrot_and_loss(t: Trial) -> None:
    """Rot blocks of known files on disk 0 while unmounted, then kill disk 1 mid-write.
    mirror-3 and parity-2 survive both; the others must fail cleanly (EIO, never wrong data)
    on exactly the blocks that lost every good copy."""
    layout = t.layout
    rot_disk, dead_disk = 0, 1
    t.may_be_failing.add(rot_disk)
    survives = layout.tolerance >= 2
    t.result.expected = "pass" if survives else "fail"
    t.setup(layout.width)
    t.write_base()
    pool_map = placement.read_pool_map(str(p) for p in t.images.values())
    volume_map = placement.VolumeMap(pool_map, t.volume)
    candidates = []
    for name, extents in sorted(t.base_extents.items()):
        for _, offset in placement.file_blocks(extents, t.acked("base")[name]):
            if offset % BLOCK:
                continue
            place = volume_map.locate(offset)
            if place is None:
                continue
            mine = [where for where in place.copies if where[0] == rot_disk]
            if mine:
                candidates.append(mine[0])
    step = max(1, len(candidates) // t.sizes.rot_blocks)
    targets = frozenset(candidates[::step][: t.sizes.rot_blocks])
    t.result.faults = f"rot {len(targets)} blocks d{rot_disk} + dead d{dead_disk} mid-write"
    t.down()
    placement.rot(str(t.images[rot_disk]), sorted(o for _, o in targets),
                  random.Random(t.seed))
    t.step(f"rotted {len(targets)} blocks of base files on disk {rot_disk} (unmounted)")
    t.up(faults=True, fsck=True)
    t.start_writers("f")
    t.wait_bytes("f", t.sizes.phase_bytes // 3)
    t.inject(dead_disk, "--dead")
    t.wait_bytes("f", t.phase_bytes("f") + t.sizes.phase_bytes // 2)
    t.stop_writers("f")
    if not survives:
        t.clean_failure("f", rotted=targets, remount=False,
                        try_replace=[dead_disk] if layout.tolerance else [])
        return
    t.app_errors("f", allowed=False)
    model = t.model_check("base files, block level, rot + dead disk", {dead_disk}, targets,
                          via_device=False)
    if model["lost"]:
        t.problem(f"{model['lost']} blocks unreadable with one rotted and one dead disk")
    t.check_all("rot + dead disk: every acknowledged file", must_be_ok=True, final=False)
    status = t.status()
    errors = {int(d["id"]): d["errors"] for d in status["disks"]}
    t.note(f"checksum errors counted on disk {rot_disk}: "
           f"{errors.get(rot_disk, {}).get('checksum')} ({len(targets)} blocks rotted)")
    t.start_writers("r")
    t.replace(dead_disk)
    t.stop_writers("r")
    t.app_errors("r", allowed=False)
    scrub = t.scrub()
    if scrub:
        report = scrub.get("report", {})
        if report.get("unrecoverable"):
            t.problem(f"scrub finds unrecoverable data: {report['unrecoverable'][:3]}")
    t.expect_healthy("after replace + scrub")
    t.cycle()
    t.check_all("after replace, scrub, remount: every acknowledged file", must_be_ok=True)


def stale_copy(t: Trial) -> None:
    """A member swapped for an older copy of itself between two mounts: a copy of disk 1's
    image taken while unmounted, more files written and synced, the copy put back. The disk
    must not serve as if current (`pool status` says stale), the mount catches it up, and
    every acknowledged file reads back."""
    t.result.expected = "pass"
    t.result.faults = "d1 image replaced by its copy from before more writes"
    t.setup(t.layout.width)
    t.write_base()
    t.down()
    image = t.images[1]
    aside = t.env.root / "disk1.old"
    run(["cp", "--sparse=always", str(image), str(aside)])
    t.step(f"copied {image.name} aside (cp --sparse=always)")
    t.up(faults=False)
    t.start_writers("new", total=t.sizes.phase_bytes)
    for process in t.writers["new"]:
        process.wait(timeout=600)
    t.app_errors("new", allowed=False)
    t.step(f"{t.phase_bytes('new') / MiB:.1f} MiB more acknowledged")
    t.down()
    run(["cp", "--sparse=always", str(aside), str(image)])
    aside.unlink()
    t.step(f"put the old copy back as {image.name}")
    offline = t.status()  # not mounted: read from the images
    shown = next(d for d in offline["disks"] if int(d["id"]) == 1)
    reason = str(shown.get("state_reason") or "")
    t.note(f"pool status before the mount: disk 1 {shown['state']} ({reason})")
    if shown["state"] in USABLE or "stale" not in reason:
        t.problem(f"the older copy of disk 1 is {shown['state']} in pool status, not stale: "
                  f"{reason!r}")
    t.up(faults=False)
    t.wait_online("after the mount's catch-up")
    t.check_all("stale copy caught up: every acknowledged file", must_be_ok=True,
                final=False)
    scrub = t.scrub()
    if scrub and scrub.get("report", {}).get("unrecoverable"):
        t.problem(f"scrub finds unrecoverable data: {scrub['report']['unrecoverable'][:3]}")
    t.cycle()
    t.expect_healthy("after remount")
    t.check_all("after remount: every acknowledged file", must_be_ok=True)


def host_full(t: Trial) -> None:
    """The host file system under the images fills up (a tmpfs under the trial's images,
    shrunk to a little above what they use) while the writers run: writes fail, but no disk
    and not the pool. The tmpfs is grown again and writes succeed without `disk online`;
    every acknowledged file reads back. (ext4 may abort its journal on the write errors: it
    is then remounted, which is noted.)"""
    t.result.expected = "pass"
    headroom = 16 * MiB
    t.result.faults = f"tmpfs under the images shrunk to used+{headroom // MiB} MiB mid-write"
    big = 2 * t.layout.width * t.sizes.disk
    t.env.mount_images_tmpfs(big)
    t.setup(t.layout.width)
    t.write_base()
    used = shutil.disk_usage(t.env.images).used
    t.env.resize_images_tmpfs(used + headroom)
    t.step(f"tmpfs shrunk to {(used + headroom) / MiB:.0f} MiB ({used / MiB:.0f} MiB used)")
    t.start_writers("full")
    deadline = time.monotonic() + 120
    while (time.monotonic() < deadline and not t.errors("full")
           and any(p.poll() is None for p in t.writers["full"])):
        time.sleep(0.2)
    time.sleep(1.0)
    t.stop_writers("full")
    errors = t.app_errors("full", allowed=True)
    if not errors:
        t.problem("the host file system never filled up: no write failed")
    status = t.status()
    states = t.states(status)
    full = [int(d["id"]) for d in status["disks"] if d.get("host_full")]
    t.note(f"host full: pool {status['health']}, volume {t.volume_state(status)}, disks "
           f"{states}, host_full on {full}, actions {status.get('actions')}")
    if status["health"] == "failed" or t.volume_state(status) == "failed":
        t.problem(f"a full host failed the pool: {status['health']}, volume "
                  f"{t.volume_state(status)}")
    if any(s != "online" for s in states.values()):
        t.problem(f"a full host took disks out of service: {states}")
    t.env.resize_images_tmpfs(big)
    t.step(f"tmpfs grown to {big / MiB:.0f} MiB")
    if t.fs is not None and not fs_writable(t.fs):
        t.note("ext4 aborted its journal on the write errors (read-only): ext4 remounted")
        assert t.loop is not None
        t.env.umount_fs(t.fs)
        t.fs = t.env.mount_fs(t.loop)  # replays the journal
        t.env.umount_fs(t.fs)
        fsck = run([tool("fsck.ext4"), "-fn", t.loop], check=False, timeout=600)
        if fsck.returncode != 0:
            t.problem(f"fsck.ext4 -fn after the journal abort: exit {fsck.returncode}: "
                      + " | ".join(fsck.stdout.strip().splitlines()[-3:]))
        t.fs = t.env.mount_fs(t.loop)
    t.start_writers("after", total=t.sizes.phase_bytes)
    for process in t.writers["after"]:
        process.wait(timeout=600)
    t.app_errors("after", allowed=False)
    t.step(f"after the host has room: {t.phase_bytes('after') / MiB:.1f} MiB acknowledged")
    t.expect_healthy("after the host has room (no disk online)")
    t.check_all("after the host has room: every acknowledged file", must_be_ok=True,
                final=False)
    t.cycle()
    t.expect_healthy("after remount")
    t.check_all("after remount: every acknowledged file", must_be_ok=True)


ZEROED_EXTENTS = 6


def zeroed_range(t: Trial) -> None:
    """A zeroed range under ext4 on a parity volume: a hole punched (`fallocate
    --punch-hole`) over the data and checksum areas of disk 0's first extents, as a thin
    store or a disk returning zeros would. Done while unmounted, so the daemon's checksum
    cache cannot hide it. ext4 is then used live (writers run during the scrub): every file
    reads back, fsck is clean, scrub repairs it and finds nothing unrecoverable."""
    t.result.expected = "pass"
    t.result.faults = f"hole punched over {ZEROED_EXTENTS} extents of d0 (unmounted)"
    t.may_be_failing.add(0)  # its checksum errors may rightly make it "failing" (a warning)
    t.setup(t.layout.width)
    t.write_base()
    t.down()
    pool_map = placement.read_pool_map(str(p) for p in t.images.values())
    disk = pool_map.disks[0]
    length = ZEROED_EXTENTS * disk.extent_stride
    run(["fallocate", "--punch-hole", "--offset", str(disk.data_start), "--length",
         str(length), str(t.images[0])])
    t.step(f"punched a hole of {length / MiB:.1f} MiB at {disk.data_start} in disk 0's image")
    t.up(faults=False)
    t.check_all("zeroed range: every acknowledged file", must_be_ok=True, final=False)
    t.start_writers("z", total=t.sizes.phase_bytes)
    scrub = t.scrub()
    for process in t.writers["z"]:
        process.wait(timeout=600)
    t.app_errors("z", allowed=False)
    report = (scrub or {}).get("report", {})
    if report.get("unrecoverable"):
        t.problem(f"scrub finds unrecoverable data: {report['unrecoverable'][:3]}")
    if scrub and not report.get("repaired_blocks"):
        t.problem("scrub repaired nothing: the hole hit no written block, or went unseen")
    again = t.scrub()
    again_report = (again or {}).get("report", {})
    if again and (again_report.get("unrecoverable") or again_report.get("mismatches")
                  or again_report.get("checksum_errors") or again_report.get("repaired_blocks")):
        t.problem(f"a second scrub still finds work: {again_report}")
    t.cycle()
    t.expect_healthy("after scrub and remount")
    t.check_all("after scrub and remount: every acknowledged file", must_be_ok=True)


def fs_writable(root: Path) -> bool:
    """Does a small file still go through an fsync (ext4 may have aborted its journal and
    gone read-only on write errors, possibly only now, as its journal commit failed)?"""
    if "ro" in mount_options(root):
        return False
    probe = root / ".writable-probe"
    try:
        with open(probe, "wb") as handle:
            handle.write(b"probe")
            handle.flush()
            os.fsync(handle.fileno())
        probe.unlink()
    except OSError:
        return False
    return True


def mount_options(mountpoint: Path) -> list[str]:
    with open("/proc/self/mounts") as handle:
        for line in handle:
            fields = line.split()
            if len(fields) > 3 and fields[1] == str(mountpoint):
                return fields[3].split(",")
    return []


SCENARIOS: dict[str, Callable[[Trial], None]] = {
    "loss-within-tolerance": loss_within_tolerance,
    "loss-beyond-tolerance": loss_beyond_tolerance,
    "flakey": flakey,
    "slow": slow,
    "bitrot-and-loss": bitrot_and_loss,
    "stale-copy": stale_copy,
    "host-full": host_full,
    "zeroed-range": zeroed_range,
}

# Scenarios that run on some layouts only (the others run on every layout).
ONLY_ON: dict[str, tuple[str, ...]] = {
    "stale-copy": ("mirror-2", "parity-1"),
    "host-full": ("mirror-2",),
    "zeroed-range": ("parity-1",),
}


def run_trial(scenario: str, layout_name: str, sizes: Sizes, *, seed: int = 1,
              workroot: Path | None = None, keep: bool = False, provisioning: str = "thin",
              echo: Callable[[str], None] | None = None) -> Result:
    """One trial, always cleaned up (also on Ctrl-C, which is re-raised afterwards)."""
    trial = Trial(scenario, LAYOUTS[layout_name], sizes, seed, workroot, keep=keep,
                  provisioning=provisioning, echo=echo)
    try:
        SCENARIOS[scenario](trial)
    except Abort as error:
        trial.problem(str(error))
    except CommandFailed as error:
        trial.problem(f"command failed: {error}")
        if trial.pool_mnt is not None:
            trial.result.notes.append("daemon log tail:\n" + trial.env.log_tail(trial.pool))
    except Exception as error:  # a bug in the harness is a failed trial, not a crash
        import traceback

        trial.problem(f"harness error: {error!r}\n{traceback.format_exc()}")
    except BaseException:
        trial.result.problems.append("interrupted")
        trial.finish()
        raise
    return trial.finish()


def still_mounted_below(root: Path) -> list[str]:
    return [m for m in mounts() if m.startswith(str(root) + "/")]


__all__ = ["LAYOUTS", "ONLY_ON", "SCENARIOS", "FULL", "QUICK", "Result", "Sizes", "run_trial",
           "still_mounted_below", "wait_until"]
