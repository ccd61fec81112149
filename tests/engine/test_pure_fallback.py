"""The pure-Python fallback imports and serves I/O (issue 19: a CI step imports the fallback).

A child interpreter with BLOCKSPACE_PURE=1 runs the hot modules from their sources, compiled
ones installed or not; it writes and reads mirror and parity volumes on memory disks, and
its results must be the default build's (compiled where the install compiled it)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import blockspace

PACKAGE_ROOT = Path(blockspace.__file__).resolve().parents[1]

SCRIPT = r"""
import hashlib, random, sys
import trio
from blockspace.build import COMPILED_MODULES, build_kind
from blockspace.geometry.layouts import LayoutSpec
from blockspace.pool.pool import Pool
from blockspace.testing.memory_device import MemoryDevice
from blockspace.volume.volume import Volume

MiB = 1 << 20

async def main() -> None:
    devices = [MemoryDevice(64 * MiB, path=f"mem{i}") for i in range(3)]
    pool = await Pool.create("p", devices, media=["hdd"] * 3, slab_size=MiB,
                             meta_slot_size=64 << 10)
    rng = random.Random(19)
    digest = hashlib.sha256()
    for name, spec in (("m", LayoutSpec("mirror", 1, copies=2)),
                       ("p", LayoutSpec("parity", 2, parity=1))):
        record = await pool.create_volume(name, 8 * MiB, spec, "thin")
        volume = Volume(pool, record)
        model = bytearray(8 * MiB)
        for _ in range(60):  # aligned and unaligned, inside a slab and across slabs
            offset = rng.randrange(0, 8 * MiB - 300_000)
            data = rng.randbytes(rng.choice((4096, 1000, 70_000, 300_000)))
            await volume.write(offset, data)
            model[offset : offset + len(data)] = data
        for _ in range(40):
            offset = rng.randrange(0, 8 * MiB - 200_000)
            length = rng.choice((4096, 512, 200_000))
            got = await volume.read(offset, length)
            assert bytes(got) == bytes(model[offset : offset + length]), (name, offset)
        whole = await volume.read(0, 8 * MiB)
        assert bytes(whole) == bytes(model), name
        digest.update(bytes(whole))
    print(build_kind())
    for module in COMPILED_MODULES:
        print(sys.modules[module].__file__)
    print(digest.hexdigest())

trio.run(main)
"""


def run(pure: bool) -> list[str]:
    env = dict(os.environ,
               PYTHONPATH=os.pathsep.join([str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("BLOCKSPACE_PURE", None)
    if pure:
        env["BLOCKSPACE_PURE"] = "1"
    done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


@pytest.fixture(scope="module")
def pure() -> list[str]:
    return run(pure=True)


def test_the_pure_fallback_imports_its_sources_and_serves_mirror_and_parity_io(
    pure: list[str],
) -> None:
    kind, *files, _ = pure
    assert kind == "pure"
    assert files
    assert all(f.endswith(".py") for f in files), files


def test_the_default_build_gives_the_pure_builds_results(pure: list[str]) -> None:
    kind, *_, digest = run(pure=False)
    assert kind in ("compiled", "pure")  # pure where the install had no compiler
    assert digest == pure[-1]
