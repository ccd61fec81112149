"""The "tiers" key of a volume in the pool metadata: round trips, and crafted or damaged
tier descriptions rejected cleanly (FormatError, never a crash)."""

import copy
import json
from typing import Any

import pytest

from blockspace.errors import FormatError
from blockspace.ondisk.metadata import (
    PoolMetadata,
    TierInfo,
    VolumeRecord,
    decode_metadata,
    encode_metadata,
    validate,
)
from unit.test_metadata import SLOT, document, reject, sample, seal, uid

MIB = 1 << 20
UNIT = 1 * MIB


def tiered_sample() -> PoolMetadata:
    """sample() plus a tiered volume "fast" (64M) with its tiers fast.ssd (8M), fast.hdd."""
    md = sample()
    lay = {"kind": "mirror", "columns": 1, "copies": 2, "parity": 0, "interleave": 65536}
    md.volumes += [
        VolumeRecord("fast", uid(10), 64 * MIB, dict(lay), "thin", {}, 1.0,
                     TierInfo(UNIT, "fast.ssd", "fast.hdd", {0: (3, False), 5: (0, True)},
                              [(0, 4 * MIB, "ssd"), (32 * MIB, 4096, "hdd")])),
        VolumeRecord("fast.ssd", uid(11), 8 * MIB, dict(lay), "thin", {}, 1.0),
        VolumeRecord("fast.hdd", uid(12), 64 * MIB, dict(lay), "thin", {}, 1.0),
    ]
    return md


def test_tiers_round_trip() -> None:
    md = tiered_sample()
    raw = encode_metadata(md, SLOT)
    decoded = decode_metadata(raw)
    assert decoded == md
    assert decoded.volume("fast").tiers == md.volume("fast").tiers
    assert decoded.volume("home").tiers is None


def test_untiered_volumes_encode_without_the_key() -> None:
    doc = document(sample())
    assert all("tiers" not in v for v in doc["volumes"])
    doc = document(tiered_sample())
    fast = next(v for v in doc["volumes"] if v["name"] == "fast")
    assert fast["tiers"]["map"] == [0, 3, 0, 5, 0, 1]


def tampered(path: list[Any], value: Any) -> bytes:
    doc = document(tiered_sample())
    fast = next(v for v in doc["volumes"] if v["name"] == "fast")
    target: Any = fast
    for part in path[:-1]:
        target = target[part]
    if value is DELETE:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return seal(doc)


DELETE = object()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (["tiers"], None),
        (["tiers"], []),
        (["tiers"], "x"),
        (["tiers", "unit"], DELETE),
        (["tiers", "extra"], 1),
        (["tiers", "unit"], 0),
        (["tiers", "unit"], 1000),
        (["tiers", "unit"], True),
        (["tiers", "unit"], 1 << 40),
        (["tiers", "unit"], 3 * MIB),  # 64M volume is not a whole number of 3M units
        (["tiers", "ssd"], "nosuch"),
        (["tiers", "ssd"], "fast"),  # itself
        (["tiers", "ssd"], "fast.hdd"),  # both tiers the same volume
        (["tiers", "ssd"], 7),
        (["tiers", "ssd"], ["fast.ssd"]),
        (["tiers", "hdd"], "home"),  # 200M: not the volume's size
        (["tiers", "map"], {"0": 1}),
        (["tiers", "map"], [0, 3]),
        (["tiers", "map"], [0, 3, 2]),  # dirty flag 2
        (["tiers", "map"], [0, 3, True]),
        (["tiers", "map"], [0, 3, 0, 0, 4, 0]),  # unit 0 twice
        (["tiers", "map"], [5, 3, 0, 0, 4, 0]),  # not ascending
        (["tiers", "map"], [0, 3, 0, 1, 3, 0]),  # slot 3 twice
        (["tiers", "map"], [64, 0, 0]),  # unit beyond the volume
        (["tiers", "map"], [0, 8, 0]),  # slot beyond the ssd tier (8 slots)
        (["tiers", "map"], [-1, 0, 0]),
        (["tiers", "map"], [0, 1.5, 0]),
        (["tiers", "pins"], {}),
        (["tiers", "pins"], [[0, 4096]]),
        (["tiers", "pins"], [[0, 4096, "nvme"]]),
        (["tiers", "pins"], [[1, 4096, "ssd"]]),  # not aligned
        (["tiers", "pins"], [[0, 0, "ssd"]]),
        (["tiers", "pins"], [[0, 128 * MIB, "ssd"]]),  # past the end
        (["tiers", "pins"], [[0, 8192, "ssd"], [4096, 4096, "hdd"]]),  # overlap
        (["tiers", "pins"], [[8192, 4096, "ssd"], [0, 4096, "hdd"]]),  # not ascending
        (["tiers", "pins"], [[0, 4096, "ssd"]] * 65),
        (["tiers", "pins"], [[0, True, "ssd"]]),
        (["slabs"], [[0, 0, 5, 1, 5]]),  # a tiered volume owns no slabs
    ],
)
def test_crafted_tiers_rejected(path: list[Any], value: Any) -> None:
    reject(tampered(path, value))


def test_tier_claimed_twice_or_tiered_tier_rejected() -> None:
    doc = document(tiered_sample())
    second = copy.deepcopy(next(v for v in doc["volumes"] if v["name"] == "fast"))
    second.update(name="fast2", uuid=uid(20))
    reject(seal({**doc, "volumes": [*doc["volumes"], second]}), "claimed")
    doc = document(tiered_sample())
    hdd = next(v for v in doc["volumes"] if v["name"] == "fast.hdd")
    fast = next(v for v in doc["volumes"] if v["name"] == "fast")
    hdd["tiers"] = copy.deepcopy(fast["tiers"])
    reject(seal(doc))


def test_validate_direct_objects() -> None:
    md = tiered_sample()
    md.volume("fast").tiers.map[1] = (3, False)  # type: ignore[union-attr]
    with pytest.raises(FormatError, match="twice"):
        validate(md)
    md = tiered_sample()
    md.volume("fast").tiers = {"unit": UNIT}  # type: ignore[assignment]
    with pytest.raises(FormatError):
        validate(md)
    md = tiered_sample()
    md.volume("fast").tiers.map[1] = [4, False]  # type: ignore[union-attr,index]
    with pytest.raises(FormatError):
        validate(md)


def test_garbage_tiers_never_crash() -> None:
    import random

    rng = random.Random(5)
    values: list[Any] = [None, True, -1, 0, 1 << 70, 1.5, "", "ssd", [], {}, [[]], [None],
                         {"a": 1}, [1, 2, 3], ["x", 1, 2]]
    for _ in range(300):
        doc = document(tiered_sample())
        fast = next(v for v in doc["volumes"] if v["name"] == "fast")
        key = rng.choice(sorted(fast["tiers"]))
        fast["tiers"][key] = rng.choice(values)
        raw = seal(json.loads(json.dumps(doc)))
        try:
            decode_metadata(raw)
        except FormatError:
            pass
