"""The command-line contract (issue 17 item 7): every subcommand, given a bad id, a bad value or
a state that forbids it, offline and against a mounted pool, exits with the code README "Exit
codes" documents, prints one line on stderr (no traceback, no "internal error", nothing on
stdout) and changes nothing: the images and registry of the unmounted pool, and the mounted
pool's status, are the same after the command as before.

Real `python -m blockspace` subprocesses. One scratch area (the integration tier's
BlockspaceEnv, cleaned up as the `blockspace_env` fixture does) serves the whole module, since
a pool per case would cost a mount each: pool `off` stays unmounted, pool `on` is mounted with
fault injection allowed, and a spare image belongs to neither.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from blockspace.cli.common import BAD_INPUT, DATA_AT_RISK, FAILED, NOT_MOUNTED, NOTHING_TO_DO
from blockspace.ondisk.label import LABEL_SIZE, LEASE_SIZE, decode_label
from blockspace.service import control
from integration.helpers import BlockspaceEnv, is_mounted, missing_prerequisites

pytestmark = pytest.mark.skipif(missing_prerequisites() is not None,
                                reason=missing_prerequisites() or "")

MiB = 1 << 20
README = Path(__file__).parents[2] / "README.md"
NO_DISK = "has no disk"
NO_POOL = "no pool named 'nope'"
NO_VOLUME = "no volume 'nope'"


# ---- the cases ---------------------------------------------------------------------------------

SAME = -1  # the mounted pool answers as the unmounted one


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]  # {pool} {member} {other} {spare} {dir} {missing} are filled in
    offline: int | None  # the exit code against pool `off`; None: not run offline
    mounted: int | None  # against pool `on`; SAME: as offline; None: not run mounted
    says: str  # a part of the one line
    mounted_says: str | None = None  # when it differs

    def code(self, mode: str) -> int | None:
        if mode == "offline":
            return self.offline
        return self.offline if self.mounted == SAME else self.mounted

    def line(self, mode: str) -> str:
        return self.mounted_says if mode == "mounted" and self.mounted_says else self.says


def case(name: str, args: str, offline: int | None, mounted: int | None = SAME,
         says: str = "", mounted_says: str | None = None) -> Case:
    return Case(name, tuple(args.split()), offline, mounted, says, mounted_says)


IN_USE = "is in use by another process (a mounted pool?): pid "


BAD_IDS = ("1.0", "99", "abc")  # the issue's; "-1" once, for retire

CASES = [
    # usage (the same whatever the pool's state: run once)
    case("no-command", "", BAD_INPUT, None, "required: command"),
    case("group-only", "pool", BAD_INPUT, None, "required: pool_command"),
    case("unknown-command", "frobnicate", BAD_INPUT, None, "invalid choice"),
    case("unknown-option", "pool list --bogus", BAD_INPUT, None, "unrecognized arguments"),
    case("status-two-names", "pool status {pool} extra", BAD_INPUT, None, "unrecognized"),
    # pools
    case("status-unknown-pool", "pool status nope", BAD_INPUT, None, NO_POOL),
    case("create-existing-name", "pool create {pool} {spare}", BAD_INPUT, SAME,
         "already exists"),
    case("create-missing-disk", "pool create new {missing}", BAD_INPUT, SAME,
         "no such file"),
    case("create-member-disk", "pool create new {member}", BAD_INPUT, FAILED,
         "already belongs to pool", IN_USE),
    case("create-directory", "pool create new {dir}", BAD_INPUT, SAME, "directory"),
    case("create-bad-slab", "pool create new {spare} --slab-size 3M", BAD_INPUT, None,
         "power of two"),
    case("create-bad-name", "pool create a/b {spare}", BAD_INPUT, None, "invalid pool name"),
    case("import-blank-disk", "pool import {spare}", BAD_INPUT, SAME, "not a Blockspace disk"),
    case("import-bad-name", "pool import {member} --name a/b", BAD_INPUT, FAILED,
         "invalid pool name", IN_USE),
    case("import-mounted", "pool import {member}", None, FAILED, IN_USE),
    case("export-unknown", "pool export nope", BAD_INPUT, None, NO_POOL),
    case("export-mounted", "pool export {pool}", None, BAD_INPUT, "is mounted"),
    case("repair-unknown-pool", "pool repair nope", BAD_INPUT, None, NO_POOL),
    case("repair-bad-rate", "pool repair {pool} --rate abc", BAD_INPUT, None, "invalid size"),
    case("rebalance-bad-rate", "pool rebalance {pool} --rate -5", BAD_INPUT, None,
         "invalid size"),
    # volumes
    case("volume-exists", "volume create {pool} v --size 64M", BAD_INPUT, SAME,
         "already exists"),
    case("volume-size-zero", "volume create {pool} w --size 0", BAD_INPUT, None,
         "larger than zero"),
    case("volume-size-unit", "volume create {pool} w --size 12Q", BAD_INPUT, None,
         "invalid size"),
    case("volume-size-huge", "volume create {pool} w --size 2000P", BAD_INPUT, None,
         "too large"),
    case("volume-copies-4", "volume create {pool} w --size 64M --copies 4", BAD_INPUT, SAME,
         "--copies 2 or 3"),
    case("volume-bad-name", "volume create {pool} a/b --size 64M", BAD_INPUT, SAME,
         "invalid volume name"),
    case("volume-no-size", "volume create {pool} w", BAD_INPUT, None, "--size"),
    case("volume-fixed-too-big", "volume create {pool} w --size 10G --provisioning fixed",
         FAILED, SAME, "not enough free space"),
    case("volume-list-unknown-pool", "volume list nope", BAD_INPUT, None, NO_POOL),
    case("volume-delete-unknown", "volume delete {pool} nope", BAD_INPUT, SAME, NO_VOLUME),
    case("volume-grow-unknown", "volume grow {pool} nope --size 1G", BAD_INPUT, SAME,
         NO_VOLUME),
    case("volume-grow-smaller", "volume grow {pool} v --size 16M", BAD_INPUT, SAME,
         "larger than the current"),
    case("volume-grow-bad-size", "volume grow {pool} v --size lots", BAD_INPUT, None,
         "invalid size"),
    # disks: bad ids, wrong states, bad values
    *(case(f"{verb}-id-{bad}", f"disk {verb} {{pool}} {bad}", BAD_INPUT, SAME, NO_DISK)
      for verb in ("retire", "remove", "online") for bad in BAD_IDS),
    case("retire-id--1", "disk retire {pool} -1", BAD_INPUT, SAME, NO_DISK),
    *(case(f"replace-id-{bad}", f"disk replace {{pool}} {bad} {{spare}}", BAD_INPUT, SAME,
           NO_DISK) for bad in BAD_IDS),
    case("online-an-online-disk", "disk online {pool} 0", BAD_INPUT, SAME,
         "is online, not failed or missing"),
    case("online-path-for-two", "disk online {pool} 0 1 --path {spare}", BAD_INPUT, SAME,
         "--path needs exactly one disk"),
    case("replace-by-missing", "disk replace {pool} 0 {missing}", BAD_INPUT, SAME,
         "no such file"),
    # {other} is a disk of the other pool: of the mounted one (locked by its daemon) offline
    case("replace-by-member", "disk replace {pool} 0 {other}", FAILED, BAD_INPUT, IN_USE,
         "already belongs to pool 'off'"),
    case("add-missing", "disk add {pool} {missing}", BAD_INPUT, SAME, "no such file"),
    case("add-other-member", "disk add {pool} {other}", FAILED, BAD_INPUT, IN_USE,
         "already belongs to pool 'off'"),
    # the pool's own disk is open (locked) in the process that checks it, offline or mounted
    case("add-own-member", "disk add {pool} {member}", FAILED, SAME, "is in use"),
    case("add-bad-media", "disk add {pool} {spare} --media nvme", BAD_INPUT, None,
         "invalid choice"),
    case("retire-bad-rate", "disk retire {pool} 0 --rate abc", BAD_INPUT, None,
         "invalid size"),
    case("disk-unknown-pool", "disk retire nope 0", BAD_INPUT, None, NO_POOL),
    case("retire-rate-below-floor", "disk retire {pool} 0 --rate 1", BAD_INPUT, None,
         "--rate must be at least 1M"),
    *(case(f"clear-id-{bad}", f"disk clear {{pool}} {bad}", BAD_INPUT, SAME, NO_DISK)
      for bad in BAD_IDS),
    case("rebuild-cancel-nothing", "disk rebuild {pool} --cancel", NOTHING_TO_DO, SAME,
         "no interrupted rebuild", "no rebuild to cancel"),
    case("rebuild-rate-nothing", "disk rebuild {pool} --rate 10M", NOTHING_TO_DO, SAME,
         "no interrupted rebuild", "no rebuild to change the rate of"),
    case("rebuild-rate-below-floor", "disk rebuild {pool} --rate 5K", BAD_INPUT, None,
         "--rate must be at least 1M"),
    case("rebuild-cancel-and-rate", "disk rebuild {pool} --cancel --rate 10M", BAD_INPUT,
         None, "not allowed with argument"),
    # scrub and its controls
    case("scrub-unknown-pool", "scrub nope", BAD_INPUT, None, NO_POOL),
    case("scrub-unknown-volume", "scrub {pool} nope", BAD_INPUT, SAME, NO_VOLUME),
    case("scrub-bad-rate", "scrub {pool} --rate abc", BAD_INPUT, None, "invalid size"),
    case("scrub-two-controls", "scrub {pool} --pause --cancel", BAD_INPUT, None,
         "not allowed with argument"),
    case("scrub-pause-nothing", "scrub {pool} --pause", NOT_MOUNTED, NOTHING_TO_DO,
         "no scrub to pause"),
    case("scrub-resume-nothing", "scrub {pool} --resume", NOT_MOUNTED, NOTHING_TO_DO,
         "no scrub to resume"),
    case("scrub-cancel-nothing", "scrub {pool} --cancel", NOT_MOUNTED, NOTHING_TO_DO,
         "no scrub to cancel"),
    case("scrub-status-offline", "scrub {pool} --status", NOT_MOUNTED, None, "not mounted"),
    # mount and unmount
    *(case(f"mount-owner-{text}", f"mount {{pool}} {{dir}} --owner {text}", BAD_INPUT,
           SAME if text in ("99999999999", "4294967295") else None, "argument --owner")
      for text in ("99999999999", "4294967295", "-1", "0:4294967295", "abc", "1:x")),
    case("mount-io-timeout-0", "mount {pool} {dir} --io-timeout 0", BAD_INPUT, None,
         "argument --io-timeout"),
    case("mount-missing-dir", "mount {pool} {missing}", BAD_INPUT, None, "not a directory"),
    case("mount-unknown-pool", "mount nope {dir}", BAD_INPUT, None, NO_POOL),
    case("mount-mounted", "mount {pool} {dir}", None, BAD_INPUT, "already mounted"),
    case("unmount-timeout-0", "unmount {pool} --timeout 0", BAD_INPUT, SAME,
         "argument --timeout"),
    case("unmount-timeout-nan", "unmount {pool} --timeout nan", BAD_INPUT, None,
         "argument --timeout"),
    case("unmount-not-mounted", "unmount {pool}", NOT_MOUNTED, None, "is not a mounted"),
    case("unmount-a-directory", "unmount {dir}", NOT_MOUNTED, None, "is not a mounted"),
    case("umount-unknown", "umount nope", NOT_MOUNTED, None, "is not a mounted"),
    # attach and detach (loop devices), system install
    case("attach-unknown-pool", "attach nope v", BAD_INPUT, None, NO_POOL),
    case("attach-unknown-volume", "attach {pool} nope", NOT_MOUNTED, BAD_INPUT,
         "is not mounted", "serves no volume 'nope'"),
    case("attach-bad-volume-name", "attach {pool} ..", NOT_MOUNTED, BAD_INPUT,
         "is not mounted", "is not a volume name"),
    case("detach-not-attached", "detach {pool} v", NOTHING_TO_DO, SAME, "is not attached"),
    case("detach-unknown-pool", "detach nope v", BAD_INPUT, None, NO_POOL),
    case("detach-not-a-loop", "detach /dev/null", BAD_INPUT, None,
         "is not an attached loop device"),
    case("detach-not-a-device", "detach {dir}", BAD_INPUT, None, "detach takes POOL VOLUME"),
    case("system-install-missing-root", "system install --root {missing}", BAD_INPUT, None,
         "is not a directory"),
    # faults: the daemon's, so not mounted offline
    case("fault-list-offline", "fault list {pool}", NOT_MOUNTED, None, "not mounted"),
    case("fault-clear-offline", "fault clear {pool}", NOT_MOUNTED, None, "not mounted"),
    case("fault-inject-offline", "fault inject {pool} 0 --dead", NOT_MOUNTED, None,
         "not mounted"),
    *(case(f"fault-inject-id-{bad}", f"fault inject {{pool}} {bad} --dead", None, BAD_INPUT)
      for bad in BAD_IDS),
    case("fault-clear-id-99", "fault clear {pool} 99", None, BAD_INPUT),
    case("fault-bad-percent", "fault inject {pool} 0 --read-error 5", BAD_INPUT, None,
         "takes a percentage"),
    case("fault-no-fault", "fault inject {pool} 0", BAD_INPUT, None, "needs at least one"),
    case("fault-range-past-end", "fault inject {pool} 0 --range 1T:4K", None, BAD_INPUT,
         "past the end"),
    case("fault-unknown-pool", "fault list nope", BAD_INPUT, None, NO_POOL),
    # tiers
    case("tier-status-not-tiered", "tier status {pool} v", BAD_INPUT, SAME, "not tiered"),
    case("tier-status-unknown", "tier status {pool} nope", BAD_INPUT, SAME, "no volume"),
    case("tier-pin-not-tiered", "tier pin {pool} v --tier ssd", BAD_INPUT, SAME,
         "not tiered"),
    case("tier-pin-bad-tier", "tier pin {pool} v --tier nvme", BAD_INPUT, None,
         "invalid choice"),
    case("tier-unpin-unknown", "tier unpin {pool} nope", BAD_INPUT, SAME, "no volume"),
    case("tier-optimize-offline", "tier optimize {pool} v", NOT_MOUNTED, None, "not mounted"),
    case("tier-optimize-not-tiered", "tier optimize {pool} v", None, BAD_INPUT, "not tiered"),
    case("tier-optimize-bad-rate", "tier optimize {pool} v --rate 0", BAD_INPUT, None,
         "larger than zero"),
]

RUNS = [pytest.param(c, mode, id=f"{mode}-{c.name}")
        for mode in ("offline", "mounted") for c in CASES if c.code(mode) is not None]


# ---- the world the cases run in -----------------------------------------------------------------


@dataclass
class World:
    env: BlockspaceEnv
    images: dict[str, Path]  # off0..2, on0..2, spare
    mountpoint: Path
    socket: Path
    empty_dir: Path

    def fill(self, args: tuple[str, ...], mode: str) -> list[str]:
        pool = "off" if mode == "offline" else "on"
        other = "on" if mode == "offline" else "off"
        values = {
            "pool": pool, "member": str(self.images[f"{pool}0"]),
            "other": str(self.images[f"{other}0"]), "spare": str(self.images["spare"]),
            "dir": str(self.empty_dir), "missing": str(self.env.root / "no-such-thing"),
        }
        return [arg.format(**values) for arg in args]

    def snapshot(self) -> dict[str, Any]:
        """What no bad command may change: every image's bytes, the registry files, the
        mounted pool's status."""
        state = self.env.state_dir
        files = {str(p.relative_to(state)): hashlib.sha256(p.read_bytes()).hexdigest()
                 for p in sorted(state.rglob("*.json")) if p.parent.name != "run"}
        status = dict(control.request(self.socket, "status"))
        status.pop("lease")  # its heartbeat counter moves every few seconds
        return {
            # The mounted pool's lease is beaten while it runs: not a change by a command.
            "images": {name: fingerprint(path, beating=name.startswith("on"))
                       for name, path in self.images.items()},
            "registry": files,
            "mounted status": status,
            "mounted": is_mounted(self.mountpoint),
        }


