"""systemd, fstab and block devices with a real daemon (issue 18 items 1-3): the daemon as
blockspace@.service starts it (foreground, NOTIFY_SOCKET and JOURNAL_STREAM set) notifies
READY/STATUS/STOPPING and stops cleanly on SIGTERM; the installed units pass
systemd-analyze verify; `attach`/`detach` with mkfs and a mount on the stable name; the
mount(8) helper run as mount(8) runs it, and by a real `mount` from an fstab."""

import errno
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import (
    BlockspaceEnv,
    MiB,
    have_tool,
    is_mounted,
    loop_backing_file,
    missing_prerequisites,
    mounts,
    run,
    tool,
    wait_exited,
    wait_until,
)

MISSING = missing_prerequisites()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(MISSING is not None, reason=MISSING or ""),
]


def make_pool(env: BlockspaceEnv, name: str = "tank") -> None:
    env.create_pool(name, env.make_images([512 * MiB] * 3), slab_size="32M")
    env.create_volume(name, "vol0", "256M", "mirror", "--copies", "2")


def messages(server: socket.socket, until: str, timeout: float = 60.0) -> list[str]:
    """Datagrams received until one holds the line `until`."""
    server.settimeout(timeout)
    got = []
    while True:
        got.append(server.recv(65536).decode())
        if until in got[-1].splitlines():
            return got


