"""`pool history`: every command that changed a pool, with time, user and arguments, as
`zpool history`. The CLI appends one JSON line to STATE_DIR/history/POOL.jsonl when such a
command succeeds (through the daemon or offline alike); bounded and rotated like the event
log."""

import os
import pwd
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from blockspace.events.log import EventLog

# (command, subcommand) pairs that change a pool. `scrub` changes it unless it only asks for
# the status; `mount --foreground` is the daemon, not a command; `unmount` is left to the
# event log (its target may be a mount point, and the pool's name is gone from the
# registry's mounts once it succeeded).
CHANGING = {
    ("pool", "create"), ("pool", "import"), ("pool", "export"), ("pool", "repair"),
    ("pool", "rebalance"),
    ("volume", "create"), ("volume", "delete"), ("volume", "grow"),
    ("disk", "add"), ("disk", "retire"), ("disk", "remove"), ("disk", "replace"),
    ("disk", "online"),
    ("scrub", None), ("tier", "pin"), ("tier", "unpin"), ("tier", "optimize"),
    ("mount", None),
}


def history_path(state_root: Path, pool: str) -> Path:
    return state_root / "history" / f"{pool}.jsonl"


def history_log(state_root: Path, pool: str) -> EventLog:
    return EventLog(history_path(state_root, pool))


def changed_pool(command: str, subcommand: str | None, fields: Mapping[str, Any]) -> str | None:
    """The pool a successful command of this kind changed (None: it changed none, or which
    one is not known from its arguments: `pool import` without --name)."""
    if (command, subcommand) not in CHANGING:
        return None
    if command == "scrub" and fields.get("action") == "status":
        return None
    if command == "mount" and fields.get("foreground"):
        # The daemon itself (spawned by `mount`, or run by systemd) returns at unmount: the
        # command that mounted is recorded by the `mount` that started it, and every mount
        # is in the event log.
        return None
    pool = fields.get("pool")
    if pool is None and command == "pool":
        pool = fields.get("name")
    return pool if isinstance(pool, str) else None


def user_name() -> str:
    """Who ran the command: the user behind sudo when there is one."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    sudo = os.environ.get("SUDO_USER")
    return f"{sudo} (as {name})" if sudo and sudo != name else name


def entry(argv: Sequence[str], *, now: float | None = None) -> dict[str, Any]:
    return {
        "class": "command",  # so the event log's reader takes the line
        "time": time.time() if now is None else now,
        "user": user_name(),
        "uid": os.getuid(),
        "host": socket.gethostname(),
        "argv": list(argv),
        "command": " ".join(argv),
    }


def record(state_root: Path, pool: str, argv: Sequence[str]) -> None:
    history_log(state_root, pool).append(entry(argv))


def command_words(argv: Sequence[str]) -> list[str]:
    """argv without the options every command shares (--json, --state-dir DIR, -v): what
    the history shows, and what repeating the command needs."""
    words = []
    skip = False
    for word in argv:
        if skip:
            skip = False
            continue
        if word in ("--json", "-v", "--verbose"):
            continue
        if word == "--state-dir":
            skip = True
            continue
        if word.startswith("--state-dir="):
            continue
        words.append(word)
    return words
