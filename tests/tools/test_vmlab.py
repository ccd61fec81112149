"""The VM fault lab (tools/vmlab, docs/vmlab.md).

The pure parts (dm-log-writes reader, initramfs archive, module signatures, dm tables, the
verdict of a scenario) are tested in-process. One short VM test runs in the default run:
boot Debian's kernel under qemu and run one dm-flakey scenario inside; it skips, saying why,
when qemu is not installed or Debian's kernel package cannot be downloaded.
"""

from __future__ import annotations

import os
import platform
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VMLAB = REPO / "tools" / "vmlab"
sys.path.insert(0, str(REPO / "tools"))

from vmlab_lib import dmtools, logwrites, runner, vm  # noqa: E402

# --------------------------------------------------------------------------------------------
# dm-log-writes logs


def _log_image(entries: list[tuple[int, int, int, bytes, str | None]], sectorsize: int = 512,
               nr_entries: int | None = None) -> bytes:
    """A dm-log-writes log as the kernel writes it: (sector, nr_sectors, flags, data, mark)."""
    out = bytearray(sectorsize)
    count = nr_entries if nr_entries is not None else len(entries)
    struct.pack_into("<QQQI", out, 0, logwrites.MAGIC, 1, count, sectorsize)
    for sector, nr, flags, data, mark in entries:
        header = bytearray(sectorsize)
        name = (mark or "").encode()
        struct.pack_into("<QQQQ", header, 0, sector, nr, flags, len(name))
        header[32 : 32 + len(name)] = name
        out += header
        if not flags & logwrites.DISCARD:
            assert len(data) == nr * sectorsize
            out += data
    return bytes(out)


def test_log_replay_stops_at_the_mark(tmp_path: Path) -> None:
    a, b, c = b"A" * 1024, b"B" * 512, b"C" * 512
    log = tmp_path / "log"
    log.write_bytes(_log_image([
        (0, 2, 0, a, None),
        (8, 1, logwrites.FLUSH, b, None),
        (0, 0, logwrites.MARK, b"", "cut0"),
        (1, 1, logwrites.FUA, c, None),
        (0, 0, logwrites.MARK, b"", "end"),
    ]))
    parsed = logwrites.Log(log)
    assert [e.kind for e in parsed.entries()] == ["write", "write", "mark", "write", "mark"]
    assert [m.mark for m in parsed.marks()] == ["cut0", "end"]

    target = tmp_path / "disk"
    target.write_bytes(bytes(8192))
    assert parsed.replay(target, mark="cut0") == 2
    data = target.read_bytes()
    assert data[:1024] == a
    assert data[4096:4608] == b
    assert data[4608:] == bytes(8192 - 4608)

    target.write_bytes(bytes(8192))
    parsed.replay(target)  # everything
    data = target.read_bytes()
    assert data[:512] == b"A" * 512
    assert data[512:1024] == c


def test_log_reads_entries_past_a_stale_super_count(tmp_path: Path) -> None:
    """The kernel updates nr_entries on FUA writes and marks only: later entries count too."""
    log = tmp_path / "log"
    log.write_bytes(_log_image([(0, 1, 0, b"x" * 512, None), (1, 1, 0, b"y" * 512, None),
                                (0, 0, logwrites.MARK, b"", "late")], nr_entries=1)
                    + bytes(4096))
    assert logwrites.Log(log).find_mark("late").index == 2


def test_log_replays_discards_as_zeros(tmp_path: Path) -> None:
    log = tmp_path / "log"
    log.write_bytes(_log_image([(0, 4, 0, b"z" * 2048, None),
                                (1, 2, logwrites.DISCARD, b"", None)]))
    target = tmp_path / "disk"
    target.write_bytes(bytes(4096))
    logwrites.Log(log).replay(target)
    assert target.read_bytes()[:2048] == b"z" * 512 + bytes(1024) + b"z" * 512


