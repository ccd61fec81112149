"""Ratios, targets and the Markdown tables of one run. Pure: works on the results dict.

The results dict (also what goes to the JSON file, plus "ratios" and "targets"):

    {"meta": {...},
     "setups": {"mirror-2": {"label": ..., "group": ..., "status": "ok" | "failed" |
                             "unavailable", "reason": "...",
                             "jobs": {"randread-4k-qd16": {JobResult fields}, ...},
                             "mkfs": {"mkfs_s": ..., ..., "hash_ok": true},
                             "daemon": {"pid": ..., "rss_kib": {job: kib}, "hwm_kib": ...,
                                        "cpu": {job: cores}}}}}
"""

from __future__ import annotations

from typing import Any

from bench_lib.catalog import RATIO_REFERENCES, SETUPS_BY_NAME, TARGETS, Target
from bench_lib.jobs import JOBS, format_value

Results = dict[str, Any]


def job_value(results: Results, setup: str, job: str) -> float | None:
    entry = results.get("setups", {}).get(setup)
    if not entry:
        return None
    figure = entry.get("jobs", {}).get(job)
    if not figure or figure.get("error"):
        return None
    value = figure.get("value")
    return float(value) if value is not None else None


def ratio(results: Results, setup: str, reference: str, job: str) -> float | None:
    """setup / reference on one job; None when either figure is missing or the reference is 0."""
    ours = job_value(results, setup, job)
    theirs = job_value(results, reference, job)
    if ours is None or theirs is None or theirs <= 0:
        return None
    return ours / theirs


def ratios_to(results: Results, reference: str) -> dict[str, dict[str, float | None]]:
    """Every other measured setup against `reference`, job by job."""
    out: dict[str, dict[str, float | None]] = {}
    for setup in results.get("setups", {}):
        if setup == reference:
            continue
        out[setup] = {job.name: ratio(results, setup, reference, job.name) for job in JOBS}
    return out


def evaluate_target(results: Results, target: Target) -> dict[str, Any]:
    value = ratio(results, target.setup, target.reference, target.job)
    if value is None:
        status = "n/a"
    else:
        status = "met" if value >= target.ratio else "missed"
    return {
        "target": target.text,
        "setup": target.setup,
        "reference": target.reference,
        "job": target.job,
        "want": target.ratio,
        "ratio": value,
        "status": status,
    }


def evaluate_targets(results: Results) -> list[dict[str, Any]]:
    return [evaluate_target(results, target) for target in TARGETS]


def finish(results: Results) -> Results:
    """Add the derived sections ("ratios", "targets") in place, and return the dict."""
    setups = results.get("setups", {})
    results["ratios"] = {ref: ratios_to(results, ref) for ref in setups}
    results["targets"] = evaluate_targets(results)
    return results


# ---- Markdown ----------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _label(results: Results, setup: str) -> str:
    entry = results["setups"].get(setup, {})
    info = SETUPS_BY_NAME.get(setup)
    return str(entry.get("label") or (info.label if info else setup))


def _mib(kib: Any) -> str:
    return f"{kib / 1024:.0f}" if isinstance(kib, int | float) else "-"


def _ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def figures_table(results: Results) -> str:
    rows = []
    for setup, entry in results["setups"].items():
        if entry.get("status") != "ok" and not entry.get("jobs"):
            reason = entry.get("reason", "")
            rows.append([f"{setup}", f"{entry.get('status')}: {reason}"] + [""] * (len(JOBS) - 1)
                        + ["", ""])
            continue
        cells = [format_value(job_value(results, setup, job.name), job.metric) for job in JOBS]
        daemon = entry.get("daemon") or {}
        rss = daemon.get("rss_kib") or {}
        rss_cell = _mib(max(rss.values())) if rss else "-"
        shown = setup if entry.get("status", "ok") == "ok" else f"{setup} ({entry['status']})"
        rows.append([shown, *cells, rss_cell, verified(entry)])
    header = ["setup", *(job.label for job in JOBS), "daemon RSS MiB (max)", "data intact"]
    return _table(header, rows)


