"""The scenario suite (tools/scenarios, docs/scenarios.md).

Its parts first, without root: the workload's content and checker, the placement model (file
block -> disk offset, checked against the real volume engine writing to image files), the
readability model, the report. Then the short version of the suite itself: real FUSE mounts,
loop devices, ext4 and a writer workload while disks die or rot, every acknowledged byte
checked; the full suite is `tools/scenarios --all`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from scenario_lib import placement, report, workload  # noqa: E402
from scenario_lib.cli import QUICK_SET, parse_args, selection  # noqa: E402
from scenario_lib.system import missing_prerequisites, mounts  # noqa: E402
from scenario_lib.trials import LAYOUTS, ONLY_ON, QUICK, SCENARIOS, Result, run_trial  # noqa: E402

from blockspace.disks.devices import open_device  # noqa: E402
from blockspace.geometry.layouts import LayoutSpec  # noqa: E402
from blockspace.pool.pool import Pool  # noqa: E402
from blockspace.volume.volume import Volume  # noqa: E402

KiB = 1 << 10
MiB = 1 << 20
BLOCK = 4096


# ---- the workload ---------------------------------------------------------------------------


def test_content_is_a_pure_function_of_name_and_offset() -> None:
    whole = workload.content(7, "a/000001.bin", 0, 3 * MiB + 123)
    assert len(whole) == 3 * MiB + 123
    for start, end in [(0, 1), (5000, 5010), (4095, 8193), (MiB - 7, 2 * MiB + 9),
                       (3 * MiB, 3 * MiB + 123)]:
        assert workload.content(7, "a/000001.bin", start, end) == whole[start:end]
    assert workload.content(7, "a/000002.bin", 0, 4096) != whole[:4096]
    assert workload.content(8, "a/000001.bin", 0, 4096) != whole[:4096]


def test_every_block_carries_its_file_and_offset() -> None:
    """A block from another file or another offset never passes for the right one."""
    data = workload.content(1, "f", 0, 64 * BLOCK)
    blocks = {data[i : i + BLOCK] for i in range(0, len(data), BLOCK)}
    assert len(blocks) == 64
    other = workload.content(1, "g", 0, 64 * BLOCK)
    assert not blocks & {other[i : i + BLOCK] for i in range(0, len(other), BLOCK)}


def _write(path: Path, seed: int, name: str, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(workload.content(seed, name, 0, size))


def test_check_finds_exactly_the_wrong_and_missing_blocks(tmp_path: Path) -> None:
    sizes = {"ok.bin": 3 * MiB + 5, "bad.bin": 2 * MiB, "short.bin": 100 * KiB, "gone.bin": 10}
    for name, size in sizes.items():
        _write(tmp_path / name, 3, name, size)
    with open(tmp_path / "bad.bin", "r+b") as handle:  # rot two blocks
        for block in (5, 300):
            handle.seek(block * BLOCK + 100)
            handle.write(b"\xff\x00\xff")
    os.truncate(tmp_path / "short.bin", 50 * KiB)
    (tmp_path / "gone.bin").unlink()
    plan = {"root": str(tmp_path), "device": None,
            "files": [{"name": n, "size": s} for n, s in sizes.items()]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    assert workload.main(["check", "--plan", str(tmp_path / "plan.json"),
                          "--out", str(tmp_path / "out.json"), "--seed", "3"]) == 0
    results = {r["name"]: r for r in json.loads((tmp_path / "out.json").read_text())["files"]}
    assert results["ok.bin"]["status"] == "ok"
    assert results["ok.bin"]["ok_bytes"] == sizes["ok.bin"]
    assert results["bad.bin"]["status"] == "wrong"
    assert results["bad.bin"]["wrong"] == [5, 300]
    assert results["bad.bin"]["ok_bytes"] == sizes["bad.bin"] - 2 * BLOCK
    assert results["short.bin"]["status"] == "missing"
    assert results["short.bin"]["missing"] == list(range(12, 25))
    assert results["gone.bin"]["status"] == "missing"
    assert "open" in results["gone.bin"]["error"]


def test_check_reads_files_through_their_extents_on_a_device(tmp_path: Path) -> None:
    """Device mode: the bytes of a file found at given offsets of a raw image."""
    image = tmp_path / "image"
    data = bytearray(4 * MiB)
    first = workload.content(5, "x", 0, 3 * BLOCK + 10)
    data[MiB : MiB + 2 * BLOCK] = first[: 2 * BLOCK]
    data[3 * MiB : 3 * MiB + BLOCK + 10] = first[2 * BLOCK :]
    image.write_bytes(bytes(data))
    plan = {"root": None, "device": str(image), "files": [
        {"name": "x", "size": 3 * BLOCK + 10,
         "extents": [[0, MiB, 2 * BLOCK], [2 * BLOCK, 3 * MiB, 2 * BLOCK]]},
        {"name": "y", "size": BLOCK, "extents": [[0, 2 * MiB, BLOCK]]},  # never written
    ]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    try:
        assert workload.main(["check", "--plan", str(tmp_path / "plan.json"),
                              "--out", str(tmp_path / "out.json"), "--seed", "5"]) == 0
    except OSError as error:  # O_DIRECT unsupported on this tmp file system
        pytest.skip(f"O_DIRECT on {tmp_path}: {error}")
    x, y = json.loads((tmp_path / "out.json").read_text())["files"]
    assert (x["status"], x["ok_bytes"]) == ("ok", 3 * BLOCK + 10)
    assert (y["status"], y["wrong"]) == ("wrong", [0])


def test_writer_acknowledges_only_fsynced_files_and_stops_on_request(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    stop = tmp_path / "stop"
    code = workload.main(["write", "--dir", str(tmp_path / "fs"), "--log", str(log),
                          "--seed", "9", "--prefix", "w0", "--min-size", "1",
                          "--max-size", str(70 * KiB), "--stop-file", str(stop),
                          "--max-bytes", str(400 * KiB)])
    assert code == 0
    events = list(workload.iter_log(str(log)))
    assert (events[0]["ev"], events[-1]["ev"]) == ("start", "done")
    acks = [e for e in events if e["ev"] == "ack"]
    assert sum(e["size"] for e in acks) >= 400 * KiB
    for event in acks:
        data = (tmp_path / "fs" / event["name"]).read_bytes()
        assert data == workload.content(9, event["name"], 0, event["size"])


# ---- placement: the model of where bytes live, against the real engine ----------------------


SPECS = {
    "simple": LayoutSpec("simple", 2),
    "mirror-2": LayoutSpec("mirror", 1, copies=2),
    "mirror-3": LayoutSpec("mirror", 1, copies=3),
    "parity-1": LayoutSpec("parity", 2, parity=1, interleave=16 * KiB),
    "parity-2": LayoutSpec("parity", 3, parity=2, interleave=4 * KiB),
}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_locate_finds_the_bytes_the_volume_engine_wrote(tmp_path: Path, name: str) -> None:
    """Write distinct blocks through `Volume.write` onto image files, then find each one in
    the images where `VolumeMap.locate` says it is: every copy of a mirror, the data fragment
    of parity (systematic code), the column of a stripe."""
    spec = SPECS[name]
    paths = [tmp_path / f"d{i}.img" for i in range(6)]
    for path in paths:
        with open(path, "wb") as handle:
            handle.truncate(48 * MiB)
    rng = random.Random(name)
    slab = 4 * MiB
    size = spec.slab_data_size(slab) * 3
    offsets = sorted({rng.randrange(size // BLOCK) * BLOCK for _ in range(60)})
    blocks = {off: rng.randbytes(BLOCK) for off in offsets}

    async def write() -> None:
        devices = [open_device(str(p)) for p in paths]
        try:
            pool = await Pool.create("t", devices, media=["hdd"] * 6, slab_size=slab,
                                     meta_slot_size=64 * KiB)
            record = await pool.create_volume("vol", size, spec, "thin")
            volume = Volume(pool, record)
            for off, data in blocks.items():
                await volume.write(off, data)
            await volume.flush()
            await pool.commit()
        finally:
            for device in devices:
                device.close()

    trio.run(write)
    pool_map = placement.read_pool_map(map(str, paths))
    volume_map = placement.VolumeMap(pool_map, "vol")
    for off, data in blocks.items():
        place = volume_map.locate(off)
        assert place is not None
        assert len(place.copies) == (spec.copies if spec.kind == "mirror" else 1)
        assert len({d for d, _ in place.stripe}) == len(place.stripe)  # distinct disks
        if spec.kind == "parity":
            assert len(place.stripe) == spec.width
            assert place.copies[0] in place.stripe
        for disk_id, disk_offset in place.copies:
            with open(pool_map.disks[disk_id].path, "rb") as handle:
                handle.seek(disk_offset)
                assert handle.read(BLOCK) == data, (name, off, disk_id, disk_offset)


def test_readability_model() -> None:
    copies = ((0, 100), (1, 100), (2, 100))
    mirror3 = placement.BlockPlace(0, 0, copies, copies)
    parity = placement.BlockPlace(0, 0, ((1, 100),), ((0, 100), (1, 100), (2, 100), (3, 100)))

    class Map(placement.VolumeMap):
        def __init__(self, spec: LayoutSpec) -> None:
            self.spec = spec

    m3 = Map(LayoutSpec("mirror", 1, copies=3))
    assert m3.readable(mirror3, {0, 1})
    assert not m3.readable(mirror3, {0, 1, 2})
    assert m3.readable(mirror3, {0}, {(1, 100)})
    assert not m3.readable(mirror3, {0}, {(1, 100), (2, 100)})
    p2 = Map(LayoutSpec("parity", 2, parity=2))
    assert p2.readable(parity, {0, 2, 3})  # its own column is alive
    assert p2.readable(parity, {1, 2})  # rebuilt from the other two
    assert p2.readable(parity, {1}, {(0, 100)})
    assert not p2.readable(parity, {1, 2}, {(0, 100)})
    p1 = Map(LayoutSpec("parity", 2, parity=1))
    assert not p1.readable(parity, {1, 2})


def test_volume_blocks_of_unaligned_file_blocks() -> None:
    assert placement.volume_blocks(8192) == [8192]
    assert placement.volume_blocks(9216) == [8192, 12288]


# ---- report and command line -----------------------------------------------------------------


def sample_results() -> list[Result]:
    a = Result("flakey", "mirror-2", "flakey 2:1 d1 for 10s mid-write", "pass", "pass", 31.2,
               40, 9 * MiB, 9 * MiB, 9 * MiB)
    b = Result("loss-beyond-tolerance", "simple", "dead d2 at once, mid-write", "fail",
               "expected failure", 40.0, 90, 20 * MiB, 20 * MiB, 12 * MiB, 8 * MiB)
    c = Result("slow", "parity-2", "latency 50ms±20ms d1 for 10s mid-write", "pass", "FAILED",
               50.0, 10, MiB, MiB, MiB, problems=["WRONG BYTES in 1 files"])
    return [a, b, c]


def test_verdict_line_and_table() -> None:
    a, b, c = sample_results()
    line = report.verdict_line(b)
    for part in ("loss-beyond-tolerance", "simple", "dead d2", "20.0 MiB checked",
                 "8.0 MiB EIO", "expected failure", "40.0s"):
        assert part in line
    assert "WRONG BYTES" in report.verdict_line(c)
    text = report.table([a, b, c])
    assert text.splitlines()[0].split() == list(report.COLUMNS)
    assert len(text.splitlines()) == 5
    markdown = report.table([a, b, c], markdown=True)
    assert markdown.startswith("| scenario |")
    assert markdown.count("\n") == 4
    assert "1 pass, 1 expected failure, 1 FAILED" in report.summary([a, b, c], 120)
    document = report.document([a, b, c], mode="full", seed=1, seconds=120)
    assert document["ok"] is False
    assert json.loads(json.dumps(document))["results"][1]["verdict"] == "expected failure"


def test_command_line_selection() -> None:
    assert selection(parse_args(["--all"])) == [
        (s, la) for s in SCENARIOS for la in LAYOUTS if la in ONLY_ON.get(s, LAYOUTS)]
    assert selection(parse_args(["--only", "host-full"])) == [("host-full", "mirror-2")]
    assert selection(parse_args(["--scenarios", "stale-copy,zeroed-range"])) == [
        ("stale-copy", "mirror-2"), ("stale-copy", "parity-1"), ("zeroed-range", "parity-1")]
    assert selection(parse_args(["--scenarios", "zeroed-range", "--layouts", "mirror-2"])) == []
    assert set(ONLY_ON) <= set(SCENARIOS)
    assert all(set(layouts) <= set(LAYOUTS) for layouts in ONLY_ON.values())
    assert selection(parse_args(["--quick"])) == list(QUICK_SET)
    assert selection(parse_args(["--scenarios", "slow", "--layouts", "simple,parity-2"])) == [
        ("slow", "simple"), ("slow", "parity-2")]
    with pytest.raises(SystemExit):
        selection(parse_args(["--scenarios", "nope"]))
    with pytest.raises(SystemExit):
        parse_args([])


# ---- the short version of the suite: real mounts ----------------------------------------------

MISSING = missing_prerequisites()


@pytest.fixture(scope="module")
def workroot() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="blockspace-scenarios-test-", dir="/var/tmp"))
    try:
        yield root
    finally:
        leftovers = [m for m in mounts() if m.startswith(f"{root}/")]
        if not leftovers:
            shutil.rmtree(root, ignore_errors=True)
        assert not leftovers, f"scenario trials left mounts behind: {leftovers}"


EXPECTED = {
    "loss-within-tolerance": lambda layout: "pass" if LAYOUTS[layout].tolerance else
    "expected failure",
    "loss-beyond-tolerance": lambda layout: "expected failure",
    "bitrot-and-loss": lambda layout: "pass" if LAYOUTS[layout].tolerance >= 2 else
    "expected failure",
    "flakey": lambda layout: "pass" if LAYOUTS[layout].tolerance else "expected failure",
    "slow": lambda layout: "pass",
    "stale-copy": lambda layout: "pass",
    "host-full": lambda layout: "pass",
    "zeroed-range": lambda layout: "pass",
}


def test_every_scenario_has_an_expected_verdict_and_a_row_in_the_docs() -> None:
    """A scenario added to the suite is listed with its expected outcome (EXPECTED here, the
    table in docs/scenarios.md)."""
    docs = (Path(__file__).resolve().parents[2] / "docs" / "scenarios.md").read_text()
    for scenario in SCENARIOS:
        assert scenario in EXPECTED
        assert f"| `{scenario}` |" in docs, scenario


# No trial is marked xfail: the product bugs these trials found (docs/scenarios.md,
# "Findings, and what fixed them") are fixed, so each verdict must be exactly EXPECTED's.
@pytest.mark.integration
@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
@pytest.mark.parametrize(("scenario", "layout"), QUICK_SET,
                         ids=[f"{scenario}-{layout}" for scenario, layout in QUICK_SET])
def test_scenario_short(scenario: str, layout: str, workroot: Path) -> None:
    result = run_trial(scenario, layout, QUICK, seed=1, workroot=workroot)
    line = report.verdict_line(result)
    assert not [p for p in result.problems if p.startswith("cleanup:")], line
    assert not [m for m in mounts() if m.startswith(f"{workroot}/")], "mounts left behind"
    assert not list(workroot.iterdir()), "trial directory left behind"
    assert result.bytes_wrong == 0, line
    assert result.bytes_checked > 0, line
    expected = EXPECTED[scenario](layout)
    assert result.verdict == expected, line + "\n" + "\n".join(result.problems)


# The trials of issue 17 item 9, each on its layouts, quick size (each well under 20 s here).
ITEM_9 = [(scenario, layout) for scenario in ("stale-copy", "host-full", "zeroed-range")
          for layout in ONLY_ON[scenario]]


@pytest.mark.integration
@pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
@pytest.mark.parametrize(("scenario", "layout"), ITEM_9,
                         ids=[f"{scenario}-{layout}" for scenario, layout in ITEM_9])
def test_item_9_trial_short(scenario: str, layout: str, workroot: Path) -> None:
    test_scenario_short(scenario, layout, workroot)