def fingerprint(path: Path, *, beating: bool = False) -> tuple[int, int, str]:
    """Size, mtime and a hash of the data segments (holes skipped: the images are sparse).
    `beating`: a member of a mounted pool, whose daemon rewrites its lease block every
    few seconds: that block is left out of the hash, and the mtime out of the result."""
    st = path.stat()
    digest = hashlib.blake2b()
    fd = os.open(path, os.O_RDONLY)
    lease: tuple[int, int] | None = None
    if beating:
        label = decode_label(os.pread(fd, LABEL_SIZE, 0))
        assert label is not None, path
        lease = (label.geometry.lease_offset, label.geometry.lease_offset + LEASE_SIZE)
    try:
        offset = 0
        while offset < st.st_size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as error:
                if error.errno == errno.ENXIO:
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            digest.update(f"{start}:{end};".encode())
            data = bytearray(os.pread(fd, end - start, start))
            if lease is not None and start < lease[1] and lease[0] < end:
                lo, hi = max(lease[0], start) - start, min(lease[1], end) - start
                data[lo:hi] = bytes(hi - lo)
            digest.update(data)
            offset = end
    finally:
        os.close(fd)
    return st.st_size, 0 if beating else st.st_mtime_ns, digest.hexdigest()


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    env = BlockspaceEnv.create()
    try:
        paths = env.make_images([256 * MiB] * 7)
        images = {f"off{i}": paths[i] for i in range(3)}
        images |= {f"on{i}": paths[3 + i] for i in range(3)}
        images["spare"] = paths[6]
        for pool in ("off", "on"):
            env.create_pool(pool, [images[f"{pool}{i}"] for i in range(3)], slab_size="16M")
            env.create_volume(pool, "v", "64M", "mirror")
        mountpoint, _ = env.mount_pool("on", "--allow-fault-injection")
        socket_path = Path(json.loads((env.state_dir / "run" / "on.json").read_text())["socket"])
        empty_dir = env.root / "empty-dir"
        empty_dir.mkdir()
        yield World(env, images, mountpoint, socket_path, empty_dir)
    finally:
        problems = env.cleanup()
    if problems:
        pytest.fail("teardown could not clean up cleanly: " + "; ".join(problems))