def spread_table(results: Results) -> str:
    """Lowest and highest figure of each job over the rounds (`--rounds`)."""
    rows = []
    for setup, entry in results["setups"].items():
        cells = []
        for job in JOBS:
            values = (entry.get("jobs", {}).get(job.name) or {}).get("round_values") or []
            cells.append(f"{format_value(min(values), job.metric)}-"
                         f"{format_value(max(values), job.metric)}" if values else "-")
        if any(cell != "-" for cell in cells):
            rows.append([setup, *cells])
    return _table(["setup", *(job.label for job in JOBS)], rows)


def verified(entry: dict[str, Any]) -> str:
    """"yes" when fio's verify passes and the mkfs trial's hash matches; "**NO**" naming the
    check that failed; "-" when nothing was checked."""
    failed = [name for name, outcome in (entry.get("verify") or {}).items() if outcome != "ok"]
    trial = entry.get("mkfs") or {}
    if trial.get("hash_ok") is False:
        failed.append("mkfs trial hash")
    elif trial.get("error"):
        failed.append("mkfs trial")
    if failed:
        return "**NO**: " + ", ".join(failed)
    if entry.get("verify") or "hash_ok" in trial:
        return "yes"
    return "-"


def ratio_table(results: Results, reference: str) -> str:
    rows = []
    for setup, by_job in ratios_to(results, reference).items():
        if all(v is None for v in by_job.values()):
            continue
        rows.append([setup, *(_ratio_text(by_job[job.name]) for job in JOBS)])
    return _table(["setup", *(job.label for job in JOBS)], rows)


def targets_table(results: Results) -> str:
    """The targets whose two setups were both part of the run."""
    rows = []
    setups = results.get("setups", {})
    for item in results.get("targets") or evaluate_targets(results):
        if item["setup"] not in setups or item["reference"] not in setups:
            continue
        mark = {"met": "met", "missed": "**missed**", "n/a": "n/a"}[item["status"]]
        rows.append([item["target"], _ratio_text(item["ratio"]), mark])
    if not rows:
        return "(no target has both of its setups in this run)"
    return _table(["target", "ratio", ""], rows)


def mkfs_table(results: Results) -> str:
    rows = []
    for setup, entry in results["setups"].items():
        trial = entry.get("mkfs")
        if not trial:
            continue
        if trial.get("error"):
            rows.append([setup, f"failed: {trial['error']}", "", "", "", "", ""])
            continue

        def seconds(key: str, trial: dict[str, Any] = trial) -> str:
            value = trial.get(key)
            return "-" if value is None else f"{value:.2f}"

        ok = trial.get("hash_ok")
        rows.append([
            setup,
            seconds("mkfs_s"),
            seconds("mount_s"),
            seconds("write_s"),
            seconds("fsync_s"),
            seconds("read_s"),
            "yes" if ok else ("**NO**" if ok is False else "-"),
        ])
    header = ["setup", "mkfs.ext4 s", "mount s", "write s", "fsync s",
              "read back s (cold)", "hash matches"]
    return _table(header, rows)


def daemon_table(results: Results) -> str:
    rows = []
    for setup, entry in results["setups"].items():
        daemon = entry.get("daemon")
        if not daemon or not daemon.get("rss_kib"):
            continue
        rss = daemon["rss_kib"]
        cpu = daemon.get("cpu") or {}
        cpu_cells = [
            "-" if cpu.get(job.name) is None else f"{cpu[job.name]:.2f}" for job in JOBS
        ]
        rows.append([
            setup,
            _mib(daemon.get("rss_start_kib")),
            _mib(max(rss.values())),
            _mib(daemon.get("hwm_kib")),
            *cpu_cells,
        ])
    header = ["setup", "RSS MiB at start", "RSS MiB max after a job", "peak (VmHWM)",
              *(f"CPU {job.label}" for job in JOBS)]
    return _table(header, rows)


def cpu_per_io_table(results: Results) -> str:
    """Daemon CPU per unit of work: microseconds per 4K I/O, milliseconds per MiB for the
    sequential jobs. Less sensitive to a busy machine than the throughput itself (a
    request waiting for a CPU costs wall time, not CPU time)."""
    rows = []
    for setup, entry in results["setups"].items():
        cpu = (entry.get("daemon") or {}).get("cpu") or {}
        if not cpu:
            continue
        cells = []
        for job in JOBS:
            value = job_value(results, setup, job.name)
            cores = cpu.get(job.name)
            if not value or cores is None:
                cells.append("-")
            elif job.unit == "MiB/s":
                cells.append(f"{cores / value * 1e3:.1f}")
            else:
                cells.append(f"{cores / value * 1e6:.0f}")
        rows.append([setup, *cells])
    header = ["setup", *(f"{job.label} ({'ms/MiB' if job.unit == 'MiB/s' else 'us/IO'})"
                         for job in JOBS)]
    return _table(header, rows)


