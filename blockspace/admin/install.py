"""`blockspace system install`: put the systemd units, the mount(8) helper and the shell
completion where the system looks for them, under a root directory (/ by default; tests and
packagers give another). Planning is pure (`plan`: every file with its text and mode);
`apply` writes the plan and `remove` takes exactly those files away again."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

UNITS = ("blockspace@.service", "blockspace-scrub@.service", "blockspace-scrub@.timer")
UNIT_DIR = "etc/systemd/system"
MOUNT_HELPER = "sbin/mount.blockspace"  # mount(8) runs /sbin/mount.TYPE for `-t TYPE`
COMPLETION = "usr/share/bash-completion/completions/blockspace"
ENTRY_POINT_MARK = "@BLOCKSPACE@"

MOUNT_HELPER_SCRIPT = '''#!{python}
"""mount.blockspace: mount(8)'s helper for Blockspace pools, so that an fstab line
`tank /mnt/tank blockspace defaults 0 0` works (blockspace/cli/mount_helper.py).
Installed by `blockspace system install`."""
import os
import sys

# The code the install ran from, for this helper and for the daemon it starts.
sys.path.insert(0, {package_root!r})
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in ({package_root!r}, os.environ.get("PYTHONPATH", "")) if p)

from blockspace.cli.mount_helper import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
'''


@dataclass(frozen=True)
class InstalledFile:
    path: str  # relative to the root
    text: str
    mode: int


def entry_point() -> str:
    """The command the units run: the `blockspace` console script beside this Python (a
    virtual environment, /usr/bin), else the first on PATH, else `python -m blockspace`."""
    beside = Path(sys.executable).parent / "blockspace"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("blockspace")
    if found:
        return os.path.abspath(found)
    return f"{sys.executable} -m blockspace"


def package_root() -> str:
    """The directory the `blockspace` package is imported from."""
    import blockspace

    return str(Path(blockspace.__file__).resolve().parent.parent)


def unit_text(name: str, command: str) -> str:
    template = resources.files("blockspace").joinpath("data", "systemd", name).read_text()
    return template.replace(ENTRY_POINT_MARK, command)


def plan(command: str, python: str, root_of_package: str, completion: str) -> list[InstalledFile]:
    files = [InstalledFile(f"{UNIT_DIR}/{name}", unit_text(name, command), 0o644)
             for name in UNITS]
    files.append(InstalledFile(
        MOUNT_HELPER,
        MOUNT_HELPER_SCRIPT.format(python=python, package_root=root_of_package), 0o755))
    files.append(InstalledFile(COMPLETION, completion, 0o644))
    return files


def apply(root: Path, files: list[InstalledFile]) -> list[Path]:
    """Write every file under `root` (atomically, each replacing what was there)."""
    written = []
    for item in files:
        target = root / item.path
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(item.text)
        tmp.chmod(item.mode)
        os.replace(tmp, target)
        written.append(target)
    return written


def remove(root: Path) -> list[Path]:
    """Remove what `apply` installs under `root`; returns what was there."""
    removed = []
    for relative in [f"{UNIT_DIR}/{name}" for name in UNITS] + [MOUNT_HELPER, COMPLETION]:
        target = root / relative
        if target.is_file() or target.is_symlink():
            target.unlink()
            removed.append(target)
    return removed


def systemd_running(root: Path) -> bool:
    """sd_booted(3): systemd is this machine's init (and the install is for this machine)."""
    return root.resolve() == Path("/") and Path("/run/systemd/system").is_dir()


def daemon_reload() -> str | None:
    """`systemctl daemon-reload`; None when done, else why not."""
    systemctl = shutil.which("systemctl")
    if systemctl is None:
        return "systemctl not found"
    result = subprocess.run([systemctl, "daemon-reload"], capture_output=True, text=True,
                            timeout=120, check=False)
    if result.returncode != 0:
        return result.stderr.strip() or f"exit {result.returncode}"
    return None
