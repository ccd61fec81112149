"""The `blockspace` command line end to end, run as a subprocess (no FUSE mount needed).

Bad input must give one clear line on stderr, a non-zero exit code and change nothing
(DESIGN.md invariant 4): every test of a bad input compares each image file (size, mtime
and the hash of every data segment) and the registry in the state directory before and
after the command. The positive tests check the `--json` documents of every offline
command, capacity on uneven disks, export/import, `--force` and damaged labels.
"""

import errno
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from blockspace import __version__
from blockspace.build import build_kind
from blockspace.units import format_size

MiB = 1 << 20
GiB = 1 << 30
SLAB = 16 * MiB
DISK = 256 * MiB
SMALL_DISK = 8 * MiB
LABEL_SIZE = 4096


# ---- running the CLI ------------------------------------------------------------------


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def blockspace(state: Path, *args: str, cwd: Path, state_first: bool = True) -> Result:
    """Run `python -m blockspace`, with --state-dir before the command (or at the end)."""
    where = ["--state-dir", str(state)]
    argv = [*where, *args] if state_first else [*args, *where]
    env = {k: v for k, v in os.environ.items() if k != "BLOCKSPACE_STATE_DIR"}
    proc = subprocess.run(
        [sys.executable, "-m", "blockspace", *argv],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def ok(state: Path, *args: str, cwd: Path, state_first: bool = True) -> Result:
    result = blockspace(state, *args, cwd=cwd, state_first=state_first)
    assert result.rc == 0, f"blockspace {' '.join(args)} failed: {result.err}"
    assert result.err == "", result.err
    return result


def ok_json(state: Path, *args: str, cwd: Path) -> Any:
    return ok(state, *args, "--json", cwd=cwd).json()


def assert_one_line_error(result: Result, rc: int, *expected: str, json_mode: bool = False) -> None:
    """A clean user error: exit code `rc`, one line on stderr that says it is an error and
    contains each of `expected`; on stdout nothing, or with --json that line and the code
    as an object."""
    assert "Traceback" not in result.err, result.err
    assert result.rc == rc, (result.rc, result.err)
    if json_mode:
        assert result.json() == {"error": result.err.rstrip("\n"), "exit_code": rc,
                                 "json_version": 1}
    else:
        assert result.out == ""
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    line = lines[0]
    # "blockspace: error: ..." or, for usage errors, argparse's "blockspace pool create: error:"
    prog, sep, _ = line.partition(": error: ")
    assert sep, line
    assert prog.split(" ")[0] == "blockspace", line
    for part in expected:
        assert part in line, f"{part!r} not in {line!r}"


# ---- "changed nothing" ----------------------------------------------------------------


def fingerprint(path: Path) -> tuple[int, int, str]:
    """Size, mtime and a hash of the file's data segments with their offsets.

    Holes are skipped (they read as zeros and hashing gigabytes of them is slow); a write
    anywhere turns a hole into data or changes data, and punching a hole moves a segment
    boundary, so any change of the bytes changes the hash.
    """
    st = path.stat()
    digest = hashlib.blake2b()
    fd = os.open(path, os.O_RDONLY)
    try:
        offset = 0
        while offset < st.st_size:
            try:
                start = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as error:
                if error.errno == errno.ENXIO:  # nothing but a hole after offset
                    break
                raise
            end = os.lseek(fd, start, os.SEEK_HOLE)
            digest.update(f"{start}:{end};".encode())
            position = start
            while position < end:
                chunk = os.pread(fd, min(end - position, 8 * MiB), position)
                if not chunk:
                    break
                digest.update(chunk)
                position += len(chunk)
            offset = end
    finally:
        os.close(fd)
    return st.st_size, st.st_mtime_ns, digest.hexdigest()


def snapshot(root: Path) -> dict[str, object]:
    """Every file and link under `root` (images and the state directory)."""
    found: dict[str, object] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_symlink():
            found[name] = ("symlink", os.readlink(path))
        elif path.is_dir():
            found[name] = ("dir",)
        else:
            found[name] = fingerprint(path)
    return found


def make_disks(root: Path, sizes: dict[str, int]) -> None:
    for name, size in sizes.items():
        with (root / name).open("wb") as handle:
            handle.truncate(size)


def corrupt(path: Path, offset: int) -> None:
    """Flip one byte (inside a label's JSON body, so its checksum no longer matches)."""
    with path.open("r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)
        handle.seek(offset)
        handle.write(bytes([byte[0] ^ 0xFF]))


# ---- a shared world for the bad-input cases -------------------------------------------


@dataclass
class World:
    root: Path
    state: Path

    def run(self, *args: str) -> Result:
        return blockspace(self.state, *args, cwd=self.root)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """Pool `pool` (3 disks, a thin and a fixed volume), pool `two` (2 disks), spare disks,
    a too-small disk, a directory, a symlink and a hard link to spare disks."""
    root = tmp_path_factory.mktemp("cli-world")
    make_disks(root, {f"{name}.img": DISK for name in ("p0", "p1", "p2", "t0", "t1", "free0",
                                                        "free1")})
    make_disks(root, {"small.img": SMALL_DISK, "big.img": 64 << 30})
    (root / "adir").mkdir()
    (root / "free0.link").symlink_to("free0.img")
    os.link(root / "free1.img", root / "free1.hard")
    world = World(root, root / "state")
    ok(world.state, "pool", "create", "pool", "p0.img", "p1.img", "p2.img", "--slab-size", "16M",
       cwd=root)
    ok(world.state, "pool", "create", "two", "t0.img", "t1.img", "--slab-size", "16M", cwd=root)
    ok(world.state, "volume", "create", "pool", "thin", "--size", "1G", cwd=root)
    ok(world.state, "volume", "create", "pool", "fixed", "--size", "32M",
       "--provisioning", "fixed", cwd=root)
    return world


NEW = ["pool", "create", "new"]
NAME_RULE = "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
LONG_NAME = "x" * 65
NO_POOL = "no pool named 'nope' (see `blockspace pool list`"
UNKNOWN = "is not a mounted Blockspace pool or mount point"


def case(name: str, args: list[str], rc: int, *expected: str) -> Any:
    return pytest.param(args, rc, expected, id=name)


BAD_INPUT = [
    # pool create: disks
    case("create-nonexistent-disk", [*NEW, "free0.img", "missing.img", "--slab-size", "16M"],
         2, "missing.img: no such file or device"),
    case("create-directory-disk", [*NEW, "free0.img", "adir", "--slab-size", "16M"],
         2, "adir: not a regular file or block device (it is a directory)"),
    case("create-same-path-twice", [*NEW, "free0.img", "free1.img", "free0.img"],
         2, "free0.img is given twice (same disk as free0.img)"),
    case("create-same-file-by-symlink", [*NEW, "free0.img", "free0.link"],
         2, "free0.link is given twice (same disk as free0.img)"),
    case("create-same-file-by-hardlink", [*NEW, "free1.img", "free1.hard"],
         2, "free1.hard is given twice (same disk as free1.img)"),
    case("create-disk-in-a-pool", [*NEW, "free0.img", "p1.img", "--slab-size", "16M"],
         2, "p1.img already belongs to pool 'pool' (", "use --force to overwrite it"),
    case("create-disk-too-small", [*NEW, "free0.img", "small.img", "--slab-size", "16M"],
         2, "disk of 8M is too small: it needs at least ", " for slab size 16M"),
    # pool create: slab and metadata sizes
    case("slab-not-power-of-two", [*NEW, "free0.img", "--slab-size", "3M"],
         2, "invalid slab size 3M: use a power of two between 1M and 4G"),
    case("slab-not-a-size", [*NEW, "free0.img", "--slab-size", "abc"],
         2, "invalid size 'abc' (expected e.g. 512M, 20G, 1T, 1TB)"),
    case("slab-zero", [*NEW, "free0.img", "--slab-size", "0"],
         2, "invalid slab size 0B: use a power of two"),
    case("metadata-size-not-4k", [*NEW, "free0.img", "--slab-size", "16M",
                                  "--metadata-size", "1000"],
         2, "invalid metadata slot size 1000B"),
    # issue 16: the metadata of a full 64 GiB of 1 MiB slabs cannot fit 64 KiB
    case("metadata-size-too-small", [*NEW, "big.img", "--slab-size", "1M",
                                     "--metadata-size", "64K"],
         2, "the metadata area (64K, --metadata-size) is too small for this pool", "may need"),
    case("media-unknown", [*NEW, "free0.img", "--media", "nvme"],
         2, "argument --media: invalid choice: 'nvme'"),
    # pool create: names
    case("pool-name-empty", ["pool", "create", "", "free0.img"],
         2, f"invalid pool name '': {NAME_RULE}"),
    case("pool-name-slash", ["pool", "create", "a/b", "free0.img"],
         2, "invalid pool name 'a/b'"),
    case("pool-name-dotdot", ["pool", "create", "..", "free0.img"],
         2, "invalid pool name '..'"),
    case("pool-name-65-chars", ["pool", "create", LONG_NAME, "free0.img"],
         2, f"invalid pool name '{LONG_NAME}'"),
    case("pool-name-dash", ["pool", "create", "--", "-x", "free0.img"],
         2, "invalid pool name '-x'"),
    case("pool-name-dash-as-option", ["pool", "create", "-x", "free0.img"],
         2, "the following arguments are required: DISK"),
    case("pool-name-exists", ["pool", "create", "pool", "free0.img", "--slab-size", "16M"],
         2, "a pool named 'pool' already exists"),
    # unknown pool
    case("status-unknown-pool-json", ["--json", "pool", "status", "nope"], 2, NO_POOL),
    case("volume-create-unknown-pool", ["volume", "create", "nope", "v", "--size", "1G"],
         2, NO_POOL),
    case("export-unknown-pool", ["pool", "export", "nope"], 2, NO_POOL),
    # volume create: layouts that do not fit the pool
    case("mirror-3-on-2-disks", ["volume", "create", "two", "v", "--size", "1G", "--copies", "3"],
         2, "mirror-3 needs at least 3 disks, the pool has 2"),
    case("parity-1-on-2-disks", ["volume", "create", "two", "v", "--size", "1G",
                                 "--resiliency", "parity"],
         2, "parity-1 (2+1) needs at least 3 disks, the pool has 2"),
    case("parity-2-on-3-disks", ["volume", "create", "pool", "v", "--size", "1G",
                                 "--resiliency", "parity", "--parity", "2"],
         2, "parity-2 (2+2) needs at least 4 disks, the pool has 3"),
    case("simple-4-columns-on-3-disks", ["volume", "create", "pool", "v", "--size", "1G",
                                         "--resiliency", "simple", "--columns", "4"],
         2, "simple (4 col) needs at least 4 disks, the pool has 3"),
    case("mirror-3-by-name-on-2-disks", ["volume", "create", "two", "v", "--size", "1G",
                                         "--resiliency", "mirror-3"],
         2, "mirror-3 needs at least 3 disks, the pool has 2"),
    case("resiliency-name-contradicts-copies", ["volume", "create", "pool", "v", "--size", "1G",
                                                "--resiliency", "mirror-3", "--copies", "2"],
         2, "--resiliency mirror-3 contradicts --copies 2"),
    case("resiliency-name-contradicts-parity", ["volume", "create", "pool", "v", "--size", "1G",
                                                "--resiliency", "parity-1", "--parity", "2"],
         2, "--resiliency parity-1 contradicts --parity 2"),
    case("copies-4", ["volume", "create", "pool", "v", "--size", "1G", "--copies", "4"],
         2, "mirror needs --copies 2 or 3, not 4"),
    case("parity-3", ["volume", "create", "pool", "v", "--size", "1G", "--resiliency", "parity",
                      "--parity", "3"],
         2, "parity needs --parity 1 or 2, not 3"),
    case("copies-on-simple", ["volume", "create", "pool", "v", "--size", "1G",
                              "--resiliency", "simple", "--copies", "2"],
         2, "--copies applies to mirror volumes only"),
    case("interleave-not-power-of-two", ["volume", "create", "pool", "v", "--size", "1G",
                                         "--interleave", "3K"],
         2, "interleave must be a power of two from 4K to the slab size, not 3072"),
    # volume sizes
    case("size-unknown-unit", ["volume", "create", "pool", "v", "--size", "12Q"],
         2, "invalid size '12Q' (expected e.g. 512M, 20G, 1T, 1TB)"),
    case("size-negative", ["volume", "create", "pool", "v", "--size", "-1"],
         2, "invalid size '-1'"),
    case("size-zero", ["volume", "create", "pool", "v", "--size", "0"],
         2, "--size must be larger than zero"),
    case("size-not-4k-multiple", ["volume", "create", "pool", "v", "--size", "1000"],
         2, "volume size must be a positive multiple of 4K, not 1000"),
    case("size-beyond-metadata-limit", ["volume", "create", "pool", "v", "--size", "2000P"],
         2, "--size 2000P is too large: a volume holds at most"),
    case("size-missing", ["volume", "create", "pool", "v"],
         2, "the following arguments are required: --size"),
    # volume names
    case("volume-name-empty", ["volume", "create", "pool", "", "--size", "1G"],
         2, f"invalid volume name '': {NAME_RULE}"),
    case("volume-name-slash", ["volume", "create", "pool", "a/b", "--size", "1G"],
         2, "invalid volume name 'a/b'"),
    case("volume-name-dotdot", ["volume", "create", "pool", "..", "--size", "1G"],
         2, "invalid volume name '..'"),
    case("volume-name-65-chars", ["volume", "create", "pool", LONG_NAME, "--size", "1G"],
         2, f"invalid volume name '{LONG_NAME}'"),
    case("volume-name-dash", ["volume", "create", "pool", "--size", "1G", "--", "-x"],
         2, "invalid volume name '-x'"),
    case("volume-name-exists", ["volume", "create", "pool", "thin", "--size", "1G"],
         2, "volume 'thin' already exists in pool 'pool'"),
    # volume delete / grow
    case("delete-unknown-volume", ["volume", "delete", "pool", "nope"],
         2, "no volume 'nope' in pool 'pool'"),
    case("grow-unknown-volume", ["volume", "grow", "pool", "nope", "--size", "2G"],
         2, "no volume 'nope' in pool 'pool'"),
    case("grow-to-smaller", ["volume", "grow", "pool", "thin", "--size", "512M"],
         2, "new size must be a multiple of 4K larger than the current 1G"),
    case("grow-bad-size", ["volume", "grow", "pool", "thin", "--size", "lots"],
         2, "invalid size 'lots'"),
    case("grow-fixed-beyond-free-space", ["volume", "grow", "pool", "fixed", "--size", "10G"],
         1, "not enough free space for the volume growth: mirror-2 can still place "),
    # pool import / export
    case("import-blank-disk", ["pool", "import", "free0.img"],
         2, "free0.img is not a Blockspace disk"),
    case("import-same-disk-twice", ["pool", "import", "p0.img", "p0.img"],
         2, "p0.img is given twice (same disk as p0.img)"),
    case("import-two-pools", ["pool", "import", "p0.img", "t0.img"],
         2, "the disks belong to several pools: ", "import one at a time"),
    case("import-name-taken", ["pool", "import", "p0.img", "--name", "two"],
         2, "another pool is registered as 'two'; import with --name NEW"),
    case("import-bad-name", ["pool", "import", "p0.img", "--name", "a/b"],
         2, "invalid pool name 'a/b'"),
    case("import-nothing", ["pool", "import"], 2, "give the pool's disks, or -d DIR"),
    case("import-dir-not-a-dir", ["pool", "import", "-d", "p0.img"],
         2, "p0.img: not a directory"),
    case("import-dir-without-members", ["pool", "import", "-d", "adir"],
         2, "no Blockspace disks in adir"),
    case("import-dir-of-two-pools", ["pool", "import", "-d", "."],
         2, "the disks in . belong to several pools: ", "pool (", "two (",
         "name the one to import"),
    case("import-dir-unknown-pool", ["pool", "import", "-d", ".", "nope"],
         2, "no pool 'nope' among the disks in . (found: "),
    case("import-dir-and-disks", ["pool", "import", "-d", ".", "p0.img", "p1.img"],
         2, "with -d DIR, give at most one pool name or uuid, not disks"),
    # mount / unmount (validation only: nothing here reaches FUSE)
    case("unmount-not-mounted-dir", ["unmount", "adir"], 4, f"adir {UNKNOWN}"),
    case("unmount-not-mounted-pool", ["umount", "pool"], 4, f"pool {UNKNOWN}"),
    case("mount-onto-missing-dir", ["mount", "pool", "no-such-dir"],
         2, "mount point no-such-dir is not a directory"),
    case("mount-unknown-pool", ["mount", "nope", "adir"], 2, NO_POOL),
    # usage
    case("no-command", [], 2, "the following arguments are required: command"),
    case("unknown-option", ["pool", "list", "--bogus"], 2, "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize(("args", "rc", "expected"), BAD_INPUT)
def test_bad_input_is_one_clear_line_and_changes_nothing(
    world: World, args: list[str], rc: int, expected: tuple[str, ...]
) -> None:
    before = snapshot(world.root)
    result = world.run(*args)
    assert_one_line_error(result, rc, *expected, json_mode="--json" in args)
    assert snapshot(world.root) == before


def test_fixed_volume_larger_than_free_space_changes_nothing(world: World) -> None:
    status = ok_json(world.state, "pool", "status", "pool", cwd=world.root)
    fits = status["usable"]["mirror-2"]
    assert fits > 0
    before = snapshot(world.root)
    result = world.run("volume", "create", "pool", "huge", "--size", str(fits + SLAB),
                       "--provisioning", "fixed")
    assert_one_line_error(
        result, 1,
        f"not enough free space for the fixed volume of {format_size(fits + SLAB)}: ",
        f"mirror-2 can still place {format_size(fits)}, {format_size(fits + SLAB)} needed",
    )
    assert snapshot(world.root) == before
    after = ok_json(world.state, "pool", "status", "pool", cwd=world.root)
    assert after["generation"] == status["generation"]
    assert after == status


def test_read_only_commands_and_option_positions(world: World) -> None:
    """status and list write nothing; --json and --state-dir work before and after the
    command; every list/status has a --json form and a table."""
    before = snapshot(world.root)
    front = ok(world.state, "--json", "pool", "list", cwd=world.root).json()
    back = ok(world.state, "pool", "list", "--json", cwd=world.root, state_first=False).json()
    assert front == back
    assert [p["name"] for p in front] == ["pool", "two"]
    assert front[0]["disks"] == [str(world.root / f"p{i}.img") for i in range(3)]
    assert front[0]["mountpoint"] is None
    volumes = ok(world.state, "volume", "list", "pool", "--json", cwd=world.root,
                 state_first=False).json()
    assert [(v["name"], v["provisioning"]) for v in volumes] == [
        ("thin", "thin"), ("fixed", "fixed")]
    table = ok(world.state, "pool", "status", "pool", cwd=world.root).out
    assert "health: online" in table
    assert "thin" in table
    assert "fixed" in table
    assert snapshot(world.root) == before


def test_version_and_resiliency_names(world: World) -> None:
    """--version answers without a command; a volume created as "parity-1" or "mirror-3" is
    listed under the name it was created with; a usage error with --json is an object too."""
    version = ok(world.state, "--version", cwd=world.root).out
    assert version == f"blockspace {__version__} ({build_kind()})\n"
    for name in ("mirror-3", "parity-1"):
        created = ok_json(world.state, "volume", "create", "pool", f"by-{name}", "--size", "64M",
                          "--resiliency", name, cwd=world.root)
        assert created["resiliency"].split(" ")[0] == name  # parity adds "(2+1)"
        ok(world.state, "volume", "delete", "pool", f"by-{name}", cwd=world.root)
    usage = world.run("--json", "pool", "list", "--bogus")
    assert_one_line_error(usage, 2, "unrecognized arguments: --bogus", json_mode=True)


def test_import_scans_a_directory_and_skips_non_members(world: World, tmp_path: Path) -> None:
    """`pool import -d DIR POOL` finds the pool's members among blank disks, other pools'
    disks, a directory and second paths, and says what it skipped (--json)."""
    state = tmp_path / "state"
    imported = ok_json(state, "pool", "import", "-d", str(world.root), "two", cwd=world.root)
    assert imported["name"] == "two"
    assert sorted(Path(d["path"]).name for d in imported["disks"]) == ["t0.img", "t1.img"]
    skipped = "\n".join(imported["skipped"])
    for name in ("free0.img", "free0.link", "free1.img", "free1.hard", "small.img"):
        assert f"{world.root / name}: not a Blockspace disk" in skipped
    by_uuid = ok_json(state, "pool", "import", "-d", str(world.root), imported["uuid"],
                      cwd=world.root)  # again, by uuid: the same registration
    assert (by_uuid["name"], by_uuid["uuid"]) == ("two", imported["uuid"])
    assert [p["name"] for p in ok_json(state, "pool", "list", cwd=world.root)] == ["two"]


def test_help(tmp_path: Path) -> None:
    result = ok(tmp_path / "state", "--help", cwd=tmp_path)
    assert result.out.startswith("usage: blockspace")
    for command in ("pool", "volume", "mount", "unmount"):
        assert command in result.out
    assert not (tmp_path / "state").exists()


# ---- positive round trips -------------------------------------------------------------


def test_uneven_disks_capacity_and_fill(tmp_path: Path) -> None:
    """1G + 1G + 2G: status reports each disk and the usable capacity per resiliency, and
    the allocator fills the uneven disks completely."""
    make_disks(tmp_path, {"a.img": GiB, "b.img": GiB, "c.img": 2 * GiB})
    state = tmp_path / "state"
    slab = 64 * MiB  # the default
    status = ok_json(state, "pool", "create", "big", "a.img", "b.img", "c.img", cwd=tmp_path)
    assert status["name"] == "big"
    assert status["health"] == "online"
    assert status["slab_size"] == slab
    assert status["generation"] == 0
    assert status["mountpoint"] is None
    assert status["volumes"] == []
    disks = status["disks"]
    assert [d["path"] for d in disks] == [str(tmp_path / n) for n in ("a.img", "b.img", "c.img")]
    assert [d["size"] for d in disks] == [GiB, GiB, 2 * GiB]
    assert {d["state"] for d in disks} == {"online"}
    assert {d["media"] for d in disks} == {"hdd"}
    extents = [d["extents"] for d in disks]
    for disk in disks:
        # rounding, plus the labels, metadata and intent areas, cost under two extents
        assert disk["extents"] * disk["extent_stride"] <= disk["size"]
        assert (disk["extents"] + 2) * disk["extent_stride"] > disk["size"]
        assert disk["free_extents"] == disk["extents"]
        assert disk["free_bytes"] == disk["extents"] * slab
        assert disk["used_bytes"] == 0
        assert set(disk["errors"].values()) == {0}
    assert status["raw_size"] == status["raw_free"] == sum(extents) * slab

    usable = status["usable"]
    total, largest, smallest = sum(extents), max(extents), min(extents)
    mirror2 = min(total // 2, total - largest) * slab
    assert usable["mirror-2"] == mirror2
    assert 2 * GiB - 3 * slab <= mirror2 <= 2 * GiB  # "about 2 GiB": a third of it mirrored
    assert usable["mirror-3"] == smallest * slab
    assert usable["simple"] == smallest * 3 * slab  # default simple stripes over all 3 disks
    assert usable["parity-1"] == smallest * 2 * slab  # 2+1 on three disks
    assert usable["parity-2"] is None  # 2+2 needs four

    # A fixed mirror of exactly what status promised fits, and fills the uneven disks.
    volume = ok_json(state, "volume", "create", "big", "m", "--size", str(mirror2),
                     "--provisioning", "fixed", cwd=tmp_path)
    assert (volume["size"], volume["allocated"]) == (mirror2, mirror2)
    assert volume["slabs"] == mirror2 // slab
    assert volume["footprint"] == 2 * mirror2
    full = ok_json(state, "pool", "status", "big", cwd=tmp_path)
    assert full["generation"] == 1
    assert full["usable"]["mirror-2"] == 0
    assert full["raw_free"] == (total - 2 * (mirror2 // slab)) * slab
    assert all(d["free_extents"] <= 1 for d in full["disks"])

    # Without the mirror, a one-column simple volume holds the sum of the disks.
    ok_json(state, "volume", "delete", "big", "m", cwd=tmp_path)
    volume = ok_json(state, "volume", "create", "big", "s", "--size", str(total * slab),
                     "--resiliency", "simple", "--columns", "1", "--provisioning", "fixed",
                     cwd=tmp_path)
    assert volume["resiliency"] == "simple (1 col)"
    assert volume["allocated"] == total * slab
    full = ok_json(state, "pool", "status", "big", cwd=tmp_path)
    assert full["raw_free"] == 0
    assert [d["free_bytes"] for d in full["disks"]] == [0, 0, 0]
    assert [d["used_bytes"] for d in full["disks"]] == [e * slab for e in extents]
    assert full["usable"]["simple"] == 0


def test_volume_round_trip_then_export_and_import(tmp_path: Path) -> None:
    make_disks(tmp_path, {f"d{i}.img": DISK for i in range(3)})
    state = tmp_path / "state"
    disks = ["d0.img", "d1.img", "d2.img"]

    def run_json(*args: str) -> Any:
        return ok_json(state, *args, cwd=tmp_path)

    created = run_json("pool", "create", "rt", *disks, "--slab-size", "16M")
    assert (created["health"], created["generation"]) == ("online", 0)

    thin = run_json("volume", "create", "rt", "v", "--size", "100M")
    assert thin["name"] == "v"
    assert thin["size"] == 100 * MiB
    assert (thin["resiliency"], thin["provisioning"]) == ("mirror-2", "thin")
    assert (thin["slabs"], thin["allocated"], thin["footprint"]) == (0, 0, 0)
    assert thin["state"] == "online"
    assert thin["layout"] == {"kind": "mirror", "columns": 1, "copies": 2, "parity": 0,
                              "interleave": 64 << 10}

    long_name = "n" * 64  # the longest valid name
    fixed = run_json("volume", "create", "rt", long_name, "--size", "40M", "--resiliency",
                     "parity", "--provisioning", "fixed")
    assert (fixed["name"], fixed["resiliency"]) == (long_name, "parity-1 (2+1)")
    assert fixed["slabs"] == 2  # 40M over 2 data columns of 16M slabs
    assert fixed["allocated"] == 2 * 2 * SLAB
    assert fixed["footprint"] == 2 * 3 * SLAB

    listed = run_json("volume", "list", "rt")
    assert [v["name"] for v in listed] == ["v", long_name]

    grown = run_json("volume", "grow", "rt", "v", "--size", "200M")
    assert (grown["size"], grown["slabs"]) == (200 * MiB, 0)
    grown = run_json("volume", "grow", "rt", long_name, "--size", "100M")
    assert (grown["size"], grown["slabs"]) == (100 * MiB, 4)

    status = run_json("pool", "status", "rt")
    assert status["generation"] == 4  # two creates, two grows
    assert status["raw_free"] == created["raw_free"] - 4 * 3 * SLAB

    deleted = run_json("volume", "delete", "rt", "v")
    assert deleted == {"name": "v", "deleted": True, "json_version": 1}
    table = ok(state, "volume", "list", "rt", cwd=tmp_path).out
    assert "parity-1" in table
    assert " v " not in table

    # export: the registry forgets, the disks are untouched
    images = {name: fingerprint(tmp_path / name) for name in disks}
    assert run_json("pool", "export", "rt") == {"name": "rt", "json_version": 1}
    assert run_json("pool", "list") == []
    assert {name: fingerprint(tmp_path / name) for name in disks} == images

    # the registry lost altogether: import from the disks, under a new name
    shutil.rmtree(state)
    imported = run_json("pool", "import", *disks, "--name", "again")
    assert (imported["name"], imported["uuid"]) == ("again", created["uuid"])
    assert imported["health"] == "online"
    assert imported["generation"] == 5
    assert [v["uuid"] for v in imported["volumes"]] == [grown["uuid"]]
    assert imported["volumes"][0]["size"] == 100 * MiB
    pools = run_json("pool", "list")
    assert [(p["name"], p["disks"]) for p in pools] == [
        ("again", [str(tmp_path / name) for name in disks])]
    assert {name: fingerprint(tmp_path / name) for name in disks} == images


def test_force_overwrites_a_member_disk(tmp_path: Path) -> None:
    make_disks(tmp_path, {f"d{i}.img": DISK for i in range(3)})
    state = tmp_path / "state"
    ok(state, "pool", "create", "old", "d0.img", "d1.img", "--slab-size", "16M", cwd=tmp_path)
    before = snapshot(tmp_path)
    refused = blockspace(state, "pool", "create", "new", "d0.img", "d2.img", "--slab-size",
                         "16M", cwd=tmp_path)
    assert_one_line_error(refused, 2, "d0.img already belongs to pool 'old'", "--force")
    assert snapshot(tmp_path) == before

    new = ok_json(state, "pool", "create", "new", "d0.img", "d2.img", "--slab-size", "16M",
                  "--force", cwd=tmp_path)
    assert new["health"] == "online"
    assert [d["path"] for d in new["disks"]] == [str(tmp_path / "d0.img"),
                                                str(tmp_path / "d2.img")]
    # The old pool lost d0 to the new one: it opens degraded, with d0 shown missing.
    old = ok_json(state, "pool", "status", "old", cwd=tmp_path)
    assert old["health"] == "degraded"
    assert [(d["path"], d["state"]) for d in old["disks"]] == [
        (str(tmp_path / "d0.img"), "missing"), (str(tmp_path / "d1.img"), "online")]


def test_damaged_labels(tmp_path: Path) -> None:
    make_disks(tmp_path, {f"l{i}.img": DISK for i in range(3)})
    state = tmp_path / "state"
    disks = ["l0.img", "l1.img", "l2.img"]
    ok(state, "pool", "create", "lab", *disks, "--slab-size", "16M", cwd=tmp_path)
    ok(state, "volume", "create", "lab", "v", "--size", "64M", "--provisioning", "fixed",
       cwd=tmp_path)
    damaged = tmp_path / "l0.img"

    # The primary label of one disk damaged: its backup label is enough.
    corrupt(damaged, 100)
    status = ok_json(state, "pool", "status", "lab", cwd=tmp_path)
    assert status["health"] == "online"
    assert {d["state"] for d in status["disks"]} == {"online"}
    assert status["volumes"][0]["state"] == "online"
    elsewhere = ok_json(tmp_path / "state2", "pool", "import", *disks, cwd=tmp_path)
    assert (elsewhere["health"], len(elsewhere["disks"])) == ("online", 3)

    # Both labels damaged: the disk is left out, cleanly.
    corrupt(damaged, DISK - LABEL_SIZE + 100)
    status = ok_json(state, "pool", "status", "lab", cwd=tmp_path)
    assert status["health"] == "degraded"
    assert [(d["path"], d["state"]) for d in status["disks"]] == [
        (str(tmp_path / name), "online" if name != "l0.img" else "missing") for name in disks]
    assert status["volumes"][0]["name"] == "v"
    table = ok(state, "pool", "status", "lab", cwd=tmp_path).out
    assert "health: degraded" in table
    assert "missing" in table

    before = snapshot(tmp_path)
    result = blockspace(tmp_path / "state3", "pool", "import", *disks, cwd=tmp_path)
    assert_one_line_error(result, 1, "l0.img: both copies of the disk label are damaged",
                          "leave this disk out")
    result = blockspace(state, "pool", "create", "fresh", "l0.img", cwd=tmp_path)
    assert_one_line_error(result, 2, "l0.img carries a damaged Blockspace label",
                          "use --force to overwrite it")
    assert snapshot(tmp_path) == before


def test_the_config_file_sets_defaults_and_a_bad_one_is_refused(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`config show` reports the file in $BLOCKSPACE_CONFIG; a command that reads a default
    from a file with a typo refuses with one line and does nothing."""
    config = tmp_path / "blockspace.toml"
    config.write_text('[scrub]\nrate = "64M"\n[daemon]\nio_timeout = 7\n')
    monkeypatch.setenv("BLOCKSPACE_CONFIG", str(config))
    shown = ok_json(world.state, "config", "show", cwd=world.root)
    assert (shown["scrub_rate"], shown["io_timeout"], shown["source"]) == (
        64 << 20, 7.0, str(config))
    config.write_text("[scrub]\nrat = \"64M\"\n")
    before = snapshot(world.root)
    assert_one_line_error(world.run("scrub", "pool"), 2,
                          f"{config}: unknown key scrub.rat (known: rate)")
    assert snapshot(world.root) == before