# ---- the contract -------------------------------------------------------------------------------


@pytest.mark.parametrize(("bad", "mode"), RUNS)
def test_bad_input_is_one_line_the_documented_code_and_changes_nothing(
    world: World, bad: Case, mode: str
) -> None:
    before = world.snapshot()
    result = world.env.cli(*world.fill(bad.args, mode), check=False)
    assert "Traceback" not in result.stderr, result.stderr
    assert "internal error" not in result.stderr, result.stderr
    assert result.returncode == bad.code(mode), (result.returncode, result.stderr)
    if "--json" in result.args:  # the line and the code as an object on stdout as well
        assert json.loads(result.stdout) == {"error": result.stderr.rstrip("\n"),
                                             "exit_code": result.returncode, "json_version": 1}
    else:
        assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert re.match(r"^blockspace( [a-z]+)*: error: ", lines[0]), lines[0]
    assert bad.line(mode) in lines[0], lines[0]
    assert world.snapshot() == before


def documented_exit_codes() -> dict[int, str]:
    """The README's "Exit codes" table: code -> meaning."""
    text = README.read_text()
    section = text.split("\n## Exit codes\n", 1)[1].split("\n## ", 1)[0]
    return {int(m.group(1)): m.group(2).strip()
            for m in re.finditer(r"^\| (\d+) \| ([^|]+)\|", section, re.MULTILINE)}


def test_every_code_the_cases_expect_is_documented() -> None:
    codes = documented_exit_codes()
    expected = {c.code(mode) for c in CASES for mode in ("offline", "mounted")} - {None}
    assert expected <= set(codes), expected - set(codes)
    assert {0, FAILED, BAD_INPUT, DATA_AT_RISK, NOT_MOUNTED, NOTHING_TO_DO} <= set(codes)
    assert "not mounted" in codes[NOT_MOUNTED]
