"""`pool status` through the command line: the status:/action: lines and their --json keys,
long paths folded at 80 columns, and the JSON contract's "json_version" on every object
document (lists stay lists)."""

from pathlib import Path

import pytest

from tests.engine.test_cli import blockspace, make_disks, ok, ok_json

MiB = 1 << 20
LONG_DIR = "a-very-long-directory-name-for-the-disk-images-of-this-pool"


@pytest.fixture
def pool(tmp_path: Path) -> Path:
    """Pool `p`: 3 disks of 256M under a long directory name, a 2G thin mirror volume (more
    than the pool holds) and a 32M fixed one."""
    images = tmp_path / LONG_DIR
    images.mkdir()
    make_disks(images, {f"disk-{i}.img": 256 * MiB for i in range(3)})
    state = tmp_path / "state"
    ok(state, "pool", "create", "p", *(str(images / f"disk-{i}.img") for i in range(3)),
       "--slab-size", "16M", cwd=tmp_path)
    ok(state, "volume", "create", "p", "thin", "--size", "2G", "--resiliency", "mirror",
       cwd=tmp_path)
    ok(state, "volume", "create", "p", "fixed", "--size", "32M", "--provisioning", "fixed",
       "--resiliency", "mirror", cwd=tmp_path)
    return tmp_path


def test_thin_overcommit_is_reported_as_configured(pool: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    state = pool / "state"
    status = ok_json(state, "pool", "status", "p", cwd=pool)
    assert "thin mirror-2 volumes promise 2G, more than 100% of the" in status["status"]
    assert any(a.startswith("add disks before the volumes fill up") for a in status["actions"])
    config = pool / "blockspace.toml"
    config.write_text("[thresholds]\nthin_overcommit_percent = 1000\n")
    monkeypatch.setenv("BLOCKSPACE_CONFIG", str(config))
    status = ok_json(state, "pool", "status", "p", cwd=pool)
    assert status["status"] == "the pool is online; no action needed"
    assert status["actions"] == []


def test_a_missing_disk_gets_status_and_action_lines(pool: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # Wide enough for any tmp path (pytest-xdist's are longer): folding is the next test's
    monkeypatch.setenv("COLUMNS", "400")
    state = pool / "state"
    (pool / LONG_DIR / "disk-1.img").rename(pool / "elsewhere.img")
    status = ok_json(state, "pool", "status", "p", cwd=pool)
    assert status["health"] == "degraded"
    assert f"disk 1 ({pool / LONG_DIR / 'disk-1.img'}) is missing" in status["status"]
    assert "automatic repair is not running: the pool is not mounted" in status["status"]
    assert any("`blockspace disk online p 1`" in a for a in status["actions"])
    text = ok(state, "pool", "status", "p", cwd=pool).out
    lines = text.splitlines()
    assert lines[2].startswith("status: disk 1 (")  # right under the pool's header
    assert any(line.startswith("action: reconnect it") for line in lines)


def test_long_paths_fold_at_80_columns(pool: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    text = ok(pool / "state", "pool", "status", "p", cwd=pool).out
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    rows = [line.split("│") for line in text.splitlines() if line.startswith("│")]
    paths: dict[str, str] = {}
    disk_id = ""
    for cells in rows:
        if len(cells) != 10:  # the disks table: 8 columns
            continue
        disk_id = cells[1].strip() or disk_id
        paths[disk_id] = paths.get(disk_id, "") + cells[2].strip()
    assert paths == {str(i): str(pool / LONG_DIR / f"disk-{i}.img") for i in range(3)}


def test_every_object_document_has_the_json_version(pool: Path) -> None:
    state = pool / "state"
    for command in (["pool", "status", "p"], ["volume", "show", "p", "thin"],
                    ["config", "show"]):
        document = ok_json(state, *command, cwd=pool)
        assert document["json_version"] == 1, command
    listed = ok_json(state, "pool", "list", cwd=pool)
    assert isinstance(listed, list)
    assert [p["name"] for p in listed] == ["p"]
    assert "json_version" not in listed[0]  # items of a list are not documents of their own
    error = blockspace(state, "pool", "status", "nope", "--json", cwd=pool)
    assert error.rc == 2
    assert error.json()["json_version"] == 1
