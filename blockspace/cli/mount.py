"""`blockspace mount POOL DIR` (starts the daemon, blockspace/service/daemon.py, and waits until
it serves) and `blockspace unmount DIR|POOL`."""

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from blockspace.admin.config import load_config
from blockspace.admin.registry import RUNTIME_DIR_ENV
from blockspace.cli.common import OK, NotMounted, Parser, owner, registry_of, seconds, waiting
from blockspace.cli.output import console, emit
from blockspace.errors import BlockspaceError, InvalidInput
from blockspace.service import control, logging_setup
from blockspace.service.metrics_address import parse_metrics_address
from blockspace.service.nbd import default_socket_path, parse_address


def cmd_mount(args: argparse.Namespace) -> int:
    from blockspace.service import daemon

    registry = registry_of(args)
    registry.get(args.pool)
    mount = registry.mount_info(args.pool)
    if mount is not None:
        raise InvalidInput(f"pool {args.pool!r} is already mounted at {mount.mountpoint}")
    mountpoint = os.path.abspath(args.mountpoint)
    if not os.path.isdir(mountpoint):
        raise InvalidInput(f"mount point {args.mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise InvalidInput(f"something is already mounted at {args.mountpoint}")
    if not os.path.exists("/dev/fuse"):
        raise BlockspaceError("/dev/fuse is missing (modprobe fuse)")
    registry.ensure()
    nbd = ""  # --nbd: where the NBD export listens (its default next to the control socket)
    if args.nbd is not None:
        nbd = str(parse_address(args.nbd or str(default_socket_path(registry.run_dir,
                                                                    args.pool))))
    if args.metrics is None:  # the configured default ([metrics] address, "" = off)
        args.metrics = load_config().metrics_address
    if args.metrics:
        parse_metrics_address(args.metrics)  # bad input before anything starts
    log_file = args.log_file or str(registry.log_path(args.pool))
    io_timeout = args.io_timeout if args.io_timeout is not None else load_config().io_timeout
    uid, gid = args.owner
    options = daemon.MountOptions(
        pool=args.pool, mountpoint=mountpoint, uid=uid, gid=gid,
        allow_other=not args.no_allow_other, log_file=log_file,
        allow_fault_injection=args.allow_fault_injection,
        io_timeout=io_timeout, nbd=nbd, read_only=args.read_only,
        force=args.force or bool(getattr(args, "force_lease", False)),
        hooks_dir=args.hooks_dir or "", metrics=args.metrics or "",
    )
    if args.foreground:
        logging_setup.setup_logging(args.log_file, logging.DEBUG if args.verbose else logging.INFO)
        return daemon.run(registry, options, args.ready_fd)
    read_fd, write_fd = os.pipe()
    command = [sys.executable, "-m", "blockspace", "--state-dir", str(registry.root),
               "mount", "--foreground", "--log-file", log_file, "--ready-fd", str(write_fd),
               "--owner", f"{uid}:{gid}", args.pool, mountpoint]
    if args.no_allow_other:
        command.insert(-2, "--no-allow-other")
    if args.allow_fault_injection:
        command.insert(-2, "--allow-fault-injection")
    command.insert(-2, f"--io-timeout={io_timeout}")
    if nbd:
        command.insert(-2, f"--nbd={nbd}")
    if options.force:
        command.insert(-2, "--force")
    if args.read_only:
        command.insert(-2, "--read-only")
    if args.hooks_dir:
        command.insert(-2, f"--hooks-dir={os.path.abspath(args.hooks_dir)}")
    if args.metrics:
        command.insert(-2, f"--metrics={args.metrics}")
    # posix_spawn, not Popen: the daemon outlives this process, and a Popen object left
    # running would warn when it is collected.
    os.set_inheritable(write_fd, True)
    # The daemon finds the runtime directory this process chose; systemd's notify socket
    # is for a daemon systemd started itself (`mount --foreground`, blockspace@.service).
    environ = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
    environ[RUNTIME_DIR_ENV] = str(registry.run_dir)
    pid = os.posix_spawn(
        sys.executable, command, environ, setsid=True,
        file_actions=[
            (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
            (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
            (os.POSIX_SPAWN_OPEN, 2, log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600),
        ],
    )
    os.close(write_fd)
    with os.fdopen(read_fd) as ready:
        answer = ready.readline().strip()
        while answer.startswith("wait: "):  # another host's lease: the daemon watches it
            waiting(answer.removeprefix("wait: "))
            answer = ready.readline().strip()
    if answer != "ok":
        os.waitpid(pid, 0)
        message = answer.removeprefix("error: ") or f"the daemon exited (see {log_file})"
        raise BlockspaceError(f"mount failed: {message}")
    info = {"pool": args.pool, "mountpoint": mountpoint, "pid": pid, "log": log_file}
    if nbd:
        info["nbd"] = nbd
    emit(args, info, lambda i: console.print(
        f"pool {i['pool']} mounted at {i['mountpoint']} (daemon pid {i['pid']}, log {i['log']})"
        + (f"; NBD export at {i['nbd']}" if "nbd" in i else "")))
    return OK


def cmd_unmount(args: argparse.Namespace) -> int:
    registry = registry_of(args)
    target = os.path.abspath(args.target)
    mount = None
    for entry in registry.mounts():
        if entry.pool == args.target or entry.mountpoint == target:
            mount = entry
    if mount is None:
        raise NotMounted(f"{args.target} is not a mounted Blockspace pool or mount point")
    control.request(Path(mount.socket), "unmount", force=args.force)
    # The daemon has stopped serving; it exits once its volumes are flushed and closed.
    deadline = time.monotonic() + args.timeout
    while registry.mount_info(mount.pool) is not None:
        if time.monotonic() > deadline:
            raise BlockspaceError(
                f"pool {mount.pool} is unmounting, but its daemon (pid {mount.pid}) is still "
                f"running after {args.timeout:g}s; `pool list` shows when it is gone"
            )
        time.sleep(0.05)
    emit(args, {"pool": mount.pool, "mountpoint": mount.mountpoint},
         lambda i: console.print(f"pool {i['pool']} unmounted from {i['mountpoint']}"))
    return OK


def add_commands(commands: Any, common: Parser) -> None:
    p = commands.add_parser("mount", parents=[common], help="serve a pool's volumes")
    p.add_argument("pool")
    p.add_argument("mountpoint")
    p.add_argument("--foreground", action="store_true", help="do not detach")
    p.add_argument("--log-file", default="", help="daemon log (default STATE_DIR/log/POOL.log)")
    p.add_argument("--owner", type=owner, default=(0, 0), metavar="UID[:GID]",
                   help="owner of the volume files (mode 0600; default root)")
    p.add_argument("--no-allow-other", action="store_true",
                   help="only the mounting user may access the files (losetup needs root)")
    p.add_argument("--io-timeout", type=seconds(0.1, 3600), metavar="SECONDS",
                   help="fail a disk that does not answer an I/O within this time (default: "
                        "daemon.io_timeout of the config file, else 30)")
    p.add_argument("--allow-fault-injection", action="store_true",
                   help="testing only: let `blockspace fault` make this mount's disks fail")
    p.add_argument("--nbd", nargs="?", const="", metavar="SOCKET",
                   help="also export the volumes over NBD, on a Unix socket (0600; default "
                        "RUNTIME_DIR/POOL.nbd.sock) or tcp:HOST:PORT (no authentication)")
    p.add_argument("--force", action="store_true",
                   help="take the pool's writer lease even if another host holds it: only "
                        "for a host known to be dead (README \"One writer per pool\")")
    p.add_argument("--read-only", action="store_true",
                   help="serve the volume files read-only (attach makes read-only loops)")
    p.add_argument("--hooks-dir", metavar="DIR",
                   help="run the event hooks in DIR (default $BLOCKSPACE_HOOKS_DIR or "
                        "/etc/blockspace/hooks.d)")
    p.add_argument("--metrics", metavar="HOST:PORT",
                   help="serve Prometheus metrics at http://HOST:PORT/metrics (default: the "
                        "config file's [metrics] address; off without one)")
    p.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_mount)
    p = commands.add_parser("unmount", aliases=["umount"], parents=[common],
                            help="stop serving a pool")
    p.add_argument("target", help="mount point or pool name")
    p.add_argument("--force", action="store_true", help="even if a volume is open")
    p.add_argument("--timeout", type=seconds(0.1, 86400), default=120.0, metavar="SECONDS",
                   help="how long to wait for the daemon to exit (default 120)")
    p.set_defaults(func=cmd_unmount)
