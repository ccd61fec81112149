"""`volume show`: where a volume's data lives. Its layout and size, the slabs each disk
holds, and (`--map`) every slab's extents with the state of each: online (served), stale
(awaiting a resync: a returning disk's catch-up) or missing (its disk out of service).

Built from the pool as either side has it (the daemon's, or one opened offline); reads the
slab map only, no data."""

from typing import Any

from blockspace.errors import InvalidInput
from blockspace.geometry.layouts import LayoutSpec
from blockspace.ondisk.metadata import VolumeRecord
from blockspace.pool.pool import Pool


def role(spec: LayoutSpec, position: int) -> str:
    """What an extent position holds. Mirror: copy j of column c sits at c * copies + j;
    parity rotates by row, so every position holds data and parity in turn."""
    if spec.kind == "mirror":
        return f"column {position // spec.copies} copy {position % spec.copies}"
    if spec.kind == "parity":
        return "data+parity (rotating)"
    return f"column {position}"


def extent_state(pool: Pool, disk_id: int, extent: int, *, mounted: bool) -> str:
    disk = pool.disks.get(disk_id)
    if disk is None or disk.device is None or not disk.usable:
        return "missing"
    if (disk_id, extent) in pool.resyncing:
        return "stale"
    if not mounted and disk.record.state == "resyncing":
        return "stale"  # offline nobody knows which extents the resync had done
    return "online"


def find_volume(pool: Pool, name: str, pool_name: str) -> VolumeRecord:
    for record in pool.metadata.volumes:
        if record.name == name:
            return record
    raise InvalidInput(f"no volume {name!r} in pool {pool_name!r}")


def placement(pool: Pool, name: str, *, pool_name: str, with_map: bool, mounted: bool
              ) -> dict[str, Any]:
    record = find_volume(pool, name, pool_name)
    spec = LayoutSpec.from_dict(record.layout)
    slab_data = spec.slab_data_size(pool.slab_size)
    per_disk: dict[int, int] = {disk_id: 0 for disk_id in pool.disks}
    states = {"online": 0, "stale": 0, "missing": 0}
    slabs = []
    for index in sorted(record.slabs):
        extents = []
        for position, (disk_id, extent) in enumerate(record.slabs[index]):
            per_disk[disk_id] = per_disk.get(disk_id, 0) + 1
            state = extent_state(pool, disk_id, extent, mounted=mounted)
            states[state] += 1
            extents.append({"position": position, "role": role(spec, position),
                            "disk": disk_id, "extent": extent, "state": state})
        slabs.append({"slab": index, "offset": index * slab_data, "length": slab_data,
                      "extents": extents})
    disks = []
    for disk_id, count in sorted(per_disk.items()):
        disk = pool.disks.get(disk_id)
        disks.append({"id": disk_id, "path": disk.path if disk else None,
                      "state": disk.record.state if disk else "unknown", "slabs": count})
    result: dict[str, Any] = {
        "pool": pool_name,
        "name": record.name,
        "uuid": record.uuid,
        "size": record.size,
        "resiliency": spec.describe(),
        "layout": spec.to_dict(),
        "columns": spec.columns,
        "width": spec.width,
        "tolerance": spec.tolerance,
        "interleave": spec.interleave,
        "provisioning": record.provisioning,
        "slab_size": pool.slab_size,
        "slab_data_size": slab_data,
        "slabs": len(record.slabs),
        "slabs_full": -(-record.size // slab_data),
        "allocated": len(record.slabs) * slab_data,
        "footprint": len(record.slabs) * spec.width * pool.slab_size,
        "extent_states": states,
        "disks": disks,
        "tiers": ({"ssd": record.tiers.ssd, "hdd": record.tiers.hdd, "unit": record.tiers.unit}
                  if record.tiers is not None else None),
    }
    if with_map:
        result["map"] = slabs
    return result
