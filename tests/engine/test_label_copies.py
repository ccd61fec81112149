"""A damaged label copy is rewritten from the good one (issue 17 item 5): at mount (the
bring-up), by an offline command that changes the pool, and by scrub, reported in the log
and the scrub summary; a read-only command (`pool status`) changes nothing."""

import dataclasses
import json
import logging
import os
from pathlib import Path

import pytest
import trio

from blockspace.cli import main as cli
from blockspace.disks.devices import open_device
from blockspace.ondisk.label import LABEL_SIZE, decode_label, encode_label
from blockspace.pool.label_copies import plan_repair, repair_label_copies
from blockspace.pool.pool import Pool
from blockspace.repair.scrub import Scrubber
from blockspace.service.bringup import bring_up
from blockspace.testing.memory_device import MemoryDevice

MiB = 1 << 20


def offsets(pool: Pool, disk_id: int) -> dict[str, int]:
    return {"primary": 0, "backup": pool.disks[disk_id].geometry.backup_label_offset}


def damage(data: bytearray, offset: int, how: str, other: bytes) -> None:
    if how == "zeros":
        data[offset : offset + LABEL_SIZE] = bytes(LABEL_SIZE)
    elif how == "bitflip":  # inside the JSON body: the checksum no longer matches
        data[offset + 40] ^= 0x10
    else:  # a valid label, of another disk
        data[offset : offset + LABEL_SIZE] = other


async def make_pool() -> tuple[Pool, list[MemoryDevice]]:
    devices = [MemoryDevice(12 * MiB, path=f"mem{i}") for i in range(3)]
    pool = await Pool.create("l", devices, media=["hdd"] * 3, slab_size=MiB,
                             meta_slot_size=64 << 10)
    return pool, devices


def label_bytes(device: MemoryDevice, offset: int) -> bytes:
    return bytes(device.data[offset : offset + LABEL_SIZE])


# A primary that is a valid label of another disk makes the device that disk (a copy of it,
# refused at open), so "another disk's label" is a damage of the backup copy only.
@pytest.mark.parametrize(("which", "how"), [
    ("primary", "zeros"), ("primary", "bitflip"),
    ("backup", "zeros"), ("backup", "bitflip"), ("backup", "other-disk"),
])
def test_mount_rewrites_a_damaged_label_copy_from_the_good_one(
    which: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        pool, devices = await make_pool()
        where = offsets(pool, 1)
        good = label_bytes(devices[1], 0)
        assert label_bytes(devices[1], where["backup"]) == good
        damage(devices[1].data, where[which], how, label_bytes(devices[2], 0))
        untouched = [label_bytes(devices[i], 0) for i in (0, 2)]
        with caplog.at_level(logging.WARNING):
            opened, _ = await bring_up(devices)
        assert label_bytes(devices[1], where["primary"]) == good
        assert label_bytes(devices[1], where["backup"]) == good
        assert [label_bytes(devices[i], 0) for i in (0, 2)] == untouched
        assert f"{which} label" in caplog.text
        assert f"rewritten from the {'backup' if which == 'primary' else 'primary'}" \
            in caplog.text
        assert {d.record.state for d in opened.disks.values()} == {"online"}

    trio.run(scenario)


@pytest.mark.parametrize("which", ["primary", "backup"])
def test_scrub_rewrites_a_damaged_label_copy_and_reports_it(which: str) -> None:
    async def scenario() -> None:
        pool, devices = await make_pool()
        where = offsets(pool, 2)
        good = label_bytes(devices[2], 0)
        damage(devices[2].data, where[which], "bitflip", b"")  # while in service
        scrubber = Scrubber(lambda: {}, lambda _: None,
                            check_labels=lambda: repair_label_copies(pool))
        scrubber.plan(None, 0)
        await scrubber.run()
        report = scrubber.progress.report.to_dict()
        assert len(report["labels_repaired"]) == 1
        assert report["labels_repaired"][0].startswith(f"disk 2 (mem2): {which} label ")
        assert label_bytes(devices[2], where[which]) == good
        scrubber.plan(None, 0)  # nothing more to do
        await scrubber.run()
        assert scrubber.progress.report.labels_repaired == []

    trio.run(scenario)


def test_two_good_copies_or_none_are_left_alone() -> None:
    async def scenario() -> None:
        pool, devices = await make_pool()
        label = bytes(devices[0].data[:LABEL_SIZE])
        backup = pool.disks[0].geometry.backup_label_offset
        disk_uuid = pool.disks[0].record.disk_uuid
        assert plan_repair(label, label, pool.uuid, disk_uuid) is None
        assert plan_repair(bytes(LABEL_SIZE), bytes(LABEL_SIZE), pool.uuid, disk_uuid) is None
        # Both valid but different (a newer label written on one copy only): no guessing.
        decoded = decode_label(label)
        assert decoded is not None
        renamed = encode_label(dataclasses.replace(decoded, pool_name="renamed"))
        assert plan_repair(label, renamed, pool.uuid, disk_uuid) is None
        repair = plan_repair(label, bytes(LABEL_SIZE), pool.uuid, disk_uuid)
        assert repair is not None
        assert repair.damaged == "backup"
        assert repair.raw == label
        assert repair.reason == "all zeros: rewritten from the primary"
        assert await repair_label_copies(pool) == []
        assert bytes(devices[0].data[backup : backup + LABEL_SIZE]) == label

    trio.run(scenario)


def test_offline_writing_commands_repair_labels_and_status_does_not(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "state"
    images = []
    for index in range(2):
        path = tmp_path / f"d{index}.img"
        with path.open("xb") as handle:
            handle.truncate(64 * MiB)
        images.append(str(path))

    def bs(*args: str) -> dict[str, object]:
        capsys.readouterr()
        code = cli.main(["--state-dir", str(state), "--json", *args])
        out, err = capsys.readouterr()
        assert code == 0, err
        return dict(json.loads(out)) if out.strip().startswith("{") else {}

    bs("pool", "create", "tank", *images, "--slab-size", "4M")
    with open(images[0], "rb") as handle:
        good = handle.read(LABEL_SIZE)
    with open(images[0], "r+b") as handle:
        handle.write(bytes(LABEL_SIZE))  # the primary copy lost
    bs("pool", "status", "tank")
    with open(images[0], "rb") as handle:
        assert handle.read(LABEL_SIZE) == bytes(LABEL_SIZE)  # a read-only command
    bs("volume", "create", "tank", "v", "--size", "8M", "--resiliency", "mirror")
    with open(images[0], "rb") as handle:
        assert handle.read(LABEL_SIZE) == good
    device = open_device(images[0], writable=False)
    try:
        assert device.read_sync(0, LABEL_SIZE) == good
    finally:
        device.close()
    assert os.path.getsize(images[0]) == 64 * MiB
