"""How each setup is built from sparse image files, and torn down again.

A builder gets a `Context` (its own scratch directory, the mode, a `Cleanup` stack) and
returns a `Target`: where fio runs (a loop device, or a file for btrfs), what the mkfs trial
uses, and the userspace daemon to watch (pid, log). Every resource is pushed on the stack the
moment it exists, so an error or Ctrl-C at any point unwinds exactly what was built.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_lib import system
from bench_lib.jobs import GiB, Mode
from bench_lib.system import Cleanup, CommandError, Daemon

REPO = Path(__file__).resolve().parents[2]
TOOLS = REPO / "tools"


class Unavailable(Exception):
    """This setup cannot run on this machine (reported, not an error of the harness)."""


@dataclass
class Context:
    name: str
    dir: Path  # scratch directory of this setup (inside the run directory)
    run_dir: Path  # the run's scratch root: everything the sweep may touch lives under it
    mode: Mode
    cleanup: Cleanup
    blockspace: str  # the CLI
    python: str  # the venv's python, for the pass-through server

    def image(self, name: str, size: int) -> str:
        path = self.dir / name
        with open(path, "wb") as f:
            f.truncate(size)  # sparse
        return str(path)

    def attach(self, path: str) -> str:
        dev, dio = system.loop_attach(path)
        self.cleanup.push(f"losetup -d {dev}", lambda: system.loop_detach(dev, str(self.run_dir)))
        if not dio:
            system.log(f"{self.name}: {dev} over {path}: direct I/O did NOT take "
                       "(the loop device runs buffered)")
        return dev


@dataclass
class Target:
    fio_path: str  # loop device (or a file for the btrfs baselines)
    mkfs_path: str  # a loop device, or a file to attach one to for the mkfs trial
    daemon_pid: int | None = None
    daemon_log: str | None = None
    alive: Callable[[], bool] = lambda: True
    notes: dict[str, Any] = field(default_factory=dict)


# ---- baselines ---------------------------------------------------------------------------


def build_raw(ctx: Context) -> Target:
    image = ctx.image("disk.img", ctx.mode.device_size)
    dev = ctx.attach(image)
    return Target(dev, dev, notes={"dio": system.loop_dio(dev)})


def _qsd(ctx: Context, blockdevs: list[str], node: str) -> Target:
    """qemu-storage-daemon exporting `node` over FUSE onto a regular file, loop on that."""
    export = ctx.dir / "export.img"
    export.touch()
    log_file = str(ctx.dir / "qsd.log")
    command = ["qemu-storage-daemon"]
    for blockdev in blockdevs:
        command += ["--blockdev", blockdev]
    command += ["--export", f"type=fuse,id=exp0,node-name={node},mountpoint={export},"
                "writable=on,allow-other=off"]
    daemon = Daemon(command, log_file, ctx.name)
    ctx.cleanup.push(f"stop qemu-storage-daemon {daemon.pid}", lambda: _stop(daemon, export))
    system.wait_mounted(str(export), 30, daemon.process, log_file)
    dev = ctx.attach(str(export))
    return Target(dev, dev, daemon.pid, log_file, daemon.alive,
                  notes={"dio": system.loop_dio(dev), "command": command})


def _stop(daemon: Daemon, mountpoint: Path) -> None:
    daemon.stop()
    if system.is_mounted(str(mountpoint)):
        system.unmount(str(mountpoint))


def _file_node(name: str, path: str) -> list[str]:
    # cache.direct=off: the image goes through the page cache, like Blockspace's disks and the
    # pyfuse3 pass-through (the loop device above is O_DIRECT either way).
    return [f"driver=file,node-name=f{name},filename={path},cache.direct=off",
            f"driver=raw,node-name=r{name},file=f{name}"]


def build_qsd_raw(ctx: Context) -> Target:
    image = ctx.image("disk.img", ctx.mode.device_size)
    return _qsd(ctx, _file_node("0", image), "r0")


def build_qsd_quorum(ctx: Context) -> Target:
    blockdevs: list[str] = []
    for i in range(2):
        blockdevs += _file_node(str(i), ctx.image(f"disk{i}.img", ctx.mode.device_size))
    # vote-threshold 1 + read-pattern fifo: writes go to both children, a read is served by
    # the first one that answers — the semantics of a 2-way mirror (RAID-1), like mirror-2.
    quorum = {"driver": "quorum", "node-name": "q", "vote-threshold": 1,
              "read-pattern": "fifo", "children": ["r0", "r1"]}
    blockdevs.append(json.dumps(quorum))
    return _qsd(ctx, blockdevs, "q")


def _btrfs(ctx: Context, profile: str) -> Target:
    ok, why = system.btrfs_available()
    if not ok:
        raise Unavailable(why)
    devs = [ctx.attach(ctx.image(f"disk{i}.img", 2 * GiB)) for i in range(4)]
    ctx.cleanup.push("btrfs device scan --forget", lambda: system.btrfs_forget(devs))
    system.run(["mkfs.btrfs", "-f", "-q", "-d", profile, "-m", "raid1", *devs], timeout=120)
    mnt = ctx.dir / "mnt"
    mnt.mkdir()
    options = ",".join(f"device={d}" for d in devs)
    system.run(["mount", "-t", "btrfs", "-o", options, devs[0], str(mnt)], timeout=120)
    ctx.cleanup.push(f"umount {mnt}", lambda: system.unmount(str(mnt)))
    data = mnt / "bench.img"
    system.run(["fallocate", "-l", str(ctx.mode.device_size), str(data)])
    return Target(str(data), str(data), notes={"dio": [system.loop_dio(d) for d in devs],
                                               "profile": f"-d {profile} -m raid1"})


def build_btrfs_raid1(ctx: Context) -> Target:
    return _btrfs(ctx, "raid1")


def build_btrfs_raid5(ctx: Context) -> Target:
    return _btrfs(ctx, "raid5")


def _passthrough(ctx: Context, io: str) -> Target:
    image = ctx.image("disk.img", ctx.mode.device_size)
    mnt = ctx.dir / "mnt"
    mnt.mkdir()
    log_file = str(ctx.dir / "passthrough.log")
    command = [ctx.python, str(TOOLS / "passthrough_fuse.py"), image, str(mnt), "--io", io]
    daemon = Daemon(command, log_file, ctx.name)
    ctx.cleanup.push(f"stop pass-through {daemon.pid}", lambda: _stop(daemon, mnt))
    system.wait_mounted(str(mnt), 30, daemon.process, log_file)
    dev = ctx.attach(str(mnt / "disk"))
    return Target(dev, dev, daemon.pid, log_file, daemon.alive,
                  notes={"dio": system.loop_dio(dev)})


def build_pyfuse_blocking(ctx: Context) -> Target:
    return _passthrough(ctx, "blocking")


def build_pyfuse_thread(ctx: Context) -> Target:
    return _passthrough(ctx, "thread")


# ---- Blockspace --------------------------------------------------------------------------


def _blockspace(ctx: Context, disks: int, resiliency: list[str], *, nbd: bool = False
                ) -> Target:
    state = ctx.dir / "state"
    bs = [ctx.blockspace, "--state-dir", str(state)]
    images = [ctx.image(f"disk{i}.img", 2 * GiB) for i in range(disks)]
    system.run([*bs, "pool", "create", "bench", "--slab-size", "64M", *images], timeout=120)
    size = f"{ctx.mode.device_size // (1024 * 1024)}M"
    system.run([*bs, "volume", "create", "bench", "vol", "--size", size, *resiliency],
               timeout=120)
    mnt = ctx.dir / "mnt"
    mnt.mkdir()
    log_file = str(state / "log" / "bench.log")

    def stop() -> None:
        if system.is_mounted(str(mnt)):
            result = system.run([*bs, "unmount", str(mnt)], check=False, timeout=150)
            if result.returncode != 0:
                system.log(f"{ctx.name}: blockspace unmount failed: "
                           f"{(result.stderr or result.stdout).strip()[-300:]}")
        if pid is not None:
            system.stop_pid(pid)
        if system.is_mounted(str(mnt)):
            system.unmount(str(mnt))

    pid: int | None = None
    ctx.cleanup.push(f"unmount pool at {mnt}", stop)
    socket_path = ctx.dir / "nbd.sock"
    extra = [f"--nbd={socket_path}"] if nbd else []
    out = system.run([*bs, "--json", "mount", "bench", str(mnt), *extra], timeout=120).stdout
    try:
        pid = int(json.loads(out)["pid"])
    except (ValueError, KeyError, TypeError):
        raise CommandError(f"blockspace mount printed no pid: {out[:300]!r}") from None
    volume = mnt / "vol"
    if not volume.exists():
        raise CommandError(f"{volume} does not exist after mount" + system.log_tail(log_file))
    if nbd:
        dev, mkfs_path = nbd_uri(socket_path, "vol"), ""
        notes: dict[str, Any] = {"nbd": dev}
    else:
        dev = mkfs_path = ctx.attach(str(volume))
        notes = {"dio": system.loop_dio(dev)}
    status = system.run([*bs, "--json", "pool", "status", "bench"], check=False).stdout
    notes.update({"disks": disks, "volume": ["--size", size, *resiliency]})
    try:
        volumes = json.loads(status).get("volumes")
        if volumes:
            notes["layout"] = volumes[0].get("layout", volumes[0])
    except (ValueError, AttributeError):
        pass

    def alive() -> bool:
        return pid is not None and system.pid_alive(pid)

    return Target(dev, mkfs_path, pid, log_file, alive, notes=notes)


def build_simple(ctx: Context) -> Target:
    return _blockspace(ctx, 4, ["--resiliency", "simple"])


def build_mirror2(ctx: Context) -> Target:
    return _blockspace(ctx, 4, ["--resiliency", "mirror", "--copies", "2"])


def build_mirror3(ctx: Context) -> Target:
    return _blockspace(ctx, 4, ["--resiliency", "mirror", "--copies", "3"])


def build_parity1(ctx: Context) -> Target:
    return _blockspace(ctx, 4, ["--resiliency", "parity", "--parity", "1"])


def build_parity2(ctx: Context) -> Target:
    return _blockspace(ctx, 5, ["--resiliency", "parity", "--parity", "2"])


# ---- NBD (fio's nbd engine on a Unix socket; no mkfs trial: no kernel nbd device here) ----


def nbd_uri(socket_path: Path, export: str) -> str:
    return f"nbd+unix:///{export}?socket={socket_path}"


def _nbd_server(ctx: Context, command: list[str], socket_path: Path, export: str) -> Target:
    log_file = str(ctx.dir / "server.log")
    daemon = Daemon(command, log_file, ctx.name)
    ctx.cleanup.push(f"stop {command[0]} {daemon.pid}", daemon.stop)
    deadline = time.monotonic() + 30
    while not socket_path.exists():
        if not daemon.alive() or time.monotonic() > deadline:
            raise CommandError(f"{ctx.name}: no socket at {socket_path}"
                               + system.log_tail(log_file))
        time.sleep(0.05)
    return Target(nbd_uri(socket_path, export), "", daemon.pid, log_file, daemon.alive,
                  notes={"command": command})


def build_nbd_qemu(ctx: Context) -> Target:
    image = ctx.image("disk.img", ctx.mode.device_size)
    sock = ctx.dir / "nbd.sock"
    # Through the page cache like Blockspace's disks; a thread pool for the I/O.
    return _nbd_server(ctx, ["qemu-nbd", "-f", "raw", "-x", "vol", "-k", str(sock),
                             "--persistent", "--shared=8", "--cache=writeback",
                             "--aio=threads", image], sock, "vol")


def build_nbd_nbdkit(ctx: Context) -> Target:
    image = ctx.image("disk.img", ctx.mode.device_size)
    sock = ctx.dir / "nbd.sock"
    return _nbd_server(ctx, ["nbdkit", "--foreground", "--unix", str(sock), "file",
                             f"file={image}"], sock, "vol")


def build_nbd_python(ctx: Context) -> Target:
    image = ctx.image("disk.img", ctx.mode.device_size)
    sock = ctx.dir / "nbd.sock"
    return _nbd_server(ctx, [ctx.python, str(TOOLS / "passthrough_nbd.py"), image, str(sock)],
                       sock, "vol")


def build_nbd_simple(ctx: Context) -> Target:
    return _blockspace(ctx, 4, ["--resiliency", "simple"], nbd=True)


BUILDERS: dict[str, Callable[[Context], Target]] = {
    "raw": build_raw,
    "qsd-raw": build_qsd_raw,
    "qsd-quorum": build_qsd_quorum,
    "btrfs-raid1": build_btrfs_raid1,
    "btrfs-raid5": build_btrfs_raid5,
    "pyfuse-blocking": build_pyfuse_blocking,
    "pyfuse-thread": build_pyfuse_thread,
    "simple": build_simple,
    "mirror-2": build_mirror2,
    "mirror-3": build_mirror3,
    "parity-1": build_parity1,
    "parity-2": build_parity2,
    "nbd-qemu": build_nbd_qemu,
    "nbd-nbdkit": build_nbd_nbdkit,
    "nbd-python": build_nbd_python,
    "nbd-simple": build_nbd_simple,
}

# Commands each setup needs besides fio/losetup/mkfs.ext4.
NEEDS: dict[str, list[str]] = {
    "qsd-raw": ["qemu-storage-daemon"],
    "qsd-quorum": ["qemu-storage-daemon"],
    "btrfs-raid1": ["mkfs.btrfs", "btrfs"],
    "btrfs-raid5": ["mkfs.btrfs", "btrfs"],
    "pyfuse-blocking": ["fusermount3"],
    "pyfuse-thread": ["fusermount3"],
    **{name: ["fusermount3"] for name in ("simple", "mirror-2", "mirror-3", "parity-1",
                                          "parity-2", "nbd-simple")},
    "nbd-qemu": ["qemu-nbd"],
    "nbd-nbdkit": ["nbdkit"],
}


def default_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def default_blockspace() -> str:
    venv = REPO / ".venv" / "bin" / "blockspace"
    return str(venv) if venv.exists() else "blockspace"


def fuse_available() -> tuple[bool, str]:
    if not os.path.exists("/dev/fuse"):
        return False, "/dev/fuse is missing (modprobe fuse)"
    return True, ""
