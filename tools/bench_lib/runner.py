"""Run the job set (and the mkfs trial, and profiles) on each selected setup."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_lib import cpu_layers, system
from bench_lib import profile as profiles
from bench_lib.catalog import SETUPS_BY_NAME
from bench_lib.jobs import (
    JOBS,
    JOBS_BY_NAME,
    VERIFY_JOBS,
    Job,
    JobResult,
    MiB,
    Mode,
    fio_command,
    median_result,
    parse_fio,
    prefill_command,
    verify_command,
    verify_outcome,
)
from bench_lib.setups import BUILDERS, Context, Target, Unavailable
from bench_lib.system import Cleanup, CommandError


@dataclass
class Options:
    mode: Mode
    setups: list[str]
    run_dir: Path
    repeat: int = 1
    mkfs: bool = True
    jobs: list[str] = field(default_factory=lambda: [j.name for j in JOBS])
    profiles: list[tuple[str, str]] = field(default_factory=list)  # (setup, job)
    profile_dir: Path | None = None
    profile_seconds: int = 6
    install: bool = True
    log_dir: Path | None = None  # daemon logs with warnings or errors are copied here
    blockspace: str = "blockspace"
    python: str = "python3"


class MkfsData:
    """The random payload of the mkfs trial, made once per run."""

    def __init__(self, size: int) -> None:
        self.data = os.urandom(size)
        self.sha256 = hashlib.sha256(self.data).hexdigest()


def run_fio(command: list[str], job: Job | None, timeout: float) -> tuple[JobResult | None,
                                                                        dict[str, Any]]:
    result = system.run(command, timeout=timeout, check=False)
    if result.returncode != 0:
        tail = (result.stderr.strip() or result.stdout.strip())[-500:]
        raise CommandError(f"fio exited {result.returncode}: {tail}")
    from bench_lib.jobs import extract_json

    data = extract_json(result.stdout)
    return (parse_fio(data, job) if job else None), data


def _sample_daemon(target: Target) -> tuple[float | None, float]:
    pid = target.daemon_pid
    return (system.proc_cpu_seconds(pid) if pid else None), time.monotonic()


def new_entry(name: str, status: str = "ok", reason: str = "") -> dict[str, Any]:
    info = SETUPS_BY_NAME[name]
    entry: dict[str, Any] = {"label": info.label, "group": info.group, "status": status,
                             "jobs": {}}
    if reason:
        entry["reason"] = reason
    return entry


def run_setup(name: str, options: Options, mkfs_data: MkfsData | None,
              emit: Callable[[str], None], entry: dict[str, Any]) -> dict[str, Any]:
    """Build, measure and tear down one setup, filling `entry` as it goes (so that what was
    measured before a Ctrl-C is kept)."""
    info = SETUPS_BY_NAME[name]
    setup_dir = options.run_dir / name
    setup_dir.mkdir(parents=True)
    cleanup = Cleanup()
    ctx = Context(name, setup_dir, options.run_dir, options.mode, cleanup, options.blockspace,
                  options.python)
    target: Target | None = None
    started = time.monotonic()
    try:
        emit(f"{name}: building ({info.label})")
        target = BUILDERS[name](ctx)
        entry["notes"] = target.notes
        entry["built_s"] = round(time.monotonic() - started, 2)
        daemon: dict[str, Any] | None = None
        if target.daemon_pid:
            memory = system.proc_memory(target.daemon_pid)
            daemon = {"pid": target.daemon_pid, "rss_start_kib": memory.get("VmRSS"),
                      "rss_kib": {}, "cpu": {}, "threads": memory.get("Threads")}
            entry["daemon"] = daemon

        t0 = time.monotonic()
        try:
            _, raw = run_fio(prefill_command(target.fio_path, options.mode), None,
                             timeout=900)
            prefill_s = time.monotonic() - t0
            write = raw["jobs"][0]["write"]
            entry["prefill_mib_s"] = round(float(write.get("bw_bytes", 0)) / MiB, 1)
            emit(f"{name}: prefilled {options.mode.region // MiB} MiB in {prefill_s:.1f}s "
                 f"({entry['prefill_mib_s']} MiB/s)")
        except CommandError as error:
            # A failed request of the device under test is a finding, not the end of the
            # setup: note it and measure what still works.
            entry["prefill_error"] = str(error).splitlines()[0][:300]
            emit(f"{name}: prefill FAILED (going on with the jobs): {entry['prefill_error']}")
        _check_alive(target)

        for job_name in options.jobs:
            job = JOBS_BY_NAME[job_name]
            entry["jobs"][job.name] = _run_job(job, target, options, daemon)
            figure = entry["jobs"][job.name]
            if figure.get("error"):
                emit(f"{name}: {job.name}: FAILED: {figure['error']}")
            else:
                extra = ""
                if daemon is not None:
                    rss = daemon["rss_kib"].get(job.name)
                    cpu = daemon["cpu"].get(job.name)
                    extra = (f"  (daemon RSS {rss / 1024:.0f} MiB" if rss else "  (") + (
                        f", CPU {cpu:.2f} cores)" if cpu is not None else ")")
                emit(f"{name}: {job.name:18s} {figure['value']:10.1f} {job.unit}"
                     f"  lat {figure['lat_mean_us']:.0f}/{figure['lat_p99_us']:.0f} us "
                     f"mean/p99{extra}")

        for setup, job_name in options.profiles:
            if setup == name:
                try:
                    found = _profile(JOBS_BY_NAME[job_name], target, options, emit, name)
                except (CommandError, OSError) as error:  # a profile is a bonus
                    found = {"error": str(error).splitlines()[0][:300]}
                    emit(f"{name}: profile of {job_name} failed: {found['error']}")
                entry.setdefault("profiles", {})[job_name] = found

        entry["verify"] = _verify(target)
        bad = {k: v for k, v in entry["verify"].items() if v != "ok"}
        emit(f"{name}: data check (fio crc32c verify): "
             + ("ok" if not bad else "; ".join(f"{k}: {v}" for k, v in bad.items())))

        if options.mkfs and mkfs_data is not None and target.mkfs_path:  # none over NBD
            entry["mkfs"] = _mkfs_trial(ctx, target, mkfs_data)
            trial = entry["mkfs"]
            if trial.get("error"):
                emit(f"{name}: mkfs trial FAILED: {trial['error']}")
            else:
                emit(f"{name}: mkfs trial: mkfs {trial['mkfs_s']:.2f}s, write "
                     f"{trial['write_s']:.2f}s + fsync {trial['fsync_s']:.2f}s, cold read "
                     f"{trial['read_s']:.2f}s, hash {'ok' if trial['hash_ok'] else 'MISMATCH'}")
        if daemon is not None:
            memory = system.proc_memory(target.daemon_pid or 0)
            daemon["hwm_kib"] = memory.get("VmHWM")
            daemon["rss_end_kib"] = memory.get("VmRSS")
            daemon["threads_end"] = memory.get("Threads")
    except KeyboardInterrupt:
        entry["status"] = "interrupted"
        entry["reason"] = "interrupted"
        raise
    except Unavailable as why:
        entry["status"] = "unavailable"
        entry["reason"] = str(why)
        emit(f"{name}: unavailable: {why}")
    except (CommandError, OSError, ValueError, KeyError) as error:
        entry["status"] = "failed"
        entry["reason"] = str(error).splitlines()[0][:300]
        entry["detail"] = str(error)[-3000:]
        if target is not None and target.daemon_log:
            entry["daemon_log_tail"] = system.log_tail(target.daemon_log, 40)
        emit(f"{name}: FAILED: {error}")
    finally:
        if target is not None and target.daemon_pid and not target.alive():
            entry.setdefault("problems", []).append("the daemon was not alive at teardown")
        emit(f"{name}: tearing down")
        failures = cleanup.unwind()
        if target is not None and target.daemon_log:
            _collect_log(name, target.daemon_log, options, entry, emit)
        if failures:
            entry.setdefault("problems", []).extend(f"teardown: {f}" for f in failures)
        leftovers = system.sweep(str(setup_dir))
        if leftovers:
            entry.setdefault("problems", []).append("teardown needed the sweep: "
                                                    + "; ".join(leftovers))
            emit(f"{name}: teardown left things behind, swept: {'; '.join(leftovers)}")
        entry["total_s"] = round(time.monotonic() - started, 1)
    return entry


def scan_log(text: str, limit: int = 8) -> dict[str, Any]:
    """Count WARNING/ERROR lines of a daemon log (Python logging format); keep the first few
    distinct messages, timestamps stripped."""
    counts = {"warnings": 0, "errors": 0}
    samples: list[str] = []
    seen: set[str] = set()
    for line in text.splitlines():
        level = ("errors" if (" ERROR " in line or " CRITICAL " in line)
                 else "warnings" if " WARNING " in line else None)
        if level is None:
            continue
        counts[level] += 1
        message = line.split(" ", 2)[-1] if line[:4].isdigit() else line
        key = "".join(c for c in message if not c.isdigit())[:120]
        if key not in seen and len(samples) < limit:
            seen.add(key)
            samples.append(message[:300])
    return {**counts, "samples": samples}


def _collect_log(name: str, path: str, options: Options, entry: dict[str, Any],
                 emit: Callable[[str], None]) -> None:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return
    found = scan_log(text)
    entry["daemon_log"] = found
    if found["warnings"] or found["errors"]:
        copy = ""
        if options.log_dir is not None:
            options.log_dir.mkdir(parents=True, exist_ok=True)
            target = options.log_dir / f"{name}.log"
            target.write_text(text)
            found["copy"] = str(target)
            copy = f" (log kept: {target})"
        emit(f"{name}: daemon log has {found['errors']} errors and {found['warnings']} "
             f"warnings{copy}; first ones:\n  " + "\n  ".join(found["samples"]))


def _check_alive(target: Target) -> None:
    if not target.alive():
        raise CommandError("the daemon died" + system.log_tail(target.daemon_log, 30))


def _run_job(job: Job, target: Target, options: Options,
             daemon: dict[str, Any] | None) -> dict[str, Any]:
    mode = options.mode
    command = fio_command(job, target.fio_path, mode)
    results: list[JobResult] = []
    load = system.loadavg()
    try:
        for _ in range(options.repeat):
            cpu0, t0 = _sample_daemon(target)
            result, _ = run_fio(command, job, timeout=mode.runtime + mode.ramp + 120)
            assert result is not None
            cpu1, t1 = _sample_daemon(target)
            if cpu0 is not None and cpu1 is not None:
                # cores busy over the whole fio run (ramp included)
                result.extra["daemon_cpu"] = (cpu1 - cpu0) / max(1e-6, t1 - t0)
            results.append(result)
            _check_alive(target)
    except CommandError as error:
        out: dict[str, Any] = {"error": str(error).splitlines()[0][:300], "value": None}
        if target.daemon_log:
            out["daemon_log_tail"] = system.log_tail(target.daemon_log, 30)
        return out
    chosen = median_result(results)
    chosen.extra["loadavg_before"] = load
    if daemon is not None and target.daemon_pid:
        memory = system.proc_memory(target.daemon_pid)
        daemon["rss_kib"][job.name] = memory.get("VmRSS")
        cpus = [float(r.extra["daemon_cpu"]) for r in results if "daemon_cpu" in r.extra]
        if cpus:
            daemon["cpu"][job.name] = round(sorted(cpus)[(len(cpus) - 1) // 2], 3)
    return chosen.to_dict()


def _verify(target: Target) -> dict[str, str]:
    out = {}
    for name, rw, bs, iodepth, size in VERIFY_JOBS:
        command = verify_command(target.fio_path, name, rw, bs, iodepth, size)
        result = system.run(command, timeout=600, check=False)
        out[name] = verify_outcome(result.returncode, result.stdout, result.stderr)
    return out


def _mkfs_trial(ctx: Context, target: Target, data: MkfsData) -> dict[str, Any]:
    """mkfs.ext4, mount, write + fsync, drop caches, read back, compare SHA-256; timed."""
    trial: dict[str, Any] = {}
    local = Cleanup()
    try:
        dev = target.mkfs_path
        if not dev.startswith("/dev/"):
            dev, _dio = system.loop_attach(dev)
            local.push(f"losetup -d {dev}", lambda: system.loop_detach(dev, str(ctx.run_dir)))
        t = time.monotonic()
        system.run(["mkfs.ext4", "-q", "-F", "-E", "nodiscard", dev], timeout=600)
        trial["mkfs_s"] = time.monotonic() - t
        fs = ctx.dir / "fs"
        fs.mkdir(exist_ok=True)
        t = time.monotonic()
        system.run(["mount", "-t", "ext4", dev, str(fs)], timeout=120)
        local.push(f"umount {fs}", lambda: system.unmount(str(fs)))
        trial["mount_s"] = time.monotonic() - t

        path = fs / "data.bin"
        view = memoryview(data.data)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            t = time.monotonic()
            for start in range(0, len(view), MiB):
                os.write(fd, view[start : start + MiB])
            trial["write_s"] = time.monotonic() - t
            t = time.monotonic()
            os.fsync(fd)
            trial["fsync_s"] = time.monotonic() - t
        finally:
            os.close(fd)

        system.drop_caches()
        buffer = bytearray(len(data.data))
        target_view = memoryview(buffer)
        fd = os.open(path, os.O_RDONLY)
        try:
            t = time.monotonic()
            done = 0
            while done < len(buffer):
                n = os.readv(fd, [target_view[done : done + 4 * MiB]])
                if n <= 0:
                    break
                done += n
            trial["read_s"] = time.monotonic() - t
        finally:
            os.close(fd)
        trial["bytes_read"] = done
        trial["hash_ok"] = done == len(buffer) and hashlib.sha256(buffer).hexdigest() == data.sha256
        del target_view, buffer
        t = time.monotonic()
        local.unwind()
        trial["umount_s"] = time.monotonic() - t
    except (CommandError, OSError) as error:
        trial["error"] = str(error).splitlines()[0][:300]
        if target.daemon_log:
            trial["daemon_log_tail"] = system.log_tail(target.daemon_log, 30)
    finally:
        local.unwind()
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in trial.items()}


ProfilePass = tuple[str, str, list[str], str]  # name, output format, py-spy flags, output


def profile_passes(stem: str, perf: str | None) -> tuple[list[ProfilePass], str | None]:
    """The profiling passes to run, and what is left out and why (None: nothing). Without
    perf the three py-spy passes still run; only the CPU-by-layer pass is skipped."""
    passes: list[ProfilePass] = [
        ("threads", "raw", ["--threads", "--idle"], f"{stem}.threads.txt"),
        ("gil", "raw", ["--gil"], f"{stem}.gil.txt"),
        ("flamegraph", "flamegraph", ["--gil"], f"{stem}.svg"),
    ]
    if not perf:
        return passes, "no CPU-by-layer profile: perf is not installed (tools/bench --install)"
    passes.append(("perf", "perf", [], f"{stem}.perf.data"))
    return passes, None


def _profile(job: Job, target: Target, options: Options, emit: Callable[[str], None],
             setup: str) -> dict[str, Any]:
    """Run `job` again, three times, under py-spy: collapsed stacks of all threads (idle
    ones too, so blocked syscalls and waits show), collapsed
    stacks of the GIL holder only (where the Python CPU goes), and a flame graph (GIL);
    then a fourth time under perf, for all the process's CPU by layer (kernel included)."""
    out: dict[str, Any] = {}
    if not target.daemon_pid:
        return {"error": "no userspace daemon to profile"}
    try:
        py_spy = system.ensure_py_spy(install=options.install)
    except CommandError as error:
        emit(f"{setup}: profile skipped: {error}")
        return {"error": str(error)}
    directory = options.profile_dir or (options.run_dir.parent / "profiles")
    directory.mkdir(parents=True, exist_ok=True)
    stem = f"{directory}/profile-{setup}-{job.name}"
    seconds = options.profile_seconds
    rate = 200
    pid = str(target.daemon_pid)
    perf = shutil.which("perf")
    passes, missing = profile_passes(stem, perf)
    if missing:
        emit(f"{setup}: {missing}")
    reports = []
    for name, fmt, flags, output in passes:
        command = fio_command(job, target.fio_path, options.mode, runtime=seconds + 3)
        fio = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
        try:
            time.sleep(options.mode.ramp + 1.0)
            if fmt == "perf":  # every sample of the process, kernel included
                assert perf is not None
                recorder = [perf, "record", "--quiet", "-F", "999", "-p", pid, "-o", output,
                            "--", "sleep", str(seconds)]
            else:
                recorder = [py_spy, "record", "--pid", pid, "--duration", str(seconds),
                            "--rate", str(rate), "--format", fmt, "--output", output,
                            "--nonblocking", *flags]
            system.run(recorder, timeout=seconds + 120)
            stdout, _ = fio.communicate(timeout=seconds + 120)
        except BaseException:
            fio.kill()
            fio.wait()
            raise
        try:
            out[f"fio_during_{name}"] = round(parse_fio(stdout.decode(errors="replace"),
                                                        job).value, 1)
        except ValueError:
            pass
        out[name] = output
        if fmt == "perf":
            text = system.run([perf, "report", "-i", output, "--stdio", "--no-children",
                               "--sort", "dso,sym", "-g", "none", "--percent-limit", "0.01"],
                              timeout=300).stdout
            Path(f"{stem}.perf.txt").write_text(text)
            Path(output).unlink(missing_ok=True)  # the report is what is kept
            out[name] = f"{stem}.perf.txt"
            reports.append(cpu_layers.render(
                cpu_layers.layers(text),
                "== all the process's CPU by layer, kernel included (perf record -F 999)"))
        elif fmt == "raw":
            summary = profiles.summarize(Path(output).read_text())
            title = {"threads": "all threads, idle included (py-spy --threads --idle): wall "
                                "time",
                     "gil": "GIL holder only (py-spy --gil): where the Python CPU goes"}[name]
            reports.append(profiles.render(summary, title=f"== {title}",
                                           expected_per_thread=rate * seconds,
                                           idle_included=name == "threads"))
    report = (f"profile of {setup} {job.name}: {seconds}s at {rate} Hz per pass; fio during "
              f"the passes: " + ", ".join(f"{k.removeprefix('fio_during_')} {v} {job.unit}"
                                         for k, v in out.items() if k.startswith("fio_during"))
              + "\n\n" + "\n".join(reports))
    Path(f"{stem}.summary.txt").write_text(report)
    out["summary"] = f"{stem}.summary.txt"
    emit(f"{setup}: {report}")
    return out


def check_disk_space(run_dir: Path, needed: int) -> None:
    free = shutil.disk_usage(run_dir).free
    if free < needed:
        raise CommandError(f"{run_dir}: only {free // MiB} MiB free, the run needs about "
                           f"{needed // MiB} MiB")
