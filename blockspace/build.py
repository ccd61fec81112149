"""Which build of the hot modules is running: compiled (mypyc, at `pip install` when a C
compiler was there) or pure Python, the same sources either way.

`COMPILED_MODULES` is the one list: setup.py compiles these, and `build_kind` looks at where
they were imported from. BLOCKSPACE_PURE=1 in the environment at `pip install` builds no
extensions; at run time it makes the package import these modules from their .py sources even
where compiled ones are installed (`prefer_sources`, called from the package's __init__): all
of them, never some, since a compiled module calls the others of its group directly.

An in-place (editable) build goes stale when a compiled module's source is edited: the old
compiled code would still be imported. setup.py records each source's SHA-256 in STAMP; a
source that no longer matches makes the package import the sources instead, with a warning
on stderr, until the next `pip install -e .`.
"""

import hashlib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import EXTENSION_SUFFIXES, ModuleSpec
from types import ModuleType

# What a profile of a 4 KiB mirror/parity write and a cached read names (docs/benchmarks.md,
# "Compiled hot path"). Each must type-check under mypyc's stricter rules.
COMPILED_MODULES: tuple[str, ...] = (
    "blockspace.volume.volume",
    "blockspace.geometry.layouts",
    "blockspace.ondisk.checksums",
    "blockspace.pool.checksum_store",
    "blockspace.volume.cached_reads",
    "blockspace.volume.extent_io",
    "blockspace.volume.mirror",
    "blockspace.volume.parity",
    "blockspace.volume.row_locks",
)

PURE_ENV = "BLOCKSPACE_PURE"
STAMP = "compiled-sources.json"  # next to this file: {module: sha256 of the source compiled}
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def pure_requested() -> bool:
    """BLOCKSPACE_PURE set to anything but '' or '0'."""
    return os.environ.get(PURE_ENV, "") not in ("", "0")


def module_origin(name: str) -> str | None:
    """The file `name` was (or would be) imported from."""
    module = sys.modules.get(name)
    if module is not None:
        return getattr(module, "__file__", None)
    spec = importlib.util.find_spec(name)
    return spec.origin if spec is not None else None


def is_compiled(origin: str | None) -> bool:
    return origin is not None and origin.endswith(tuple(EXTENSION_SUFFIXES))


def build_kind() -> str:
    """'compiled' when every hot module comes from an extension, 'pure' when none does,
    'mixed' otherwise (a partial build: something to report, never the intent)."""
    compiled = [is_compiled(module_origin(name)) for name in COMPILED_MODULES]
    if all(compiled):
        return "compiled"
    return "mixed" if any(compiled) else "pure"


def source_digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def source_path(name: str, package_dir: str = PACKAGE_DIR) -> str:
    """The .py file of module `name` ('blockspace.x.y') under the package directory."""
    return os.path.join(package_dir, *name.split(".")[1:]) + ".py"


def has_extensions(package_dir: str = PACKAGE_DIR) -> bool:
    """Is any compiled module's extension file installed next to its source?"""
    return any(os.path.exists(source_path(name, package_dir)[:-3] + suffix)
               for name in COMPILED_MODULES for suffix in EXTENSION_SUFFIXES)


def stale_modules(package_dir: str = PACKAGE_DIR) -> list[str]:
    """Compiled modules whose source differs from the one compiled (all of them when the
    build left no stamp); [] when nothing is compiled."""
    if not has_extensions(package_dir):
        return []
    try:
        with open(os.path.join(package_dir, STAMP)) as f:
            recorded = json.load(f)
    except (OSError, ValueError):
        return list(COMPILED_MODULES)
    stale = []
    for name in COMPILED_MODULES:
        try:
            if recorded.get(name) != source_digest(source_path(name, package_dir)):
                stale.append(name)
        except OSError:
            stale.append(name)
    return stale


def choose_at_import() -> None:
    """The package's import-time choice: the sources when asked for, or when the compiled
    modules are stale (said once on stderr); else whatever the import system finds."""
    if pure_requested():
        prefer_sources()
        return
    stale = stale_modules()
    if stale:
        sys.stderr.write(
            f"blockspace: the compiled build is older than {', '.join(stale)}: running the "
            "pure-Python sources (rebuild with `pip install -e .`, or `make setup`)\n")
        prefer_sources()


class SourceFirst(MetaPathFinder):
    """Finds the compiled modules' .py files ahead of their extension modules."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = frozenset(names)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if fullname not in self.names or path is None:
            return None
        leaf = fullname.rpartition(".")[2] + ".py"
        for directory in path:
            source = os.path.join(directory, leaf)
            if os.path.isfile(source):
                return importlib.util.spec_from_file_location(fullname, source)
        return None


def prefer_sources() -> None:
    """Import the hot modules from their sources from now on (idempotent)."""
    if not any(isinstance(finder, SourceFirst) for finder in sys.meta_path):
        sys.meta_path.insert(0, SourceFirst(COMPILED_MODULES))
