"""Tier commands on an unmounted pool: bad input is one clear line, exits non-zero and
changes nothing; status and pins work offline from the metadata."""

import json
from pathlib import Path
from typing import Any

import pytest

from blockspace.cli import main as cli

MiB = 1 << 20


class Run:
    """The CLI in this process, on a state directory under `root` (test_observe_cli too)."""

    def __init__(self, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.root = root
        self.state = root / "state"
        self.capsys = capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        code = cli.main(["--state-dir", str(self.state), *args])
        out, err = self.capsys.readouterr()
        return code, out, err

    def json(self, *args: str) -> Any:
        code, out, err = self("--json", *args)
        assert code == 0, err
        return json.loads(out)


@pytest.fixture
def bs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Run:
    run = Run(tmp_path, capsys)
    images = []
    for index, media in enumerate(["ssd", "ssd", "hdd", "hdd", "hdd"]):
        path = tmp_path / f"{media}{index}.img"
        path.write_bytes(b"")
        with open(path, "r+b") as handle:
            handle.truncate(80 * MiB)
        images.append(str(path))
    run.json("pool", "create", "tank", *images[:2], "--media", "ssd", "--slab-size", "8M")
    run.json("disk", "add", "tank", *images[2:], "--media", "hdd")
    run.json("volume", "create", "tank", "plain", "--size", "8M")
    return run


BAD = [
    (["volume", "create", "tank", "t", "--tier", "ssd:8M:mirror-2"], "exactly one"),
    (["volume", "create", "tank", "t", "--tier", "ssd:8M:mirror-2", "--tier",
      "ssd:8M:mirror-2"], "exactly one"),
    (["volume", "create", "tank", "t", "--tier", "ssd:8M:mirror-2", "--tier",
      "hdd:32M:parity-1", "--size", "1G"], "leave out --size"),
    (["volume", "create", "tank", "t", "--tier", "ssd:8M:mirror-2", "--tier",
      "hdd:32M:parity-1", "--resiliency", "mirror"], "per tier"),
    (["volume", "create", "tank", "t", "--tier", "ssd:8M", "--tier", "hdd:32M:parity-1"],
     "MEDIA:SIZE:RESILIENCY"),
    (["volume", "create", "tank", "t", "--tier", "ssd:8M:raid6", "--tier",
      "hdd:32M:parity-1"], "resiliency"),
    (["volume", "create", "tank", "t", "--tier", "ssd:8M:mirror-3", "--tier",
      "hdd:32M:parity-1"], "ssd tier"),
    (["volume", "create", "tank", "t", "--tier", "ssd:1G:mirror-2", "--tier",
      "hdd:32M:parity-1"], "not enough free space on the ssd disks"),
    (["volume", "create", "tank", "t", "--tier", "ssd:8M:mirror-2", "--tier",
      "hdd:32M:parity-1", "--tier-unit", "96K"], "stripes"),
    (["volume", "create", "tank", "fast.ssd", "--size", "8M"], "already exists"),
    (["tier", "optimize", "tank", "fast"], "not mounted"),
    (["tier", "status", "tank", "plain"], "not tiered"),
    (["tier", "status", "tank", "nosuch"], "no volume"),
    (["tier", "pin", "tank", "fast", "--tier", "ssd", "--offset", "1000"], "4K"),
    (["tier", "pin", "tank", "fast", "--tier", "ssd", "--offset", "0", "--length", "16M"],
     "ssd tier holds"),
    (["tier", "pin", "tank", "fast", "--tier", "ssd", "--offset", "40M"], "past the end"),
    (["tier", "pin", "tank", "fast", "--tier", "nvme"], "invalid choice"),
    (["volume", "grow", "tank", "fast", "--size", "64M"], "cannot grow"),
    (["volume", "delete", "tank", "fast.ssd"], "tier of tiered volume"),
]


def test_bad_tier_input_changes_nothing(bs: Run) -> None:
    bs.json("volume", "create", "tank", "fast", "--tier", "ssd:8M:mirror-2", "--tier",
            "hdd:32M:parity-1", "--tier-unit", "256K")
    bs.json("volume", "create", "tank", "plain.hdd", "--size", "8M")
    cases = [*BAD, (["volume", "create", "tank", "plain", "--tier", "ssd:8M:mirror-2",
                     "--tier", "hdd:32M:parity-1"], "already exists")]  # plain.hdd is taken
    before = bs.json("pool", "status", "tank")
    for args, message in cases:
        code, out, err = bs(*args)
        assert code != 0, args
        assert out == "", args
        assert len(err.strip().splitlines()) == 1, (args, err)
        assert message is None or message in err, (args, err)
    after = bs.json("pool", "status", "tank")
    assert after["generation"] == before["generation"]
    assert after["volumes"] == before["volumes"]


def test_offline_status_and_pins(bs: Run) -> None:
    volume = bs.json("volume", "create", "tank", "fast", "--tier", "ssd:8M:mirror-2", "--tier",
                     "hdd:30M:parity-1", "--tier-unit", "256K")
    assert volume["size"] == 30 * MiB
    assert volume["tiered"] is True
    names = {v["name"]: v for v in bs.json("volume", "list", "tank")}
    assert names["fast.ssd"]["tier_of"] == "fast"
    status = bs.json("tier", "status", "tank")
    assert [s["name"] for s in status] == ["fast"]
    assert status[0]["ssd"]["slots"] == 32
    assert status[0]["hit_ratio"] is None
    pinned = bs.json("tier", "pin", "tank", "fast", "--tier", "hdd", "--offset", "1M")
    assert pinned["pins"] == [{"offset": MiB, "length": 29 * MiB, "tier": "hdd"}]
    code, out, _ = bs("tier", "status", "tank", "fast")
    assert code == 0
    assert "pinned to hdd" in out
    assert "not mounted" in out
    assert bs.json("tier", "unpin", "tank", "fast")["pins"] == []
    bs.json("volume", "delete", "tank", "fast")
    assert {v["name"] for v in bs.json("volume", "list", "tank")} == {"plain"}
