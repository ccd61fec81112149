"""The opt-in Prometheus endpoint (`mount --metrics HOST:PORT`): prometheus_client's HTTP
server in its own thread, and one custom collector that turns the daemon's `iostat`
snapshot (service/iostat.py) into metric families at scrape time. Nothing touches a
Prometheus object per I/O; the snapshot is taken on the trio thread (`from_thread`), so a
scrape sees the counters as one consistent moment, never a dict changing under it."""

import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from blockspace.errors import InvalidInput
from blockspace.service.iostats import cumulative

log = logging.getLogger(__name__)

DISK_STATES = ("online", "missing", "failed", "retiring", "retired", "resyncing", "failing")


def _counter(name: str, doc: str, labels: list[str]) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=labels)


def families(snap: dict[str, Any]) -> list[Metric]:
    """The metric families of one snapshot (pure: the collector's whole job)."""
    pool = str(snap["pool"])
    result: list[Metric] = []

    # ---- disks
    dl = ["pool", "disk", "path"]
    disk_metrics = {
        "reads": _counter("blockspace_disk_reads_total", "Read requests completed", dl),
        "writes": _counter("blockspace_disk_writes_total", "Write requests completed", dl),
        "bytes_read": _counter("blockspace_disk_read_bytes_total", "Bytes read", dl),
        "bytes_written": _counter("blockspace_disk_written_bytes_total", "Bytes written", dl),
        "flushes": _counter("blockspace_disk_flushes_total", "Flushes (fdatasync)", dl),
    }
    errors = _counter("blockspace_disk_errors_total",
                      "Failed requests (kind: read, write, checksum; device: as the device "
                      "counted them, injected faults included)", [*dl, "kind"])
    state = GaugeMetricFamily("blockspace_disk_state", "1 for the disk's current state",
                              labels=[*dl, "state"])
    size = GaugeMetricFamily("blockspace_disk_size_bytes", "Disk size", labels=dl)
    disk_latency = HistogramMetricFamily(
        "blockspace_disk_request_latency_seconds",
        "Latency of the disk's requests that waited for it (worker-thread jobs and its own "
        "io_uring submissions; not inline cached reads or batched ring writes)", labels=dl)
    bounds = [f"{b:g}" for b in snap["latency_buckets"]] + ["+Inf"]
    for disk in snap["disks"]:
        labels = [pool, str(disk["id"]), str(disk["path"])]
        for key, family in disk_metrics.items():
            family.add_metric(labels, disk[key])
        for kind in ("read", "write", "checksum"):
            errors.add_metric([*labels, kind], disk[f"{kind}_errors"])
        errors.add_metric([*labels, "device"], disk["device_errors"])
        for name in DISK_STATES:
            state.add_metric([*labels, name], 1.0 if disk["state"] == name else 0.0)
        size.add_metric(labels, disk["size"])
        latency_counter = disk.get("latency")
        if latency_counter is not None:
            disk_latency.add_metric(labels, list(zip(
                bounds, cumulative(latency_counter["buckets"]), strict=True)),
                latency_counter["seconds"])
    result += [*disk_metrics.values(), errors, state, size, disk_latency]

    # ---- volumes
    vl = ["pool", "volume"]
    ops = {kind: _counter(f"blockspace_volume_{kind}s_total", f"{kind.title()} requests", vl)
           for kind in ("read", "write", "flush")}
    vbytes = {"read": _counter("blockspace_volume_read_bytes_total", "Bytes read", vl),
              "write": _counter("blockspace_volume_written_bytes_total", "Bytes written", vl)}
    verrors = _counter("blockspace_volume_errors_total", "Failed requests", [*vl, "op"])
    latency = {kind: HistogramMetricFamily(f"blockspace_volume_{kind}_latency_seconds",
                                           f"Latency of {kind} requests", labels=vl)
               for kind in ("read", "write", "flush")}
    vsize = GaugeMetricFamily("blockspace_volume_size_bytes", "Volume size", labels=vl)
    for name, volume in snap["volumes"].items():
        labels = [pool, name]
        for kind in ("read", "write", "flush"):
            counter = volume[kind]
            ops[kind].add_metric(labels, counter["ops"])
            verrors.add_metric([*labels, kind], counter["errors"])
            latency[kind].add_metric(labels, list(zip(bounds, cumulative(counter["buckets"]),
                                                      strict=True)), counter["seconds"])
            if kind in vbytes:
                vbytes[kind].add_metric(labels, counter["bytes"])
        if volume.get("size") is not None:
            vsize.add_metric(labels, volume["size"])
    result += [*ops.values(), *vbytes.values(), verrors, *latency.values(), vsize]

    # ---- pool capacity and allocation
    capacity = snap["capacity"]
    for key, doc in (("raw_bytes", "Raw size of all member disks"),
                     ("free_bytes", "Free space on the disks in service"),
                     ("allocated_bytes", "Disk space holding volume slabs (all copies)"),
                     ("volume_bytes", "Sum of the volumes' sizes (thin volumes may exceed "
                                      "the pool)")):
        gauge = GaugeMetricFamily(f"blockspace_pool_{key}", doc, labels=["pool"])
        gauge.add_metric([pool], capacity[key])
        result.append(gauge)

    # ---- background work
    for work, key in (("rebuild", "bytes_moved"), ("scrub", "bytes_checked")):
        progress = snap.get(work) or {}
        running = GaugeMetricFamily(f"blockspace_{work}_running", f"1 while a {work} runs",
                                    labels=["pool"])
        running.add_metric([pool], 1.0 if progress.get("state") == "running" else 0.0)
        ratio = GaugeMetricFamily(f"blockspace_{work}_progress_ratio",
                                  f"Fraction done of the running or last {work}",
                                  labels=["pool"])
        ratio.add_metric([pool], float(progress.get("percent", 0.0)) / 100.0)
        moved = GaugeMetricFamily(f"blockspace_{work}_{key}", f"Bytes of the running or "
                                  f"last {work}", labels=["pool"])
        moved.add_metric([pool], float(progress.get(key, 0)))
        result += [running, ratio, moved]

    # ---- tiers
    tl = ["pool", "volume"]
    tier_reads = _counter("blockspace_tier_reads_total", "Read pieces of a tiered volume", tl)
    tier_hits = _counter("blockspace_tier_ssd_hits_total", "Of them, served by the ssd tier",
                         tl)
    hit_ratio = GaugeMetricFamily("blockspace_tier_hit_ratio",
                                  "ssd hits / reads since the mount", labels=tl)
    for name, counters in snap.get("tiers", {}).items():
        tier_reads.add_metric([pool, name], counters["reads"])
        tier_hits.add_metric([pool, name], counters["ssd_hits"])
        reads = counters["reads"]
        hit_ratio.add_metric([pool, name], counters["ssd_hits"] / reads if reads else 0.0)
    result += [tier_reads, tier_hits, hit_ratio]

    uptime = GaugeMetricFamily("blockspace_uptime_seconds", "Seconds since the mount",
                               labels=["pool"])
    uptime.add_metric([pool], snap["uptime"])
    result.append(uptime)
    return result


class SnapshotCollector(Collector):
    """Calls `snapshot` (thread-safe: it hops to the trio thread) at each scrape."""

    def __init__(self, snapshot: Callable[[], dict[str, Any] | None]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        if snap is not None:
            yield from families(snap)


class MetricsServer:
    def __init__(self, address: tuple[str, int], snapshot: Callable[[], dict[str, Any] | None]
                 ) -> None:
        self.address = address
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(SnapshotCollector(snapshot))
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        host, port = self.address
        try:
            self._server, self._thread = start_http_server(port, host, self.registry)
        except OSError as error:
            raise InvalidInput(f"--metrics {host}:{port}: {error.strerror or error}") from None
        log.info("metrics at http://%s:%d/metrics", host, self.port)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Blocking (the server's loop polls every 0.5 s): call it off the trio thread."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