def test_the_daemon_as_systemd_runs_it_notifies_and_stops_cleanly_on_sigterm(
    blockspace_env: BlockspaceEnv,
) -> None:
    env = blockspace_env
    make_pool(env)
    mountpoint = env.root / "pool-tank"
    mountpoint.mkdir()
    runtime = env.root / "rt"
    journal = env.root / "journal.txt"
    env.fuse_mounts.append(mountpoint)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server, \
            open(journal, "w") as stderr:
        server.bind(str(env.root / "notify"))
        st = os.fstat(stderr.fileno())
        child_env = dict(os.environ, NOTIFY_SOCKET=str(env.root / "notify"),
                         JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}",
                         BLOCKSPACE_RUNTIME_DIR=str(runtime))
        daemon = subprocess.Popen(
            [sys.executable, "-m", "blockspace", "--state-dir", str(env.state_dir), "mount",
             "--foreground", "tank", str(mountpoint)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, env=child_env)
        env.daemons.append(daemon.pid)
        try:
            ready = messages(server, "READY=1")[-1].splitlines()
            assert "STATUS=online, 3 disks" in ready
            # READY means served: the mount is up and the control socket answers, in /run's
            # stand-in; the CLI finds it there.
            assert mounts().get(str(mountpoint)) == "fuse.blockspace"
            assert (runtime / "tank.sock").exists()
            status = json.loads(run([sys.executable, "-m", "blockspace", "--state-dir",
                                     str(env.state_dir), "--json", "pool", "status", "tank"],
                                    env=child_env).stdout)
            assert status["health"] == "online"
            assert status["mountpoint"] == str(mountpoint)
            with open(mountpoint / "vol0", "r+b") as volume:  # work for the clean stop
                volume.write(os.urandom(MiB))
                volume.flush()
                os.fsync(volume.fileno())
            daemon.send_signal(signal.SIGTERM)
            assert "STOPPING=1" in messages(server, "STOPPING=1")[-1].splitlines()
            daemon.send_signal(signal.SIGTERM)  # a second one, during the clean stop
            assert daemon.wait(60) == 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait(30)
    assert not is_mounted(mountpoint)
    env.fuse_mounts.remove(mountpoint)
    assert not (runtime / "tank.json").exists()
    lines = journal.read_text().splitlines()
    assert lines, "the daemon logged nothing"
    assert all(re.match(r"<[0-7]>blockspace\.", line) for line in lines), lines
    assert any(line.startswith("<6>blockspace.service.daemon: pool tank mounted at")
               for line in lines), lines
    assert not (env.state_dir / "log" / "tank.log").exists()  # the journal, not the file
    # The next mount finds a clean stop: nothing left to resync.
    mountpoint, pid = env.mount_pool("tank")
    assert "not stopped cleanly" not in env.daemon_log("tank", lines=1000)
    env.unmount_pool(mountpoint, pid)


def test_the_status_line_follows_a_disk_failure(blockspace_env: BlockspaceEnv) -> None:
    """STATUS= is kept up to date while serving, not only at READY: a dead disk shows."""
    env = blockspace_env
    make_pool(env)
    mountpoint = env.root / "pool-tank"
    mountpoint.mkdir()
    env.fuse_mounts.append(mountpoint)
    runtime = env.root / "rt"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(str(env.root / "notify"))
        child_env = dict(os.environ, NOTIFY_SOCKET=str(env.root / "notify"),
                         BLOCKSPACE_RUNTIME_DIR=str(runtime))
        cli = [sys.executable, "-m", "blockspace", "--state-dir", str(env.state_dir)]
        daemon = subprocess.Popen(
            [*cli, "mount", "--foreground", "--allow-fault-injection", "--log-file",
             str(env.root / "daemon.log"), "tank", str(mountpoint)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=child_env)
        env.daemons.append(daemon.pid)
        try:
            assert "STATUS=online, 3 disks" in messages(server, "READY=1")[-1].splitlines()
            run([*cli, "fault", "inject", "tank", "0", "--dead"], env=child_env)
            server.settimeout(60)
            while True:  # the watchdog's label probes fail the idle disk within seconds
                status = [line for line in server.recv(65536).decode().splitlines()
                          if line.startswith("STATUS=")]
                if status and status[0].startswith("STATUS=degraded: "):
                    break
            assert "1 of 3 disks failed" in status[0], status
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(60) == 0
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait(30)
    env.fuse_mounts.remove(mountpoint)


@pytest.mark.skipif(not have_tool("systemd-analyze"), reason="systemd-analyze is not installed")
def test_the_installed_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    run([sys.executable, "-m", "blockspace", "system", "install", "--root", str(tmp_path)])
    units = tmp_path / "etc/systemd/system"
    instances = []
    for template in sorted(units.iterdir()):  # verify wants instances of templates
        instance = tmp_path / template.name.replace("@.", "@tank.")
        shutil.copy(template, instance)
        instances.append(str(instance))
    result = run([tool("systemd-analyze"), "verify", *instances], check=False)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_attach_mkfs_mount_detach(blockspace_env: BlockspaceEnv) -> None:
    env = blockspace_env
    pool = f"att{os.getpid()}"  # /dev/blockspace is shared: a name no other run uses
    make_pool(env, pool)
    mountpoint, pid = env.mount_pool(pool)
    link = Path("/dev/blockspace") / pool / "vol0"
    try:
        info = env.cli_json("attach", pool, "vol0")
        device = info["device"]
        env.volume_loops.append(device)
        assert info["new"] is True
        assert info["link"] == str(link)
        assert loop_backing_file(device) == str(mountpoint / "vol0")
        assert os.path.realpath(link) == device
        with open(f"/sys/block/{os.path.basename(device)}/loop/dio") as dio:
            assert dio.read().strip() == "1"  # --direct-io=on
        again = env.cli_json("attach", pool, "vol0")  # no second loop on one file
        assert again["device"] == device
        assert again["new"] is False
        env.mkfs("ext4", str(link))
        data = env.mount_fs(str(link), "data", "ext4")
        (data / "hello").write_bytes(b"hello" * 1000)
        refused = env.cli("detach", pool, "vol0", check=False)
        assert refused.returncode == 2, refused
        assert "in use" in refused.stderr
        assert loop_backing_file(device) is not None  # still attached
        env.umount_fs(data)
        detached = env.cli_json("detach", str(link))
        assert detached["devices"] == [device]
        assert loop_backing_file(device) is None
        assert not link.is_symlink()
        env.volume_loops.remove(device)
        assert not link.parent.exists()
        # By the device's own name, and the file system is still there.
        device = env.cli_json("attach", pool, "vol0")["device"]
        env.volume_loops.append(device)
        assert run([tool("blkid"), "-o", "value", "-s", "TYPE", device]).stdout.strip() \
            == "ext4"
        assert env.cli_json("detach", device)["pool"] == pool
        env.volume_loops.remove(device)
        nothing = env.cli("detach", pool, "vol0", check=False)
        assert nothing.returncode == 5, nothing
        # Bad input, each one line and a code.
        assert env.cli("attach", pool, "nosuch", check=False).returncode == 2
        assert env.cli("attach", "nosuchpool", "vol0", check=False).returncode == 2
        assert env.cli("detach", "/dev/null", check=False).returncode == 2
        env.unmount_pool(mountpoint, pid)
        unmounted = env.cli("attach", pool, "vol0", check=False)
        assert unmounted.returncode == 4
        assert unmounted.stderr.count("\n") == 1
    finally:
        if link.is_symlink():
            link.unlink()
        for directory in (link.parent, link.parent.parent):
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()


def daemon_of(env: BlockspaceEnv, pool: str) -> int:
    record = json.loads((env.state_dir / "run" / f"{pool}.json").read_text())
    return int(record["pid"])


def test_the_mount_helper_as_mount_8_runs_it_and_umount(blockspace_env: BlockspaceEnv) -> None:
    env = blockspace_env
    make_pool(env)
    sysroot = env.root / "sysroot"
    sysroot.mkdir()
    run([sys.executable, "-m", "blockspace", "system", "install", "--root", str(sysroot)])
    helper = sysroot / "sbin" / "mount.blockspace"
    mountpoint = env.root / "mnt-tank"
    mountpoint.mkdir()
    helper_env = dict(os.environ, BLOCKSPACE_STATE_DIR=str(env.state_dir))
    # An option the helper does not know: mount(8)'s exit code 1, nothing mounted.
    bad = run([str(helper), "tank", str(mountpoint), "-o", "rw,frobnicate"], check=False,
              env=helper_env)
    assert bad.returncode == 1, bad
    assert not is_mounted(mountpoint)
    env.fuse_mounts.append(mountpoint)
    # What mount(8) passes for `tank DIR blockspace defaults,nofail,_netdev,owner=1234 0 0`.
    run([str(helper), "tank", str(mountpoint), "-o", "rw,owner=1234,nofail,_netdev"],
        env=helper_env)
    pid = daemon_of(env, "tank")
    env.daemons.append(pid)
    assert mounts().get(str(mountpoint)) == "fuse.blockspace"
    assert os.stat(mountpoint / "vol0").st_uid == 1234
    # A second mount of the same pool fails as a mount: 32.
    other = env.root / "mnt-other"
    other.mkdir()
    assert run([str(helper), "tank", str(other), "-o", "rw"], check=False,
               env=helper_env).returncode == 32
    run([tool("umount"), str(mountpoint)])
    assert wait_exited(pid, 60)
    env.fuse_mounts.remove(mountpoint)
    assert "pool tank unmounted" in env.daemon_log("tank")
    assert not (env.state_dir / "run" / "tank.json").exists()
    # -o ro: the volume files are served read-only, and attach makes a read-only loop.
    env.fuse_mounts.append(mountpoint)
    run([str(helper), "tank", str(mountpoint), "-o", "ro"], env=helper_env)
    pid = daemon_of(env, "tank")
    env.daemons.append(pid)
    with pytest.raises(OSError) as refused:
        os.open(mountpoint / "vol0", os.O_WRONLY)
    assert refused.value.errno == errno.EROFS
    attached = env.cli_json("attach", "tank", "vol0")
    env.volume_loops.append(attached["device"])
    assert attached["read_only"] is True
    with open(f"/sys/block/{os.path.basename(attached['device'])}/ro") as flag:
        assert flag.read().strip() == "1"
    env.cli("detach", "tank", "vol0")
    env.volume_loops.remove(attached["device"])
    run([tool("umount"), str(mountpoint)])
    assert wait_exited(pid, 60)
    env.fuse_mounts.remove(mountpoint)


SBIN_HELPER = Path("/sbin/mount.blockspace")


@pytest.mark.skipif(SBIN_HELPER.exists(), reason="/sbin/mount.blockspace is installed "
                    "already: not replaced by a test")
def test_fstab_entry_with_real_mount_and_umount(blockspace_env: BlockspaceEnv) -> None:
    env = blockspace_env
    make_pool(env)
    sysroot = env.root / "sysroot"
    sysroot.mkdir()
    run([sys.executable, "-m", "blockspace", "system", "install", "--root", str(sysroot)])
    mountpoint = env.root / "mnt-tank"
    mountpoint.mkdir()
    fstab = env.root / "fstab"
    fstab.write_text(f"tank {mountpoint} blockspace defaults,nofail,x-systemd.requires=a 0 0\n")
    helper_env = dict(os.environ, BLOCKSPACE_STATE_DIR=str(env.state_dir))
    shutil.copy(sysroot / "sbin" / "mount.blockspace", SBIN_HELPER)
    try:
        env.fuse_mounts.append(mountpoint)
        run([tool("mount"), "--fstab", str(fstab), str(mountpoint)], env=helper_env)
        pid = daemon_of(env, "tank")
        env.daemons.append(pid)
        assert mounts().get(str(mountpoint)) == "fuse.blockspace"
        assert (mountpoint / "vol0").stat().st_size == 256 * MiB
        run([tool("umount"), str(mountpoint)])
        assert wait_exited(pid, 60)
        env.fuse_mounts.remove(mountpoint)
        # mount -a mounts what is not mounted yet, and only that.
        env.fuse_mounts.append(mountpoint)
        run([tool("mount"), "--fstab", str(fstab), "-a", "-t", "blockspace"], env=helper_env)
        assert wait_until(lambda: is_mounted(mountpoint), 10)
        pid = daemon_of(env, "tank")
        env.daemons.append(pid)
        run([tool("umount"), str(mountpoint)])
        assert wait_exited(pid, 60)
        env.fuse_mounts.remove(mountpoint)
    finally:
        SBIN_HELPER.unlink(missing_ok=True)
