"""Metadata crafted with a valid checksum (issue 17 item 5) is refused with one line at open:
offline `pool status` and `mount` alike, never a traceback, never a daemon that opens and
then dies at its first commit or write. Slots are crafted with the codec's own encoder."""

import copy
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import trio

from blockspace.cli import main as cli
from blockspace.disks.devices import Device, open_device
from blockspace.errors import FormatError
from blockspace.geometry.layouts import LayoutSpec
from blockspace.ondisk.label import compute_geometry
from blockspace.ondisk.metadata import (
    COMMIT_HEADROOM,
    MAX_GENERATION,
    PoolMetadata,
    encode_metadata,
)
from blockspace.pool.pool import Pool, newest_metadata, read_label
from blockspace.testing.memory_device import MemoryDevice

MiB = 1 << 20
Craft = Callable[[PoolMetadata], None]


def write_everywhere(devices: Sequence[Device], md: PoolMetadata) -> None:
    """`md`, encoded as the codec does, in both metadata slots of every disk."""
    image = encode_metadata(md, md.meta_slot_size)
    for device in devices:
        label = read_label(device)
        assert label is not None
        for slot in (0, 1):
            device.write_sync(label.geometry.meta_slot_offset(slot), image)
        device.flush_sync()


def top_generation(md: PoolMetadata) -> None:
    md.generation = MAX_GENERATION


def larger_than_label(md: PoolMetadata) -> None:
    """Disk 0 twice its real size, and a slab placed on extents only that size has."""
    disk = md.disks[0]
    disk.size *= 2
    disk.extent_count = compute_geometry(disk.size, md.slab_size, md.meta_slot_size).extent_count
    md.volumes[0].slabs[1] = [(0, disk.extent_count - 1), (1, 3)]


def other_slot_size(md: PoolMetadata) -> None:
    """Metadata slots twice the size the labels place: commits would overwrite the intent
    slots and beyond."""
    md.meta_slot_size *= 2
    for disk in md.disks:
        disk.extent_count = compute_geometry(disk.size, md.slab_size,
                                             md.meta_slot_size).extent_count
    md.volumes[0].slabs.clear()


CRAFTS: dict[str, tuple[Craft, str]] = {
    "generation 2^63-1": (top_generation, "pool metadata generation out of range"),
    "disk larger than its label": (larger_than_label, "gives disk 0 size"),
    "slot size not the labels'": (other_slot_size, "metadata slot size"),
}


async def crafted_pool(craft: Craft) -> list[MemoryDevice]:
    devices = [MemoryDevice(24 * MiB, path=f"mem{i}") for i in range(2)]
    pool = await Pool.create("c", devices, media=["hdd"] * 2, slab_size=MiB,
                             meta_slot_size=64 << 10)
    await pool.create_volume("v", 8 * MiB, LayoutSpec("mirror", 1, copies=2), "thin")
    md = copy.deepcopy(pool.metadata)
    md.generation += 1
    craft(md)
    write_everywhere(devices, md)
    return devices


@pytest.mark.parametrize("name", sorted(CRAFTS))
def test_crafted_metadata_is_refused_at_open_with_one_line(name: str) -> None:
    craft, message = CRAFTS[name]

    async def scenario() -> None:
        devices = await crafted_pool(craft)
        with pytest.raises(FormatError) as refused:
            await Pool.open(devices)
        assert message in str(refused.value)
        assert "\n" not in str(refused.value)

    trio.run(scenario)


def test_a_generation_just_inside_the_headroom_opens_and_commits() -> None:
    def near_top(md: PoolMetadata) -> None:
        md.generation = MAX_GENERATION - COMMIT_HEADROOM

    async def scenario() -> None:
        devices = await crafted_pool(near_top)
        pool = await Pool.open(devices)
        await pool.commit(seal=True)
        assert pool.metadata.generation == MAX_GENERATION - COMMIT_HEADROOM + 1

    trio.run(scenario)


@pytest.mark.parametrize("name", ["generation 2^63-1", "disk larger than its label"])
def test_offline_status_and_mount_refuse_crafted_metadata_with_one_line(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    craft, message = CRAFTS[name]
    state = tmp_path / "state"
    images = []
    for index in range(2):
        path = tmp_path / f"d{index}.img"
        with path.open("xb") as handle:
            handle.truncate(64 * MiB)
        images.append(str(path))

    def bs(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli.main(["--state-dir", str(state), *args])
        out, err = capsys.readouterr()
        return code, out, err

    assert bs("pool", "create", "tank", *images, "--slab-size", "4M")[0] == 0
    assert bs("volume", "create", "tank", "v", "--size", "16M", "--resiliency", "mirror")[0] == 0
    devices = [open_device(path) for path in images]
    try:
        labels = [read_label(device) for device in devices]
        members = [(device, label) for device, label in zip(devices, labels, strict=True)
                   if label is not None]
        md = copy.deepcopy(newest_metadata(members, members[0][1].pool_uuid))
        md.generation += 1
        craft(md)
        write_everywhere(devices, md)
    finally:
        for device in devices:
            device.close()

    code, out, err = bs("pool", "status", "tank")
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith("blockspace: error: ")
    assert message in err
    assert "Traceback" not in err
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    code, out, err = bs("--json", "mount", "tank", str(mountpoint))
    assert code == 1
    assert message in (json.loads(out)["error"] if out.strip() else err)
    assert "Traceback" not in err
    # Nothing was written: the same refusal again.
    assert message in bs("pool", "status", "tank")[2]
