"""How `blockspace` turns failures into one line and an exit code (README "Exit codes"), in
process: each kind of error a command can raise, the groups trio raises out of a nursery,
a bug; the option parsers that guard `mount` and `unmount`; an unmount whose daemon outlives
`--timeout`. The real subprocesses, every subcommand offline and mounted, are
tests/integration/test_cli_contract.py."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import pytest

from blockspace.admin.registry import MountEntry, PoolEntry, Registry
from blockspace.cli import common, main, mount
from blockspace.cli import pool as cli_pool
from blockspace.errors import BlockspaceError, DeviceError, InvalidInput, NoSpace


def run_failing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: BaseException,
    *flags: str,
) -> tuple[int, str, str]:
    """`blockspace pool list` with its command replaced by one that raises `error`."""

    def command(args: argparse.Namespace) -> int:
        raise error

    monkeypatch.setattr(cli_pool, "cmd_list", command)
    code = main.main([*flags, "pool", "list"])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("error", "code", "line"), [
    (InvalidInput("bad id"), common.BAD_INPUT, "blockspace: error: bad id"),
    (BlockspaceError("it failed"), common.FAILED, "blockspace: error: it failed"),
    (NoSpace("full"), common.FAILED, "blockspace: error: full"),
    (DeviceError("disk gone"), common.FAILED, "blockspace: error: disk gone"),
    (common.NotMounted("not mounted"), common.NOT_MOUNTED, "blockspace: error: not mounted"),
    (common.NothingToDo("no scrub"), common.NOTHING_TO_DO, "blockspace: error: no scrub"),
    (common.UsageError("blockspace pool: error: x"), common.BAD_INPUT, "blockspace pool: error: x"),
    # what trio raises out of a nursery: the user error inside, however deep
    (ExceptionGroup("g", [InvalidInput("no disk '1.0'")]), common.BAD_INPUT,
     "blockspace: error: no disk '1.0'"),
    (ExceptionGroup("g", [ExceptionGroup("h", [NoSpace("full")]), InvalidInput("later")]),
     common.FAILED, "blockspace: error: full"),
    (PermissionError(13, "Permission denied", "/var/lib/blockspace"), common.FAILED,
     "blockspace: error: [Errno 13] Permission denied: '/var/lib/blockspace'"),
    # bugs: one line too, and a code of their own
    (KeyError("volume"), common.INTERNAL_ERROR,
     "blockspace: internal error: KeyError: 'volume' (a bug; run with -v for the traceback)"),
    (ExceptionGroup("g", [InvalidInput("bad"), ValueError("bug")]), common.INTERNAL_ERROR,
     "blockspace: internal error: ExceptionGroup: g (2 sub-exceptions) (a bug; run with -v "
     "for the traceback)"),
])
def test_each_error_is_one_line_and_its_code(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], error: BaseException,
    code: int, line: str,
) -> None:
    assert run_failing(monkeypatch, capsys, error) == (code, "", line + "\n")


def test_verbose_shows_the_traceback_of_a_bug(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_failing(monkeypatch, capsys, KeyError("volume"), "-v")
    assert code == common.INTERNAL_ERROR
    assert err.startswith("Traceback (most recent call last):\n")
    assert err.endswith("blockspace: internal error: KeyError: 'volume' (a bug; run with -v "
                        "for the traceback)\n")


def test_ctrl_c_exits_130(monkeypatch: pytest.MonkeyPatch,
                          capsys: pytest.CaptureFixture[str]) -> None:
    assert run_failing(monkeypatch, capsys, KeyboardInterrupt()) == (130, "", "")


@pytest.mark.parametrize(("text", "ids"), [
    ("0", (0, 0)), ("1000", (1000, 1000)), ("1000:100", (1000, 100)), ("7:", (7, 7)),
    ("4294967294", (4294967294, 4294967294)), ("0:4294967294", (0, 4294967294)),
])
def test_owner_takes_uid_and_gid_in_range(text: str, ids: tuple[int, int]) -> None:
    assert common.owner(text) == ids


@pytest.mark.parametrize(("text", "message"), [
    ("99999999999", "99999999999 is not a user or group id (ids are 0 to 4294967294)"),
    ("4294967295", "4294967295 is not a user or group id"),  # (uid_t)-1: "unchanged"
    ("0:4294967295", "4294967295 is not a user or group id"),
    ("-1", "-1 is not a user or group id"),
    ("root", "takes UID[:GID], not 'root'"),
    (":5", "takes UID[:GID], not ':5'"),
    ("1:2:3", "takes UID[:GID], not '1:2:3'"),
])
def test_owner_refuses_what_is_not_a_uid_t(text: str, message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError) as caught:
        common.owner(text)
    assert str(caught.value).startswith(message)


def test_seconds_within_bounds_only() -> None:
    parse = common.seconds(0.1, 86400)
    assert parse("0.1") == 0.1
    assert parse("86400") == 86400
    for text in ("0", "0.05", "86401", "nan", "inf", "-inf", "soon", ""):
        with pytest.raises(argparse.ArgumentTypeError, match="between 0.1 and 86400"):
            parse(text)


def test_unmount_says_when_the_daemon_outlives_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The daemon took the request (it stops serving) but has not exited when --timeout
    ends: exit 1, and the line says the unmount is under way, not that it failed."""
    registry = Registry(tmp_path)
    registry.add(PoolEntry("tank", "u", []))
    # a live pid: this process plays the daemon that does not exit
    registry.set_mount(MountEntry("tank", "/mnt/tank", os.getpid(), str(tmp_path / "s"), ""))
    asked: list[tuple[str, dict[str, Any]]] = []

    def request(path: Path, op: str, **fields: Any) -> Any:
        asked.append((op, fields))
        return {"pid": os.getpid()}

    monkeypatch.setattr(mount.control, "request", request)
    code = main.main(["--state-dir", str(tmp_path), "unmount", "tank", "--timeout", "0.2"])
    out, err = capsys.readouterr()
    assert asked == [("unmount", {"force": False})]
    assert (code, out) == (common.FAILED, "")
    assert err == (f"blockspace: error: pool tank is unmounting, but its daemon (pid "
                   f"{os.getpid()}) is still running after 0.2s; `pool list` shows when it "
                   "is gone\n")
