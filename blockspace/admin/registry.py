"""Which pools this machine knows: pool name -> UUID and member disk paths.

Kept in a small JSON file in the state directory (default /var/lib/blockspace, or
$BLOCKSPACE_STATE_DIR, or --state-dir). The disks themselves are the truth; `pool import`
rebuilds an entry from their labels when this file is lost or the disks moved.
"""

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from blockspace.errors import BlockspaceError, InvalidInput

DEFAULT_STATE_DIR = "/var/lib/blockspace"
STATE_DIR_ENV = "BLOCKSPACE_STATE_DIR"
# Runtime files (control sockets, the live mount records with the daemon's pid, NBD sockets)
# belong in /run: gone at reboot, as the daemons are. A state directory given by hand (tests,
# a second instance) keeps them beside it, in STATE_DIR/run, unless this names a place.
DEFAULT_RUNTIME_DIR = "/run/blockspace"
RUNTIME_DIR_ENV = "BLOCKSPACE_RUNTIME_DIR"


def state_dir(override: str | None = None) -> Path:
    return Path(override or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def runtime_dir(state_override: str | None = None) -> Path:
    """$BLOCKSPACE_RUNTIME_DIR; else STATE_DIR/run when a state directory was named (the
    option or $BLOCKSPACE_STATE_DIR); else /run/blockspace."""
    explicit = os.environ.get(RUNTIME_DIR_ENV)
    if explicit:
        return Path(explicit)
    if state_override or os.environ.get(STATE_DIR_ENV):
        return state_dir(state_override) / "run"
    return Path(DEFAULT_RUNTIME_DIR)


@dataclass
class PoolEntry:
    name: str
    uuid: str
    disks: list[str]


@dataclass
class MountEntry:
    pool: str
    mountpoint: str
    pid: int
    socket: str
    log_file: str


def _write_json_atomically(path: Path, data: object) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Registry:
    def __init__(self, root: Path, run_dir: Path | None = None) -> None:
        self.root = root
        self._pools_file = root / "pools.json"
        self.run_dir = run_dir if run_dir is not None else root / "run"
        self.log_dir = root / "log"

    def ensure(self) -> None:
        for directory in (self.root, self.run_dir, self.log_dir):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def pools(self) -> dict[str, PoolEntry]:
        try:
            raw = json.loads(self._pools_file.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as error:
            raise BlockspaceError(
                f"pool registry {self._pools_file} is unreadable: {error}"
            ) from None
        try:
            return {name: PoolEntry(**entry) for name, entry in raw.items()}
        except TypeError as error:
            raise BlockspaceError(f"pool registry {self._pools_file} is damaged: {error}") from None

    def get(self, name: str) -> PoolEntry:
        entry = self.pools().get(name)
        if entry is None:
            raise InvalidInput(
                f"no pool named {name!r} (see `blockspace pool list`; "
                "`blockspace pool import DISK...` registers a pool from its disks)"
            )
        return entry

    def add(self, entry: PoolEntry) -> None:
        self.ensure()
        pools = self.pools()
        pools[entry.name] = entry
        _write_json_atomically(self._pools_file, {n: asdict(e) for n, e in pools.items()})

    def remove(self, name: str) -> None:
        pools = self.pools()
        if pools.pop(name, None) is not None:
            _write_json_atomically(self._pools_file, {n: asdict(e) for n, e in pools.items()})

    # ---- mounts ---------------------------------------------------------------------

    def socket_path(self, pool: str) -> Path:
        return self.run_dir / f"{pool}.sock"

    def log_path(self, pool: str) -> Path:
        return self.log_dir / f"{pool}.log"

    def _mount_file(self, pool: str) -> Path:
        return self.run_dir / f"{pool}.json"

    def mount_info(self, pool: str) -> MountEntry | None:
        """The live mount of `pool`, or None (a record left by a dead daemon is dropped)."""
        path = self._mount_file(pool)
        try:
            entry = MountEntry(**json.loads(path.read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError):
            path.unlink(missing_ok=True)
            return None
        if not _alive(entry.pid):
            path.unlink(missing_ok=True)
            return None
        return entry

    def set_mount(self, entry: MountEntry) -> None:
        self.ensure()
        _write_json_atomically(self._mount_file(entry.pool), asdict(entry))

    def clear_mount(self, pool: str) -> None:
        self._mount_file(pool).unlink(missing_ok=True)

    # ---- scrub progress: survives daemon restarts, and is the "last scrub" in status --------

    def _scrub_file(self, pool: str) -> Path:
        return self.root / "scrub" / f"{pool}.json"

    def scrub_state(self, pool: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self._scrub_file(pool).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def save_scrub_state(self, pool: str, state: dict[str, Any]) -> None:
        path = self._scrub_file(pool)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_json_atomically(path, state)

    # ---- the disk job (retire, remove, replace, repair, rebalance): resumed at mount -------

    def _job_file(self, pool: str) -> Path:
        return self.root / "jobs" / f"{pool}.json"

    def job_state(self, pool: str) -> dict[str, Any] | None:
        """The disk job that was running on `pool` (None: none, or it finished)."""
        try:
            data = json.loads(self._job_file(pool).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def save_job_state(self, pool: str, state: dict[str, Any]) -> None:
        path = self._job_file(pool)
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        _write_json_atomically(path, state)

    def clear_job_state(self, pool: str) -> None:
        self._job_file(pool).unlink(missing_ok=True)

    def mounts(self) -> list[MountEntry]:
        found = []
        for pool in self.pools():
            info = self.mount_info(pool)
            if info is not None:
                found.append(info)
        return found


def _alive(pid: int) -> bool:
    """Is the daemon still running? A zombie (killed, not yet reaped) counts as dead."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            state = stat.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")
