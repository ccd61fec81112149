"""`mount.blockspace`: what mount(8) runs for a file system of type `blockspace`, so that an
fstab line `tank /mnt/tank blockspace defaults 0 0` works with `mount -a`, `mount /mnt/tank`
and systemd's fstab generator. mount(8) calls it as

    /sbin/mount.blockspace SPEC DIR [-sfnv] [-N NS] [-o OPTIONS]

SPEC is the pool's name. Options: `ro`/`rw`, `nbd` or `nbd=SOCKET` (also export over NBD),
`owner=UID[:GID]`, `io_timeout=SECONDS`; mount(8)'s and systemd's own (`defaults`, `auto`,
`noauto`, `user`, `nofail`, `_netdev`, `x-*`, `comment=*`, ...) are ignored. It starts the
daemon with `blockspace mount` and returns once the volumes are served. Plain `umount DIR`
unmounts: the daemon flushes, seals and exits as for `blockspace unmount`.

Exit codes are mount(8)'s: 0 mounted, 1 bad invocation or option, 32 the mount failed.
"""

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from blockspace.cli import main as cli
from blockspace.cli.common import owner, seconds

USAGE = 1  # mount(8): incorrect invocation or permissions
MOUNT_FAILURE = 32

# Options for mount(8) itself, systemd or other tools: never meant for the file system.
IGNORED = frozenset({
    "defaults", "auto", "noauto", "user", "nouser", "users", "owner", "group", "nofail",
    "_netdev", "netdev", "exec", "noexec", "suid", "nosuid", "dev", "nodev", "async", "sync",
    "atime", "noatime", "relatime", "norelatime", "strictatime", "nodiratime", "diratime",
    "lazytime", "nolazytime", "loud", "silent", "bg", "fg",
})
IGNORED_PREFIXES = ("x-", "comment=", "X-", "context=", "fscontext=", "defcontext=",
                    "rootcontext=")


class HelperError(Exception):
    pass


@dataclass
class Request:
    read_only: bool = False
    nbd: str | None = None  # "" for the default socket
    owner: str | None = None
    io_timeout: str | None = None
    ignored: list[str] = field(default_factory=list)

    def mount_arguments(self) -> list[str]:
        """The `blockspace mount` options this asks for."""
        flags = ["--read-only"] if self.read_only else []
        if self.nbd is not None:
            flags.append(f"--nbd={self.nbd}" if self.nbd else "--nbd")
        if self.owner is not None:
            flags += ["--owner", self.owner]
        if self.io_timeout is not None:
            flags.append(f"--io-timeout={self.io_timeout}")
        return flags


def parse_options(text: str, sloppy: bool = False) -> Request:
    request = Request()
    for option in filter(None, (part.strip() for part in text.split(","))):
        name, equals, value = option.partition("=")
        if option in ("ro", "rw"):
            request.read_only = option == "ro"
        elif name == "nbd":
            request.nbd = value if equals else ""
        elif name == "owner" and equals:  # owner=UID[:GID]; bare `owner` is mount(8)'s
            try:
                owner(value)
            except argparse.ArgumentTypeError as error:
                raise HelperError(f"owner={value}: {error}") from None
            request.owner = value
        elif name == "io_timeout" and equals:
            try:
                seconds(0.1, 3600)(value)
            except argparse.ArgumentTypeError as error:
                raise HelperError(f"io_timeout={value}: {error}") from None
            request.io_timeout = value
        elif option in IGNORED or option.startswith(IGNORED_PREFIXES):
            request.ignored.append(option)
        elif not sloppy:
            raise HelperError(f"unknown option {option!r} (blockspace takes ro, rw, nbd, "
                              "nbd=SOCKET, owner=UID[:GID], io_timeout=SECONDS)")
    return request


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise HelperError(message)


def _parser() -> _Parser:
    p = _Parser(prog="mount.blockspace", add_help=False)
    p.add_argument("spec")
    p.add_argument("directory")
    p.add_argument("-o", dest="options", action="append", default=[])
    p.add_argument("-s", dest="sloppy", action="store_true")
    p.add_argument("-f", dest="fake", action="store_true")
    p.add_argument("-n", dest="no_mtab", action="store_true")
    p.add_argument("-v", dest="verbose", action="store_true")
    p.add_argument("-N", dest="namespace")
    p.add_argument("-t", dest="type")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else list(argv))
        request = parse_options(",".join(args.options), args.sloppy)
        if args.namespace is not None:
            raise HelperError("-N (mount namespaces) is not supported")
    except HelperError as error:
        print(f"mount.blockspace: {error}", file=sys.stderr)
        return USAGE
    command = ["mount", *request.mount_arguments(), args.spec, args.directory]
    if args.verbose or args.fake:
        print(f"mount.blockspace: blockspace {' '.join(command)}", file=sys.stderr)
    if args.fake:
        return 0
    code = cli.main(command)  # prints its own one-line error
    return 0 if code == 0 else MOUNT_FAILURE
