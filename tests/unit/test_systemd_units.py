"""The systemd side (issue 18 items 1-2), in-process: the unit files as installed, the install
and uninstall, sd_notify's datagrams, the status line, the runtime directory, the options of
the mount(8) helper."""

import os
import socket
import stat
import sys
from pathlib import Path

import pytest

from blockspace.admin import install
from blockspace.admin.registry import Registry, runtime_dir
from blockspace.cli import main as cli
from blockspace.cli import mount_helper
from blockspace.service import sd_notify
from blockspace.service.status_line import status_line


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> values (systemd allows a key more than once; comments skipped)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


@pytest.fixture
def installed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    assert cli.main(["system", "install", "--root", str(tmp_path), "--json"]) == 0
    capsys.readouterr()
    return tmp_path


def test_install_puts_units_helper_and_completion_in_place(installed: Path) -> None:
    units = installed / "etc/systemd/system"
    assert sorted(p.name for p in units.iterdir()) == sorted(install.UNITS)
    helper = installed / "sbin/mount.blockspace"
    assert stat.S_IMODE(helper.stat().st_mode) == 0o755
    assert helper.read_text().startswith(f"#!{sys.executable}\n")
    completion = (installed / "usr/share/bash-completion/completions/blockspace").read_text()
    assert "complete -o bashdefault -F _shtab_blockspace blockspace" in completion
    assert "_shtab_blockspace_pool_create" in completion
    assert "attach" in completion


def test_the_pool_service_is_notify_restarts_on_failure_and_runs_the_entry_point(
    installed: Path,
) -> None:
    unit = parse_unit(installed / "etc/systemd/system/blockspace@.service")
    service = unit["Service"]
    assert service["Type"] == ["notify"]
    assert service["NotifyAccess"] == ["main"]
    assert service["Restart"] == ["on-failure"]
    assert service["KillSignal"] == ["SIGTERM"]
    exec_start = service["ExecStart"][0].split()
    command = install.entry_point().split()
    assert exec_start[: len(command)] == command
    assert os.access(exec_start[0], os.X_OK)  # the installed console script (or python)
    assert exec_start[len(command):len(command) + 3] == ["mount", "--foreground", "%i"]
    assert "@BLOCKSPACE@" not in (installed / "etc/systemd/system/blockspace@.service").read_text()
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_the_scrub_timer_is_monthly_and_its_service_waits_for_the_scrub(installed: Path) -> None:
    timer = parse_unit(installed / "etc/systemd/system/blockspace-scrub@.timer")
    assert timer["Timer"]["OnCalendar"] == ["monthly"]
    assert timer["Timer"]["Persistent"] == ["true"]
    assert timer["Install"]["WantedBy"] == ["timers.target"]
    service = parse_unit(installed / "etc/systemd/system/blockspace-scrub@.service")["Service"]
    assert service["Type"] == ["oneshot"]
    assert service["ExecStart"][0].split()[-3:] == ["scrub", "%i", "--wait"]


