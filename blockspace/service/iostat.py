"""The `iostat` control request: one document of every counter the daemon keeps — per
volume (operations, bytes, errors, latency histograms of the served files), per disk (the
devices' own counters and the pool's error counts), capacity, rebuild, scrub and tier hit
ratio. `blockspace iostat` turns two of them into rates; the Prometheus endpoint
(service/metrics.py) exposes one per scrape. Reading it costs a walk over disks and
volumes, nothing that grows with the data."""

from dataclasses import asdict
from typing import Any

from blockspace.geometry.layouts import LayoutSpec
from blockspace.pool.pool import Pool
from blockspace.service.iostats import IoStats, VolumeIO


def disk_counters(pool: Pool) -> list[dict[str, Any]]:
    disks = []
    for disk_id, disk in sorted(pool.disks.items()):
        device = disk.device if disk.device is not None else disk.returned
        stats = asdict(device.statistics()) if device is not None else {}
        disks.append({
            "id": disk_id,
            "path": disk.path,
            "media": disk.record.media,
            "state": disk.record.state,
            "reads": int(stats.get("reads", 0)),
            "writes": int(stats.get("writes", 0)),
            "bytes_read": int(stats.get("bytes_read", 0)),
            "bytes_written": int(stats.get("bytes_written", 0)),
            "flushes": int(stats.get("flushes", 0)),
            "device_errors": int(stats.get("errors", 0)),
            "read_errors": disk.errors["read"],
            "write_errors": disk.errors["write"],
            "checksum_errors": disk.errors["checksum"],
            "size": disk.record.size,
            "extents": disk.record.extent_count,
            "latency": device.request_latency().to_dict() if device is not None else None,
        })
    return disks


def capacity(pool: Pool) -> dict[str, int]:
    free_map = pool.allocator.free_map()
    raw = sum(d.record.extent_count for d in pool.disks.values()) * pool.slab_size
    free = sum(free_map.get(i, 0) for i, d in pool.disks.items() if d.usable) * pool.slab_size
    allocated = sum(len(v.slabs) * LayoutSpec.from_dict(v.layout).width
                    for v in pool.metadata.volumes) * pool.slab_size
    return {"raw_bytes": raw, "free_bytes": free, "allocated_bytes": allocated,
            "volume_bytes": sum(v.size for v in pool.metadata.volumes)}


def snapshot(pool: Pool, io: IoStats, *, pool_name: str, rebuild: dict[str, Any] | None,
             scrub: dict[str, Any], tier_counters: dict[str, dict[str, int]]) -> dict[str, Any]:
    result = io.snapshot()
    sizes = {v.name: v.size for v in pool.metadata.volumes}
    # Every volume, idle ones too (zeros until their first request): a scrape sees a
    # series from the start, not once it moved.
    volumes = {name: VolumeIO().to_dict() for name in sizes} | result["volumes"]
    result["volumes"] = {name: volumes[name] for name in sorted(volumes)}
    for name, counters in result["volumes"].items():
        counters["size"] = sizes.get(name)
    result.update({
        "pool": pool_name,
        "disks": disk_counters(pool),
        "capacity": capacity(pool),
        "rebuild": rebuild,
        "scrub": scrub,
        "tiers": tier_counters,
    })
    return result


# ---- rates, for `blockspace iostat` (pure) -----------------------------------------------


def _delta(new: float, old: float) -> float:
    return new - old if new >= old else new  # a counter reset (disk re-opened): from zero


def volume_rates(new: dict[str, Any], old: dict[str, Any] | None, seconds: float
                 ) -> dict[str, float | None]:
    """Operations/s, bytes/s and mean latency (s) of reads and writes of one volume between
    two snapshots' entries (`old` None: since the daemon started)."""
    result: dict[str, float | None] = {}
    for kind in ("read", "write"):
        now = new[kind]
        then = old[kind] if old is not None else {"ops": 0, "bytes": 0, "seconds": 0.0,
                                                   "errors": 0}
        ops = _delta(now["ops"], then["ops"])
        result[f"{kind}_ops"] = ops / seconds if seconds > 0 else 0.0
        result[f"{kind}_bytes"] = _delta(now["bytes"], then["bytes"]) / seconds \
            if seconds > 0 else 0.0
        result[f"{kind}_latency"] = _delta(now["seconds"], then["seconds"]) / ops if ops else None
        result[f"{kind}_errors"] = _delta(now["errors"], then["errors"])
    return result


def disk_rates(new: dict[str, Any], old: dict[str, Any] | None, seconds: float
               ) -> dict[str, float | None]:
    """Operations/s and bytes/s of one disk, its new errors, and the mean latency (s) of
    its requests that waited for the disk (None: there were none)."""
    result: dict[str, float | None] = {}
    for key, name in (("reads", "read_ops"), ("writes", "write_ops"),
                      ("bytes_read", "read_bytes"), ("bytes_written", "write_bytes")):
        then = old[key] if old is not None else 0
        result[name] = _delta(new[key], then) / seconds if seconds > 0 else 0.0
    errors = ("read_errors", "write_errors", "checksum_errors")
    result["errors"] = sum(_delta(new[k], old[k] if old is not None else 0) for k in errors)
    now, then = new.get("latency"), (old or {}).get("latency")
    result["latency"] = None
    if now is not None:
        ops = _delta(now["ops"], then["ops"] if then else 0)
        seconds = _delta(now["seconds"], then["seconds"] if then else 0.0)
        result["latency"] = seconds / ops if ops else None
    return result


def report(new: dict[str, Any], old: dict[str, Any] | None) -> dict[str, Any]:
    """One `iostat` report: rates between two snapshots, or since the mount."""
    seconds = new["uptime"] - (old["uptime"] if old is not None else 0.0)
    old_volumes = old["volumes"] if old is not None else {}
    old_disks = {d["id"]: d for d in old["disks"]} if old is not None else {}
    volumes = [{"name": name, **volume_rates(v, old_volumes.get(name), seconds)}
               for name, v in new["volumes"].items()]
    disks = [{"id": d["id"], "path": d["path"], "state": d["state"],
              **disk_rates(d, old_disks.get(d["id"]), seconds)} for d in new["disks"]]
    total: dict[str, float] = {}
    for key in ("read_ops", "write_ops", "read_bytes", "write_bytes"):
        total[key] = sum(float(v[key] or 0.0) for v in volumes)
    return {"pool": new["pool"], "interval": seconds, "capacity": new["capacity"],
            "total": total, "volumes": volumes, "disks": disks}