def test_log_rejects_what_is_not_a_log(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(bytes(4096))
    with pytest.raises(logwrites.LogError, match="not a dm-log-writes log"):
        logwrites.Log(bad)
    log = tmp_path / "log"
    log.write_bytes(_log_image([(0, 1, 0, b"x" * 512, None)]))
    with pytest.raises(logwrites.LogError, match="no mark 'nope'"):
        logwrites.Log(log).replay(tmp_path / "log", mark="nope")


# --------------------------------------------------------------------------------------------
# initramfs, modules, tables, verdicts


def test_cpio_newc_archive_round_trips() -> None:
    archive = vm._cpio_newc([("bin", 0o040755, b""), ("bin/x", 0o100755, b"hello"),
                             ("bin/sh", 0o120777, b"busybox")])
    entries, offset = [], 0
    while True:
        assert archive[offset : offset + 6] == b"070701"
        fields = [int(archive[offset + 6 + 8 * i : offset + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name_start = offset + 110
        name = archive[name_start : name_start + namesize - 1].decode()
        data_start = (name_start + namesize + 3) & ~3
        data = archive[data_start : data_start + size]
        offset = (data_start + size + 3) & ~3
        if name == "TRAILER!!!":
            break
        entries.append((name, mode, data))
    assert entries == [("bin", 0o040755, b""), ("bin/x", 0o100755, b"hello"),
                       ("bin/sh", 0o120777, b"busybox")]
    assert len(archive) % 4 == 0


def test_module_signature_is_stripped() -> None:
    body = b"\x7fELF" + b"m" * 100
    signature = b"s" * 40
    info = bytes([0, 0, 2, 0, 0, 0, 0, 0]) + struct.pack(">I", len(signature))
    signed = body + signature + info + vm.SIG_MAGIC
    assert vm.strip_module_signature(signed) == body
    assert vm.strip_module_signature(body) == body


def test_module_closure_puts_dependencies_first() -> None:
    table = {
        "dm_flakey": ("kernel/drivers/md/dm-flakey.ko", ["kernel/drivers/md/dm-mod.ko"]),
        "dm_mod": ("kernel/drivers/md/dm-mod.ko", []),
        "ext4": ("kernel/fs/ext4/ext4.ko", ["kernel/lib/crc16.ko", "kernel/fs/jbd2/jbd2.ko"]),
    }
    assert vm._module_closure(table, ["dm-flakey", "ext4", "dm-mod", "builtin_one"]) == [
        "kernel/drivers/md/dm-mod.ko", "kernel/drivers/md/dm-flakey.ko",
        "kernel/lib/crc16.ko", "kernel/fs/jbd2/jbd2.ko", "kernel/fs/ext4/ext4.ko"]


def test_dm_tables() -> None:
    assert dmtools.flakey("/dev/loop0", 100, 0, 3600, "error_writes") == \
        "0 100 flakey /dev/loop0 0 0 3600 1 error_writes"
    assert dmtools.flakey("/dev/loop0", 100, 0, 9, "corrupt_bio_byte 1 w 90 0") == \
        "0 100 flakey /dev/loop0 0 0 9 5 corrupt_bio_byte 1 w 90 0"
    assert dmtools.bad_range("/dev/loop1", 1000, 100, 50).splitlines() == [
        "0 100 linear /dev/loop1 0", "100 50 error", "150 850 linear /dev/loop1 150"]
    assert dmtools.bad_range("/dev/loop1", 1000, 0, 1000) == "0 1000 error"
    assert dmtools.zero_range("/dev/loop1", 1000, 100, 50).splitlines() == [
        "0 100 linear /dev/loop1 0", "100 50 zero", "150 850 linear /dev/loop1 150"]
    assert dmtools.zero_range("/dev/loop1", 1000, 900, 100).splitlines() == [
        "0 900 linear /dev/loop1 0", "900 100 zero"]
    assert dmtools.log_writes("/dev/loop2", "/dev/loop3", 8) == \
        "0 8 log-writes /dev/loop2 /dev/loop3"


def _result(ok: bool, stage: str, expected: tuple[str, str] | None) -> runner.Result:
    return runner.Result("x", "mirror-2", "f", ok, 0, 1.0, "", stage,
                         expected[0] if expected else None, expected[1] if expected else None)


def test_verdicts_are_honest() -> None:
    needs = ("needs checksums, issue 3", "fault")
    assert _result(True, "fault", None).verdict == "pass"
    assert _result(False, "fault", None).verdict == "FAIL"
    xfail = _result(False, "fault", needs)
    assert xfail.verdict == "expected failure (needs checksums, issue 3)"
    assert xfail.good
    # failing before the fault is injected is never an expected failure
    early = _result(False, "setup", needs)
    assert early.verdict.startswith("FAIL")
    assert not early.good
    # once the feature lands the same check passes, and the table says the list is stale
    assert _result(True, "fault", needs).verdict.startswith("pass (unexpected")


def test_scenario_selection() -> None:
    default = runner.select_scenarios([], False)
    names = {(s.name, layout) for s, layout in default}
    assert ("error-writes", "mirror-2") in names
    assert ("power-cut", "parity-1") in names
    assert runner.select_scenarios(["error-writes/parity-1"], False)[0][1] == "parity-1"
    assert len(runner.select_scenarios(["tolerance"], True)) == 4
    with pytest.raises(SystemExit, match="no scenario matches"):
        runner.select_scenarios(["nope"], False)


def test_nbd_variants_run_the_same_scenario_over_the_export() -> None:
    """error-writes-nbd and power-cut-nbd are in the default table and are the loop-device
    scenarios with the world switched to NBD (mount --nbd, nbd-client), nothing else."""
    default = {(s.name, layout) for s, layout in runner.select_scenarios([], False)}
    assert {("error-writes-nbd", "mirror-2"), ("power-cut-nbd", "mirror-2")} <= default
    seen: list[bool] = []

    def scenario(world: runner.World) -> runner.Outcome:
        seen.append(world.nbd)
        return runner.Outcome(True, 1, "ran")

    class FakeWorld:
        nbd = False

    wrapped = runner.over_nbd(scenario)
    assert wrapped(FakeWorld()) == runner.Outcome(True, 1, "ran")  # type: ignore[arg-type]
    assert seen == [True]
    by_name = {s.name: s for s in runner.SCENARIOS}
    for name in ("error-writes", "power-cut"):
        assert by_name[f"{name}-nbd"].func.__doc__ == by_name[name].func.__doc__


# --------------------------------------------------------------------------------------------
# the VM


def _vm_unavailable() -> str | None:
    if platform.machine() not in ("x86_64", "amd64"):
        return f"VM lab skipped: it boots x86_64 Debian kernels, this is {platform.machine()}"
    if shutil.which(vm.QEMU) is None:
        return ("VM lab skipped: qemu is not installed (qemu-system-x86_64 missing; "
                "`make setup` installs qemu-system-x86)")
    if os.geteuid() != 0:
        return "VM lab skipped: needs root (virtiofsd shares the root file system)"
    return None


def _vmlab(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(VMLAB), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def lab() -> None:
    reason = _vm_unavailable()
    if reason:
        pytest.skip(reason)
    result = _vmlab("setup", timeout=300)
    if result.returncode != 0:
        if "could not download" in result.stderr or "apt-cache does not know" in result.stderr:
            pytest.skip("VM lab skipped: Debian's kernel package could not be downloaded: "
                        + result.stderr.strip().splitlines()[-1])
        pytest.fail(f"tools/vmlab setup failed:\n{result.stdout}\n{result.stderr}")


# The lab VM runs the scenario runner with this checkout's own virtualenv (tools/vmlab
# scenarios refuses without it), so a checkout without .venv skips rather than fails.
VENV_PYTHON = REPO / ".venv" / "bin" / "python"


@pytest.mark.skipif(not VENV_PYTHON.exists(),
                    reason=f"VM lab skipped: the VM runs the scenarios with {VENV_PYTHON}, "
                    "which this checkout lacks (`make setup` creates it)")
def test_vm_boots_and_runs_a_dm_flakey_scenario(lab: None) -> None:
    """Boot Debian's kernel, and inside it: loop devices under dm-flakey, a mirror-2 pool on
    /dev/mapper, ext4 on the volume, one disk failing every write mid-run; every hash and
    e2fsck -fn must come back clean."""
    result = _vmlab("scenarios", "--only", "error-writes/mirror-2", "--jobs", "1",
                    "--timeout", "280", timeout=300)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "in the lab VM (kernel" in output, output
    rows = [line for line in result.stdout.splitlines()
            if line.startswith("error-writes") and "mirror-2" in line]
    assert rows, output
    assert rows[-1].rstrip().endswith("pass"), output
    assert "1 passed, 0 failed" in result.stdout, output


@pytest.mark.slow
def test_vm_run_returns_output_and_status(lab: None) -> None:
    result = _vmlab("run", "--", "sh", "-c", "uname -r; echo to-stderr >&2; exit 7",
                    timeout=180)
    assert result.returncode == 7, result.stderr
    assert "to-stderr" in result.stdout
    assert result.stdout.split()[0].startswith("6."), result.stdout


@pytest.mark.slow
def test_vm_run_timeout_kills_the_vm_and_removes_its_scratch(lab: None, tmp_path: Path) -> None:
    env = dict(os.environ, VMLAB_SCRATCH=str(tmp_path))
    result = subprocess.run([sys.executable, str(VMLAB), "run", "--timeout", "20", "--",
                             "sleep", "600"], capture_output=True, text=True, timeout=120,
                            env=env, cwd=REPO)
    assert result.returncode == 124, result.stderr
    assert "timed out" in result.stderr
    assert list(tmp_path.iterdir()) == []