def test_uninstall_removes_exactly_what_install_put_there(
    installed: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (installed / "etc/systemd/system/other.service").write_text("[Unit]\n")
    assert cli.main(["system", "uninstall", "--root", str(installed)]) == 0
    assert [p.name for p in (installed / "etc/systemd/system").iterdir()] == ["other.service"]
    assert not (installed / "sbin/mount.blockspace").exists()
    capsys.readouterr()
    assert cli.main(["system", "uninstall", "--root", str(installed)]) == 0
    assert "nothing was installed" in capsys.readouterr().out


def test_install_into_a_missing_root_is_bad_input_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["system", "install", "--root", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "is not a directory" in err
    assert not (tmp_path / "nope").exists()


@pytest.mark.parametrize("abstract", [False, True])
def test_sd_notify_sends_one_datagram_to_the_notify_socket(tmp_path: Path, abstract: bool) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        if abstract:
            name = f"blockspace-test-{os.getpid()}"
            server.bind("\0" + name)
            env = {"NOTIFY_SOCKET": "@" + name}
        else:
            server.bind(str(tmp_path / "notify"))
            env = {"NOTIFY_SOCKET": str(tmp_path / "notify")}
        server.settimeout(5)
        assert sd_notify.notify("READY=1\nSTATUS=online, 3 disks", env)
        assert server.recv(4096) == b"READY=1\nSTATUS=online, 3 disks"


def test_sd_notify_without_a_socket_or_with_a_dead_one_is_a_quiet_no(tmp_path: Path) -> None:
    assert not sd_notify.notify("READY=1", {})
    assert not sd_notify.notify("READY=1", {"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not sd_notify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone")})


def test_the_status_line() -> None:
    assert status_line(["online"] * 3) == "online, 3 disks"
    assert status_line(["online", "retired"]) == "online, 1 disk"
    assert status_line(["online"] * 3, scrub={"state": "running", "percent": 12.4}) == \
        "online, 3 disks, scrubbing 12%"
    assert status_line(["online", "failed", "online"],
                       rebuild={"state": "running", "percent": 40.0}) == \
        "degraded: rebuilding 40%, 1 of 3 disks failed"
    assert status_line(["missing", "failed", "online", "resyncing"],
                       scrub={"state": "paused", "percent": 5}) == \
        "degraded: scrubbing 5% (paused), 1 of 4 disks failed, 1 of 4 disks missing, " \
        "1 of 4 disks resyncing"
    assert status_line(["online"], rebuild={"state": "done", "percent": 100}) == \
        "online, 1 disk"


def test_runtime_files_live_under_run_unless_a_state_dir_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("BLOCKSPACE_STATE_DIR", raising=False)
    monkeypatch.delenv("BLOCKSPACE_RUNTIME_DIR", raising=False)
    assert runtime_dir(None) == Path("/run/blockspace")
    assert runtime_dir(str(tmp_path)) == tmp_path / "run"
    monkeypatch.setenv("BLOCKSPACE_STATE_DIR", str(tmp_path))
    assert runtime_dir(None) == tmp_path / "run"
    monkeypatch.setenv("BLOCKSPACE_RUNTIME_DIR", str(tmp_path / "rt"))
    assert runtime_dir(None) == tmp_path / "rt"
    registry = Registry(tmp_path, tmp_path / "rt")
    assert registry.socket_path("tank") == tmp_path / "rt" / "tank.sock"
    assert Registry(tmp_path).socket_path("tank") == tmp_path / "run" / "tank.sock"


def test_mount_helper_options_become_mount_flags() -> None:
    request = mount_helper.parse_options(
        "rw,nbd,owner=1000:100,io_timeout=5,defaults,nofail,_netdev,x-systemd.automount,"
        "noauto,comment=x")
    assert request.mount_arguments() == ["--nbd", "--owner", "1000:100", "--io-timeout=5"]
    assert request.ignored == ["defaults", "nofail", "_netdev", "x-systemd.automount",
                               "noauto", "comment=x"]
    assert mount_helper.parse_options("ro,nbd=/run/x.sock").mount_arguments() == \
        ["--read-only", "--nbd=/run/x.sock"]
    assert mount_helper.parse_options("").mount_arguments() == []


@pytest.mark.parametrize("argv", [
    ["tank", "/mnt", "-o", "rw,frobnicate"],
    ["tank", "/mnt", "-o", "owner=root"],
    ["tank", "/mnt", "-o", "io_timeout=0"],
    ["tank"],
    ["tank", "/mnt", "-N", "1234"],
])
def test_mount_helper_bad_invocation_is_exit_1_with_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert mount_helper.main(argv) == mount_helper.USAGE
    err = capsys.readouterr().err
    assert err.startswith("mount.blockspace: ")
    assert err.count("\n") == 1


def test_mount_helper_sloppy_ignores_unknown_options_and_fake_mounts_nothing(
    capsys: pytest.CaptureFixture[str]
) -> None:
    assert mount_helper.main(["tank", "/nonexistent", "-s", "-f", "-o", "rw,frobnicate"]) == 0
    assert "blockspace mount tank /nonexistent" in capsys.readouterr().err


def test_mount_helper_maps_a_failed_mount_to_32(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BLOCKSPACE_STATE_DIR", str(tmp_path))
    assert mount_helper.main(["nosuchpool", str(tmp_path), "-o", "rw"]) == \
        mount_helper.MOUNT_FAILURE
    assert "no pool named 'nosuchpool'" in capsys.readouterr().err