def problems(results: Results) -> list[str]:
    """One line per thing that went wrong: failed setups and jobs, data that did not read
    back, daemon log errors and warnings, teardown trouble."""
    out = []
    for setup, entry in results["setups"].items():
        if entry.get("status") in ("failed", "interrupted"):
            out.append(f"{setup}: {entry['status']}: {entry.get('reason', '')}")
        if entry.get("prefill_error"):
            out.append(f"{setup}: prefill (1 MiB sequential writes) failed: "
                       f"{entry['prefill_error']}")
        for job, figure in (entry.get("jobs") or {}).items():
            if figure.get("error"):
                out.append(f"{setup}: {job} failed: {figure['error']}")
        for check, outcome in (entry.get("verify") or {}).items():
            if outcome != "ok":
                out.append(f"{setup}: {check}: {outcome}")
        trial = entry.get("mkfs") or {}
        if trial.get("error"):
            out.append(f"{setup}: mkfs trial failed: {trial['error']}")
        elif trial.get("hash_ok") is False:
            out.append(f"{setup}: mkfs trial: the file read back differs from what was written")
        found = entry.get("daemon_log") or {}
        if found.get("errors") or found.get("warnings"):
            first = "; ".join(found.get("samples", [])[:3])
            out.append(f"{setup}: daemon log: {found.get('errors', 0)} errors, "
                       f"{found.get('warnings', 0)} warnings (first: {first})")
        out.extend(f"{setup}: {p}" for p in entry.get("problems", []))
    return out


def markdown(results: Results) -> str:
    meta = results.get("meta", {})
    parts = [
        f"Mode **{meta.get('mode', '?')}**: each job {meta.get('runtime_s', '?')} s "
        f"(+{meta.get('ramp_s', '?')} s ramp) over {meta.get('region_mib', '?')} MiB, "
        f"fio direct=1 ioengine=libaio on the loop device (btrfs: on a preallocated file; "
        f"nbd-*: fio's nbd engine on the export's Unix socket). "
        f"Sequential jobs in MiB/s, 4K jobs in IOPS.",
        "",
        figures_table(results),
    ]
    if (meta.get("rounds") or 1) > 1:
        parts += ["", f"Each figure above is the median of {meta['rounds']} rounds through "
                  "every setup (alternating order); lowest-highest over the rounds:", "",
                  spread_table(results)]
    for reference in RATIO_REFERENCES:
        if reference in results["setups"] and results["setups"][reference].get("jobs"):
            parts += ["", f"Ratios to {reference} ({_label(results, reference)}):", "",
                      ratio_table(results, reference)]
    parts += ["", "Targets (issue 7; nbd-*: issue 20):", "", targets_table(results)]
    mkfs = mkfs_table(results)
    if mkfs.count("\n") > 1:
        parts += ["", f"mkfs trial (ext4, write {meta.get('mkfs_write_mib', 256)} MiB + fsync, "
                  "drop caches, read back and compare SHA-256):", "", mkfs]
    daemons = daemon_table(results)
    if daemons.count("\n") > 1:
        parts += ["", "Userspace daemons: RSS, and CPU used during each job (cores, "
                  "utime+stime / wall time):", "", daemons]
        bound = meta.get("checksum_cache_bound_mib")
        if bound is not None:
            parts += ["", f"Blockspace's RSS includes its checksum page cache, bounded at "
                      f"{bound:g} MiB per pool whatever the pool holds."]
        parts += ["", "Daemon CPU per unit of work (us per 4K I/O; ms per MiB for the "
                  "sequential jobs):", "", cpu_per_io_table(results)]
    trouble = problems(results)
    if trouble:
        parts += ["", "Problems seen in this run:", ""] + [f"- {line}" for line in trouble]
    return "\n".join(parts) + "\n"
