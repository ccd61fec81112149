"""Hooks, as ZED's zedlets: executables in a directory (default /etc/blockspace/hooks.d,
or $BLOCKSPACE_HOOKS_DIR, or `mount --hooks-dir`), `all-*` run for every event and
`<class>-*` for one class, the event in BLOCKSPACE_EVENT_* environment variables.

Only files that a stranger cannot have planted run: owned by root or the daemon's user and
writable by nobody else (the daemon is root). Each run has a timeout; its output is logged."""

import logging
import math
import os
import stat
from pathlib import Path

import trio

from blockspace.events.record import Event

log = logging.getLogger(__name__)

DEFAULT_HOOKS_DIR = "/etc/blockspace/hooks.d"
HOOKS_DIR_ENV = "BLOCKSPACE_HOOKS_DIR"
HOOK_TIMEOUT = 30.0
MAX_OUTPUT = 4096  # bytes of a hook's output kept for the log


def hooks_dir(override: str | None = None) -> Path:
    return Path(override or os.environ.get(HOOKS_DIR_ENV) or DEFAULT_HOOKS_DIR)


def hook_matches(name: str, event_class: str) -> bool:
    return name.startswith("all-") or name.startswith(f"{event_class}-")


def trusted(path: Path) -> str | None:
    """Why `path` must not run (None: it may)."""
    try:
        info = path.stat()
    except OSError as error:
        return error.strerror or str(error)
    if not stat.S_ISREG(info.st_mode):
        return "not a regular file"
    if not info.st_mode & stat.S_IXUSR:
        return "not executable"
    if info.st_uid not in (0, os.geteuid()):
        return f"owned by uid {info.st_uid}, not root"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return "writable by group or others"
    return None


def hooks_for(directory: Path, event_class: str) -> list[Path]:
    """The hooks of `event_class` in `directory`, in name order; a missing directory has none."""
    try:
        names = sorted(entry.name for entry in os.scandir(directory))
    except FileNotFoundError:
        return []
    except OSError as error:
        log.error("hooks directory %s: %s", directory, error.strerror or error)
        return []
    return [directory / name for name in names
            if not name.startswith(".") and hook_matches(name, event_class)]


def hook_env(event: Event) -> dict[str, str]:
    """The event as environment variables: BLOCKSPACE_EVENT_<FIELD> for every field
    (BLOCKSPACE_EVENT_CLASS, ..._POOL, ..._TIME, ..._DISK ...), plus ..._TIME_ISO."""
    env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
    for key, value in event.items():
        if value is None:
            continue
        name = "BLOCKSPACE_EVENT_" + "".join(c if c.isalnum() else "_" for c in key).upper()
        env[name] = str(value).lower() if isinstance(value, bool) else str(value)
    when = event.get("time")
    if isinstance(when, int | float) and math.isfinite(when):
        from datetime import UTC, datetime

        env["BLOCKSPACE_EVENT_TIME_ISO"] = datetime.fromtimestamp(when, UTC).isoformat()
    return env


async def run_hook(path: Path, event: Event, limit: float = HOOK_TIMEOUT) -> int | None:
    """Run one hook for `event`; its exit status (None: killed at the timeout)."""
    why = trusted(path)
    if why is not None:
        log.warning("hook %s skipped: %s", path, why)
        return None
    result = None
    with trio.move_on_after(limit):
        result = await trio.run_process(
            [str(path)], env=hook_env(event), stdin=b"", capture_stdout=True,
            capture_stderr=True, check=False, cwd="/",
        )
    if result is None:
        log.error("hook %s (%s) killed after %gs", path.name, event["class"], limit)
        return None
    output = (result.stdout + result.stderr)[:MAX_OUTPUT].decode(errors="replace").strip()
    level = logging.INFO if result.returncode == 0 else logging.ERROR
    log.log(level, "hook %s (%s) exited %d%s", path.name, event["class"], result.returncode,
            f": {output}" if output else "")
    return result.returncode


async def run_hooks(directory: Path, event: Event, limit: float = HOOK_TIMEOUT) -> None:
    """Every hook of the event's class, concurrently; a hook that fails is logged."""
    hooks = hooks_for(directory, str(event["class"]))
    if not hooks:
        return
    async with trio.open_nursery() as nursery:
        for path in hooks:
            nursery.start_soon(_run_logged, path, event, limit)


async def _run_logged(path: Path, event: Event, limit: float) -> None:
    try:
        await run_hook(path, event, limit)
    except OSError as error:  # exec failed: a bad interpreter line, ENOEXEC
        log.error("hook %s (%s) could not run: %s", path.name, event["class"],
                  error.strerror or error)
