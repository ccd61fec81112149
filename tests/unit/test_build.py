"""The build of the hot modules (blockspace/build.py, setup.py): where the install compiled
them, they are what is imported; BLOCKSPACE_PURE=1 at run time imports the sources."""

import importlib
import os
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

import blockspace
from blockspace import build

# where the blockspace under test is imported from, for the child interpreters
PACKAGE_ROOT = Path(blockspace.__file__).resolve().parents[1]


def extension_files(name: str) -> list[Path]:
    """The compiled files of module `name` next to its source, where the install put them."""
    package, _, leaf = name.rpartition(".")
    directories = importlib.import_module(package).__path__
    return [Path(d) / (leaf + suffix) for d in directories for suffix in EXTENSION_SUFFIXES
            if (Path(d) / (leaf + suffix)).exists()]


def test_the_compiled_modules_are_the_ones_imported_where_the_build_made_them() -> None:
    built = {name: extension_files(name) for name in build.COMPILED_MODULES}
    if not any(built.values()):
        pytest.skip("no compiled build here: the install found no C compiler or no mypy, or "
                    "had BLOCKSPACE_PURE=1 (setup.py); the pure build is what runs")
    if build.pure_requested():
        pytest.skip("BLOCKSPACE_PURE is set for this run: the pure fallback is under test")
    missing = [name for name, files in built.items() if not files]
    assert missing == [], "a partial build: some hot modules were not compiled"
    for name, files in built.items():
        module = importlib.import_module(name)
        assert Path(module.__file__ or "") in files, f"{name} came from {module.__file__}"
    assert build.build_kind() == "compiled"


def test_build_kind_names_the_pure_build_when_the_sources_are_forced() -> None:
    """A fresh interpreter with BLOCKSPACE_PURE=1 imports every hot module from its .py file
    and says so, compiled modules installed or not."""
    names = ",".join(build.COMPILED_MODULES)
    script = (
        "import importlib, sys\n"
        "from blockspace.build import build_kind\n"
        f"for name in {names!r}.split(','):\n"
        "    print(importlib.import_module(name).__file__)\n"
        "print(build_kind())\n"
    )
    env = dict(os.environ, BLOCKSPACE_PURE="1",
               PYTHONPATH=os.pathsep.join([str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", script], env=env, check=True,
                         capture_output=True, text=True).stdout.split()
    *files, kind = out
    assert len(files) == len(build.COMPILED_MODULES)
    assert all(f.endswith(".py") for f in files), files
    assert kind == "pure"


@pytest.mark.parametrize(("value", "pure"), [("", False), ("0", False), ("1", True),
                                             ("yes", True)])
def test_pure_is_requested_by_any_value_but_empty_or_zero(
    monkeypatch: pytest.MonkeyPatch, value: str, pure: bool
) -> None:
    monkeypatch.setenv(build.PURE_ENV, value)
    assert build.pure_requested() is pure


def test_an_extension_file_is_told_from_a_source_file() -> None:
    assert build.is_compiled("/x/volume" + EXTENSION_SUFFIXES[0])
    assert not build.is_compiled("/x/volume.py")
    assert not build.is_compiled(None)
