"""`volume show [--map]`, `events` and `pool history` offline, on image files, through the
command line run in-process; and the bad input of the new commands: one line, its exit
code, nothing changed."""

from pathlib import Path

import pytest

from engine.test_tier_cli import Run

MiB = 1 << 20


@pytest.fixture
def bs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Run:
    run = Run(tmp_path, capsys)
    images = []
    for index in range(3):
        path = tmp_path / f"d{index}.img"
        path.write_bytes(b"")
        with open(path, "r+b") as handle:
            handle.truncate(128 * MiB)
        images.append(str(path))
    run.json("pool", "create", "tank", *images, "--slab-size", "16M")
    return run


def test_volume_show_offline_maps_every_slab_to_distinct_disks(bs: Run) -> None:
    bs.json("volume", "create", "tank", "v", "--size", "40M", "--resiliency", "mirror",
            "--provisioning", "fixed")
    shown = bs.json("volume", "show", "tank", "v", "--map")
    assert shown["resiliency"] == "mirror-2"
    assert (shown["columns"], shown["width"], shown["tolerance"]) == (1, 2, 1)
    assert shown["interleave"] == 64 * 1024
    assert shown["slabs"] == shown["slabs_full"] == 3  # 40M in 16M slabs
    assert shown["allocated"] == 3 * 16 * MiB
    assert shown["extent_states"] == {"online": 6, "stale": 0, "missing": 0}
    assert sum(d["slabs"] for d in shown["disks"]) == 6
    for slab in shown["map"]:
        disks = [e["disk"] for e in slab["extents"]]
        assert len(set(disks)) == 2
        assert [e["role"] for e in slab["extents"]] == ["column 0 copy 0", "column 0 copy 1"]
        assert slab["offset"] == slab["slab"] * 16 * MiB
    assert "map" not in bs.json("volume", "show", "tank", "v")
    code, out, _ = bs("volume", "show", "tank", "v", "--map")
    assert code == 0
    assert "mirror-2" in out
    assert "online" in out


def test_volume_show_marks_the_extents_of_a_missing_disk(bs: Run) -> None:
    bs.json("volume", "create", "tank", "v", "--size", "40M", "--resiliency", "mirror",
            "--provisioning", "fixed")
    before = bs.json("volume", "show", "tank", "v", "--map")
    on_disk_2 = sum(1 for s in before["map"] for e in s["extents"] if e["disk"] == 2)
    assert on_disk_2 > 0
    (bs.root / "d2.img").unlink()
    shown = bs.json("volume", "show", "tank", "v", "--map")
    assert shown["extent_states"]["missing"] == on_disk_2
    for slab in shown["map"]:
        for extent in slab["extents"]:
            assert extent["state"] == ("missing" if extent["disk"] == 2 else "online")


def test_offline_changes_reach_the_history_and_the_event_log(bs: Run) -> None:
    bs.json("volume", "create", "tank", "v", "--size", "16M")
    bs.json("volume", "grow", "tank", "v", "--size", "32M")
    bs.json("pool", "status", "tank")  # changes nothing: not in the history
    bs("volume", "create", "tank", "v", "--size", "16M")  # fails: not in the history
    entries = bs.json("pool", "history", "tank")
    commands = [e["command"] for e in entries]
    assert commands[0].startswith("blockspace pool create tank ")
    assert commands[1:] == ["blockspace volume create tank v --size 16M",
                            "blockspace volume grow tank v --size 32M"]
    assert all(e["user"] and e["time"] > 0 for e in entries)
    events = bs.json("events", "tank")
    assert [(e["class"], e["volume"], e["size"]) for e in events] == [
        ("volume_create", "v", 16 * MiB), ("volume_grow", "v", 32 * MiB)]
    assert bs.json("events", "tank", "--last", "1") == events[-1:]
    code, out, _ = bs("pool", "history", "tank")
    assert code == 0
    assert "volume grow tank v --size 32M" in out


@pytest.mark.parametrize(("args", "code", "message"), [
    (("events", "nope"), 2, "blockspace: error: no pool named 'nope'"),
    (("events", "tank", "--last", "-1"), 2,
     "blockspace events: error: argument -n/--last: takes a number of events"),
    (("pool", "history", "nope"), 2, "blockspace: error: no pool named 'nope'"),
    (("volume", "show", "tank", "nope"), 2,
     "blockspace: error: no volume 'nope' in pool 'tank'"),
    (("iostat", "tank"), 4, "blockspace: error: pool 'tank' is not mounted"),
    (("iostat", "tank", "0"), 2, "blockspace iostat: error: argument interval: takes seconds"),
    (("iostat", "tank", "1", "0"), 2, "blockspace iostat: error: argument count: takes a "
                                      "number of reports"),
    (("mount", "tank", "MNT", "--metrics", "9469"), 2,
     "blockspace: error: --metrics takes HOST:PORT (e.g. 127.0.0.1:9469), not '9469'"),
])
def test_bad_input_is_one_line_and_changes_nothing(
    bs: Run, args: tuple[str, ...], code: int, message: str
) -> None:
    (bs.root / "MNT").mkdir()
    args = tuple(str(bs.root / "MNT") if a == "MNT" else a for a in args)
    history_before = bs.json("pool", "history", "tank")
    state_before = sorted(str(p) for p in bs.state.rglob("*"))
    got, out, err = bs(*args)
    assert got == code
    assert out == ""
    assert err.startswith(message), err
    assert len(err.strip().splitlines()) == 1
    assert bs.json("pool", "history", "tank") == history_before
    assert sorted(str(p) for p in bs.state.rglob("*")) == state_before
