"""What every command group shares: the argument parser class, the exit codes and the errors
that carry them, finding a pool's registry and its daemon, and the parsers of option values.

Exit codes (README "Exit codes"); every command follows them:

    0   done
    1   the operation failed (a disk, the daemon, a rebuild with failed moves, a timeout)
    2   bad input, or a state that forbids the operation; nothing was changed
    3   data at risk: `pool status` of a failed pool, a scrub that found unrecoverable data
    4   not mounted: the command needs the pool's daemon (or there is nothing to unmount)
    5   nothing to act on: a scrub control with no scrub in the state it acts on
    70  internal error: a bug (one line; -v prints the traceback)
"""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from blockspace.admin.registry import Registry, runtime_dir, state_dir
from blockspace.errors import BlockspaceError, InvalidInput
from blockspace.ondisk.metadata import MAX_VOLUME_SIZE
from blockspace.pool.lease import LeaseOptions
from blockspace.units import format_size, parse_size

OK = 0
FAILED = 1
BAD_INPUT = 2
DATA_AT_RISK = 3
NOT_MOUNTED = 4
NOTHING_TO_DO = 5
INTERNAL_ERROR = 70

# uid_t and gid_t are 32 bits, and (uid_t)-1 means "leave unchanged" to chown: a file system
# that reports it as an owner shows the file as owned by the overflow id (65534).
MAX_OWNER_ID = 2**32 - 2


class UsageError(InvalidInput):
    """argparse's complaint, printed as it is ("blockspace pool create: error: ...")."""


class NotMounted(BlockspaceError):
    """The command needs the pool's daemon and the pool is not mounted."""

    exit_code = NOT_MOUNTED


class NothingToDo(BlockspaceError):
    """Nothing is in the state the command acts on (no scrub running to pause)."""

    exit_code = NOTHING_TO_DO


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is a one-line InvalidInput like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: error: {message}")


# ---- the pool's registry and daemon ------------------------------------------------------------


def registry_of(args: argparse.Namespace) -> Registry:
    return Registry(state_dir(args.state_dir), runtime_dir(args.state_dir))


def mounted_socket(registry: Registry, pool: str) -> Path | None:
    """The control socket of `pool`'s daemon, or None when the pool is not mounted."""
    info = registry.mount_info(pool)
    return Path(info.socket) if info is not None else None


def waiting(message: str) -> None:
    """A command waiting for another host's lease says so (stderr: not part of the output)."""
    print(f"blockspace: {message}", file=sys.stderr, flush=True)


def lease_options(args: argparse.Namespace) -> LeaseOptions:
    """How an offline command that writes takes the writer lease (`--force-lease`)."""
    return LeaseOptions(force=bool(getattr(args, "force_lease", False)), notify=waiting)


def pool_socket(args: argparse.Namespace) -> tuple[Registry, Path | None]:
    """The registry and the daemon's socket (None: not mounted) of the registered pool
    `args.pool`; an unknown pool is bad input."""
    registry = registry_of(args)
    registry.get(args.pool)
    return registry, mounted_socket(registry, args.pool)


def daemon_socket(args: argparse.Namespace, why: str) -> Path:
    """The daemon's socket of `args.pool`, which must be mounted; `why` says what needs it."""
    _, socket_path = pool_socket(args)
    if socket_path is None:
        raise NotMounted(f"pool {args.pool!r} is not mounted: {why}")
    return socket_path


# ---- option values (each raises InvalidInput or ArgumentTypeError with one line) ------------


def volume_size(text: str, what: str) -> int:
    size = parse_size(text)
    if size <= 0:
        raise InvalidInput(f"{what} must be larger than zero")
    if size > MAX_VOLUME_SIZE:
        raise InvalidInput(
            f"{what} {text} is too large: a volume holds at most {format_size(MAX_VOLUME_SIZE)}"
        )
    return size


def rate(text: str | None, default: int = 0) -> int:
    """A --rate bandwidth limit in bytes per second, 0 meaning unlimited; without the option,
    `default` (the configuration file's)."""
    return parse_size(text) if text is not None else default


def owner(text: str) -> tuple[int, int]:
    """--owner UID[:GID], both ids in 0..2**32-2."""
    uid_text, _, gid_text = text.partition(":")
    try:
        uid, gid = int(uid_text), int(gid_text or uid_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes UID[:GID], not {text!r}") from None
    for value in (uid, gid):
        if not 0 <= value <= MAX_OWNER_ID:
            raise argparse.ArgumentTypeError(
                f"{value} is not a user or group id (ids are 0 to {MAX_OWNER_ID})"
            )
    return uid, gid


def seconds(low: float, high: float) -> Callable[[str], float]:
    """An argparse type: a number of seconds in [low, high]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = -1.0
        if not low <= value <= high:  # also refuses nan
            raise argparse.ArgumentTypeError(
                f"takes seconds between {low:g} and {high:g}, not {text!r}"
            )
        return value

    return parse
