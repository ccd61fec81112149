"""The fixed fio job set, the two modes, and parsing fio's JSON output. Pure: no I/O."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclass(frozen=True)
class Job:
    name: str  # stable key, used in JSON, --profile and targets
    label: str  # column header
    rw: str  # fio rw=
    bs: int
    iodepth: int
    metric: str  # "bw" (MiB/s) or "iops"

    @property
    def unit(self) -> str:
        return "MiB/s" if self.metric == "bw" else "IOPS"


# In this order: the reads run over data the sequential write just laid down (the region is
# also prefilled once before the first job, so no job ever reads a hole).
JOBS: tuple[Job, ...] = (
    Job("seqwrite-1m-qd4", "seq W MiB/s", "write", 1 * MiB, 4, "bw"),
    Job("seqread-1m-qd4", "seq R MiB/s", "read", 1 * MiB, 4, "bw"),
    Job("randread-4k-qd1", "4K R qd1", "randread", 4 * KiB, 1, "iops"),
    Job("randread-4k-qd16", "4K R qd16", "randread", 4 * KiB, 16, "iops"),
    Job("randwrite-4k-qd1", "4K W qd1", "randwrite", 4 * KiB, 1, "iops"),
    Job("randwrite-4k-qd16", "4K W qd16", "randwrite", 4 * KiB, 16, "iops"),
)
JOBS_BY_NAME = {job.name: job for job in JOBS}


@dataclass(frozen=True)
class Mode:
    name: str
    region: int  # bytes of the device the jobs run over (from offset 0)
    runtime: float  # seconds measured per job
    ramp: float  # seconds run before measuring
    device_size: int  # size of every device under test (ext4 of the mkfs trial needs room)
    mkfs_write: int  # bytes written by the mkfs trial


QUICK = Mode("quick", 256 * MiB, 2.0, 0.5, 1 * GiB, 256 * MiB)
FULL = Mode("full", 1 * GiB, 4.0, 1.0, 1 * GiB, 256 * MiB)
MODES = {mode.name: mode for mode in (QUICK, FULL)}


def is_nbd(filename: str) -> bool:
    return filename.startswith(("nbd://", "nbd+unix://"))


def target_args(filename: str) -> list[str]:
    """Where fio's I/O goes: a block device or file (O_DIRECT, libaio), or an NBD export by
    URI (fio's nbd engine, libnbd: no kernel device in between)."""
    if is_nbd(filename):
        return ["--ioengine=nbd", f"--uri={filename}"]
    return [f"--filename={filename}", "--direct=1", "--ioengine=libaio"]


def fio_command(
    job: Job,
    filename: str,
    mode: Mode,
    *,
    runtime: float | None = None,
    fio: str = "fio",
) -> list[str]:
    """The fio command line of one timed job on `filename` (a block device or a file)."""
    runtime = mode.runtime if runtime is None else runtime
    command = [
        fio,
        f"--name={job.name}",
        *target_args(filename),
        f"--rw={job.rw}",
        f"--bs={job.bs}",
        f"--iodepth={job.iodepth}",
        "--numjobs=1",
        "--offset=0",
        f"--size={mode.region}",
        "--time_based",
        f"--runtime={_ms(runtime)}",
        f"--ramp_time={_ms(mode.ramp)}",
        "--randrepeat=0",
        "--norandommap",
        "--output-format=json",
    ]
    return command


def prefill_command(filename: str, mode: Mode, *, fio: str = "fio") -> list[str]:
    """Write the whole region once (1 MiB, qd4), so that reads never hit holes or unallocated
    slabs and thin volumes are fully allocated before anything is timed."""
    return [
        fio,
        "--name=prefill",
        *target_args(filename),
        "--rw=write",
        f"--bs={1 * MiB}",
        "--iodepth=4",
        "--offset=0",
        f"--size={mode.region}",
        "--output-format=json",
    ]


# Integrity checks run after the timed jobs: fio writes with crc32c verify headers, then
# reads everything back and checks it. (name, rw, bs, iodepth, bytes)
VERIFY_JOBS: tuple[tuple[str, str, int, int, int], ...] = (
    ("verify-seq-1m-qd4", "write", 1 * MiB, 4, 64 * MiB),
    ("verify-rand-4k-qd16", "randwrite", 4 * KiB, 16, 16 * MiB),
)


def verify_command(filename: str, name: str, rw: str, bs: int, iodepth: int, size: int,
                   *, fio: str = "fio") -> list[str]:
    return [
        fio,
        f"--name={name}",
        *target_args(filename),
        f"--rw={rw}",
        f"--bs={bs}",
        f"--iodepth={iodepth}",
        "--offset=0",
        f"--size={size}",
        "--verify=crc32c",
        "--do_verify=1",
        "--verify_fatal=1",
        "--verify_state_save=0",
        "--randrepeat=0",
        "--output-format=json",
    ]


def verify_outcome(returncode: int, stdout: str, stderr: str) -> str:
    """"ok", or a one-line reason the data did not read back as written."""
    error = 0
    try:
        error = int(extract_json(stdout)["jobs"][0].get("error", 0) or 0)
    except (FioOutputError, KeyError, IndexError, TypeError, ValueError):
        pass
    if returncode == 0 and error == 0:
        return "ok"
    lines = [line.strip() for line in (stderr + "\n" + stdout).splitlines()
             if "verify" in line.lower() or "bad" in line.lower() or "error" in line.lower()]
    detail = lines[0] if lines else f"fio exited {returncode}"
    return f"FAILED (fio error {error}): {detail[:200]}"


def _ms(seconds: float) -> str:
    return f"{max(1, round(seconds * 1000))}ms"


@dataclass
class JobResult:
    job: str
    value: float  # in the job's unit (MiB/s or IOPS)
    bw_mib_s: float
    iops: float
    lat_mean_us: float  # completion latency
    lat_p99_us: float
    runtime_s: float
    errors: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # RSS, CPU, samples of repeats, ...

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FioOutputError(ValueError):
    pass


def extract_json(text: str) -> dict[str, Any]:
    """fio prints warnings ("fio: ...") before its JSON on stdout at times: parse from the first
    line that opens an object."""
    start = text.find("\n{")
    start = 0 if text.startswith("{") else (start + 1 if start >= 0 else -1)
    if start < 0:
        raise FioOutputError(f"no JSON object in fio output: {text[:200]!r}")
    try:
        data = json.loads(text[start:])
    except json.JSONDecodeError as error:
        raise FioOutputError(f"fio output is not valid JSON: {error}") from None
    if not isinstance(data, dict) or not data.get("jobs"):
        raise FioOutputError("fio JSON has no jobs")
    return data


def parse_fio(text: str | dict[str, Any], job: Job) -> JobResult:
    """The figures of one fio run of `job` (its JSON output, as text or parsed)."""
    data = extract_json(text) if isinstance(text, str) else text
    stats = data["jobs"][0]
    side = stats["write" if "write" in job.rw else "read"]
    bw_mib_s = float(side.get("bw_bytes", side.get("bw", 0) * 1024)) / MiB
    iops = float(side.get("iops", 0.0))
    clat = side.get("clat_ns") or side.get("lat_ns") or {}
    percentiles = clat.get("percentile") or {}
    p99 = _percentile(percentiles, 99.0)
    value = bw_mib_s if job.metric == "bw" else iops
    return JobResult(
        job=job.name,
        value=value,
        bw_mib_s=bw_mib_s,
        iops=iops,
        lat_mean_us=float(clat.get("mean", 0.0)) / 1000.0,
        lat_p99_us=p99 / 1000.0,
        runtime_s=float(side.get("runtime", 0)) / 1000.0,
        errors=int(stats.get("error", 0) or 0),
    )


def _percentile(percentiles: dict[str, Any], wanted: float) -> float:
    best: tuple[float, float] | None = None
    for key, value in percentiles.items():
        try:
            distance = abs(float(key) - wanted)
        except ValueError:
            continue
        if best is None or distance < best[0]:
            best = (distance, float(value))
    return best[1] if best is not None else 0.0


def median_result(results: list[JobResult]) -> JobResult:
    """Of several repeats of one job, the one with the median value (the others' values are
    kept in extra["samples"])."""
    if not results:
        raise ValueError("no results")
    ordered = sorted(results, key=lambda r: r.value)
    chosen = ordered[(len(ordered) - 1) // 2]
    if len(results) > 1:
        chosen.extra["samples"] = [r.value for r in results]
    return chosen


def format_value(value: float | None, metric: str) -> str:
    """2399 (MiB/s), 10.5k / 950 (IOPS); "-" for a missing figure."""
    if value is None:
        return "-"
    if metric == "bw":
        return f"{value:.0f}" if value >= 10 else f"{value:.1f}"
    if value >= 10000:
        return f"{value / 1000:.1f}k"
    if value >= 1000:
        return f"{value / 1000:.2f}k"
    return f"{value:.0f}"
