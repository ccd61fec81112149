"""`tools/bench`: argument parsing and the run as a whole (see docs/benchmarks.md)."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from bench_lib import report, system
from bench_lib.catalog import GROUPS, SETUPS_BY_NAME, SelectionError, select_setups
from bench_lib.jobs import JOBS_BY_NAME, MODES, GiB, MiB
from bench_lib.rounds import merge_rounds, round_order
from bench_lib.runner import MkfsData, Options, check_disk_space, new_entry, run_setup
from bench_lib.setups import NEEDS, REPO, default_blockspace, default_python, fuse_available

DEFAULT_SCRATCH = "/var/tmp/blockspace-bench"
BASE_COMMANDS = ["fio", "losetup", "mkfs.ext4"]
OWNER_FILE = "owner"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    setups_help = ", ".join(SETUPS_BY_NAME) + "; groups: " + ", ".join(GROUPS)
    parser = argparse.ArgumentParser(
        prog="tools/bench",
        description="Side-by-side benchmark of Blockspace volumes and baselines (issue 7). "
        "Needs root, /dev/fuse and loop devices.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="quick mode: 2 s per job over 256 MiB (default: full mode, 4 s "
                        "per job over 1 GiB)")
    parser.add_argument("--setups", default="default",
                        help=f"comma-separated: {setups_help} (default: all but the nbd group)")
    parser.add_argument("--nbd", action="store_true",
                        help="add the NBD setups (fio's nbd engine on qemu-nbd, nbdkit, the "
                        "Python pass-through and Blockspace's mount --nbd)")
    parser.add_argument("--jobs", default="all",
                        help="comma-separated subset of: " + ", ".join(JOBS_BY_NAME))
    parser.add_argument("--repeat", type=int, default=1,
                        help="run each job N times, keep the median (noisy machines)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="go through every setup N times, in alternating order, and keep "
                        "per job the round with the median figure (a drift of the machine "
                        "then skews no ratio unless it lasts the whole run); the mkfs trial "
                        "and profiles run in the first round only")
    parser.add_argument("--runtime", type=float, help="override seconds per job")
    parser.add_argument("--no-mkfs", action="store_true", help="skip the mkfs trial")
    parser.add_argument("--out", help="directory for results.json, results.md, chart.png "
                        f"(default {DEFAULT_SCRATCH}/results/<time>)")
    parser.add_argument("--json", dest="json_out", help="write the JSON here instead")
    parser.add_argument("--md", dest="md_out", help="write the Markdown tables here instead")
    parser.add_argument("--png", dest="png_out", help="write the chart here instead")
    parser.add_argument("--profile", default="",
                        help="SETUP:JOB[,SETUP:JOB]: also run JOB on SETUP under py-spy "
                        "(collapsed stacks + summary + flame graph SVG)")
    parser.add_argument("--profile-dir", help="where profiles go (default: the output dir)")
    parser.add_argument("--profile-seconds", type=int, default=6)
    parser.add_argument("--scratch", default=DEFAULT_SCRATCH,
                        help=f"scratch root for images and mounts (default {DEFAULT_SCRATCH})")
    parser.add_argument("--install", action="store_true",
                        help="install every dependency (fio, btrfs-progs, qemu-system-common, "
                        "matplotlib, py-spy) and exit")
    parser.add_argument("--no-install", action="store_true",
                        help="never install anything: setups missing a tool are reported "
                        "unavailable")
    parser.add_argument("--from-json", metavar="RESULTS_JSON",
                        help="measure nothing: redo the tables and chart of an earlier run")
    parser.add_argument("--clean", action="store_true",
                        help="remove what runs killed with SIGKILL left behind, and exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every command")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    system.VERBOSE = args.verbose
    if args.from_json:
        earlier = json.loads(Path(args.from_json).read_text())
        report.finish(earlier)
        out_dir = Path(args.out or Path(args.from_json).resolve().parent)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_outputs(earlier, args, out_dir)
        return 0
    system.install_signal_handlers()
    if os.geteuid() != 0:
        system.log("must run as root (loop devices, mounts, drop_caches)")
        return 2
    scratch = Path(args.scratch).resolve()

    if args.clean:
        clean_stale_runs(scratch, verbose=True)
        return 0
    if args.install:
        missing = system.ensure_tools(list(system.COMMANDS), list(system.MODULES), install=True)
        system.ensure_py_spy(install=True)
        if missing:
            system.log(f"still missing after install: {', '.join(missing)}")
            return 1
        system.log("all dependencies are installed")
        return 0

    try:
        names = select_setups(args.setups + (",nbd" if args.nbd else ""))
        jobs = (list(JOBS_BY_NAME) if args.jobs == "all"
                else [j.strip() for j in args.jobs.split(",") if j.strip()])
        for job in jobs:
            if job not in JOBS_BY_NAME:
                raise SelectionError(f"unknown job {job!r} (known: {', '.join(JOBS_BY_NAME)})")
        profiles = parse_profiles(args.profile)
    except SelectionError as error:
        system.log(str(error))
        return 2
    mode = MODES["quick" if args.quick else "full"]
    if args.runtime:
        from dataclasses import replace

        mode = replace(mode, runtime=args.runtime)

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out or scratch / "results" / stamp).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    # tools: install what is missing (with a word why), or mark setups unavailable
    install = not args.no_install
    unavailable: dict[str, str] = {}
    needed = sorted({c for n in names for c in NEEDS.get(n, [])} | set(BASE_COMMANDS))
    modules = ["matplotlib"]
    missing_before = system.missing_commands(needed) + system.missing_modules(modules)
    if missing_before and install:
        system.log("missing: " + ", ".join(
            f"{m} (for {system.COMMANDS.get(m, system.MODULES.get(m, ('', '?')))[1]})"
            for m in missing_before) + "; installing them (use --no-install to skip)")
    try:
        missing = system.ensure_tools(needed, modules, install=install)
    except system.CommandError as error:
        system.log(f"could not install dependencies: {error}")
        missing = system.missing_commands(needed) + system.missing_modules(modules)
    for base in BASE_COMMANDS:
        if base in missing:
            system.log(f"{base} is missing and needed by every setup: tools/bench --install")
            return 1
    for name in names:
        lacking = [c for c in NEEDS.get(name, []) if c in missing]
        if lacking:
            unavailable[name] = f"missing {', '.join(lacking)} (tools/bench --install)"
        elif "fusermount3" in NEEDS.get(name, []) or name.startswith("qsd"):
            ok, why = fuse_available()
            if not ok:
                unavailable[name] = why

    clean_stale_runs(scratch, verbose=False)
    run_dir = scratch / f"run-{stamp}-{os.getpid()}"
    run_dir.mkdir(parents=True)
    (run_dir / OWNER_FILE).write_text(f"{os.getpid()} {system.process_start_ticks(os.getpid())}\n")

    options = Options(
        mode=mode, setups=names, run_dir=run_dir, repeat=max(1, args.repeat),
        mkfs=not args.no_mkfs, jobs=jobs, profiles=profiles,
        profile_dir=Path(args.profile_dir).resolve() if args.profile_dir else out_dir,
        profile_seconds=args.profile_seconds, install=install,
        blockspace=default_blockspace(), python=default_python(), log_dir=out_dir / "logs",
    )
    results: dict[str, Any] = {"meta": describe_run(args, mode, names, jobs), "setups": {}}
    started = time.monotonic()
    interrupted = False
    try:
        check_disk_space(run_dir, 6 * GiB)
        mkfs_data = MkfsData(mode.mkfs_write) if options.mkfs else None
        for name in names:  # every setup has its place in the results, in order
            results["setups"][name] = new_entry(name, *(
                ("unavailable", unavailable[name]) if name in unavailable else ()))
            if name in unavailable:
                system.log(f"{name}: unavailable: {unavailable[name]}")
        rounds: dict[str, list[dict[str, Any]]] = {}
        for index in range(max(1, args.rounds)):
            if args.rounds > 1:
                system.log(f"round {index + 1} of {args.rounds}")
            later = dataclasses.replace(options, run_dir=run_dir / f"round-{index + 1}",
                                        mkfs=False, profiles=[])
            for name in round_order([n for n in names if n not in unavailable], index):
                entry = new_entry(name)
                rounds.setdefault(name, []).append(entry)
                try:
                    run_setup(name, options if index == 0 else later, mkfs_data, system.log,
                              entry)
                finally:  # also when interrupted: what was measured is kept
                    results["setups"][name] = merge_rounds(rounds[name])
    except KeyboardInterrupt as why:
        interrupted = True
        system.log(f"interrupted ({why or 'Ctrl-C'}): cleaning up")
    finally:
        leftovers = system.sweep(str(run_dir))
        if leftovers:
            system.log("final sweep: " + "; ".join(leftovers))
    results["meta"]["elapsed_s"] = round(time.monotonic() - started, 1)
    results["meta"]["interrupted"] = interrupted
    report.finish(results)
    write_outputs(results, args, out_dir)
    return 130 if interrupted else 0


def parse_profiles(text: str) -> list[tuple[str, str]]:
    out = []
    for item in (i.strip() for i in text.split(",")):
        if not item:
            continue
        setup, sep, job = item.partition(":")
        if not sep or setup not in SETUPS_BY_NAME or job not in JOBS_BY_NAME:
            raise SelectionError(f"--profile wants SETUP:JOB, got {item!r}")
        out.append((setup, job))
    return out


def describe_run(args: argparse.Namespace, mode: Any, names: list[str],
                 jobs: list[str]) -> dict[str, Any]:
    def first_line(command: list[str]) -> str | None:
        if shutil.which(command[0]) is None:
            return None
        result = system.run(command, check=False, timeout=30)
        return (result.stdout or result.stderr).strip().splitlines()[0] if result.stdout \
            or result.stderr else None

    commit = system.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], check=False)
    dirty = system.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "blockspace"],
                       check=False)
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), "")
    except OSError:
        pass
    return {
        "command": "tools/bench " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "mode": mode.name,
        "region_mib": mode.region // MiB,
        "runtime_s": mode.runtime,
        "ramp_s": mode.ramp,
        "device_mib": mode.device_size // MiB,
        "mkfs_write_mib": mode.mkfs_write // MiB,
        "repeat": args.repeat,
        "rounds": args.rounds,
        "setups": names,
        "jobs": jobs,
        "git": commit.stdout.strip() + (" (blockspace/ modified)" if dirty.stdout.strip()
                                        else ""),
        "kernel": platform.release(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "loadavg_start": system.loadavg(),
        "fio": first_line(["fio", "--version"]),
        "qemu_storage_daemon": first_line(["qemu-storage-daemon", "--version"]),
        "python": platform.python_version(),
        "checksum_cache_bound_mib": checksum_cache_bound_mib(),
    }


def checksum_cache_bound_mib() -> float | None:
    """The most RAM a Blockspace daemon's checksum page cache may hold (per pool), from the
    blockspace package the daemons run; None if it cannot be imported."""
    try:
        from blockspace.pool.checksum_store import cache_bound_bytes
    except ImportError:
        return None
    return round(cache_bound_bytes() / MiB, 1)


def write_outputs(results: dict[str, Any], args: argparse.Namespace, out_dir: Path) -> None:
    json_path = Path(args.json_out or out_dir / "results.json")
    md_path = Path(args.md_out or out_dir / "results.md")
    png_path = Path(args.png_out or out_dir / "chart.png")
    for path in (json_path, md_path, png_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2, sort_keys=False, default=str) + "\n")
    text = report.markdown(results)
    meta = results["meta"]
    text += (f"\nCommand: `{meta['command']}` — {meta['date']}, git {meta['git']}, "
             f"kernel {meta['kernel']}, {meta['cpus']} CPUs, load average at start "
             f"{meta['loadavg_start']}, {meta['elapsed_s']} s in all.\n")
    md_path.write_text(text)
    chart_note = ""
    try:
        from bench_lib import chart

        rounds = f", median of {meta['rounds']} rounds" if (meta.get("rounds") or 1) > 1 else ""
        title = (f"Blockspace bench ({meta['mode']} mode{rounds}, {meta['date']}, git "
                 f"{meta['git']}) — grey: baselines, orange: Blockspace")
        chart.draw(results, str(png_path), title)
        chart_note = f", chart {png_path}"
    except ImportError:
        system.log("matplotlib is missing: no chart (tools/bench --install)")
    print(text)
    system.log(f"results: {json_path}, tables {md_path}{chart_note}")


def clean_stale_runs(scratch: Path, *, verbose: bool) -> None:
    """Sweep run directories whose harness process is gone (killed with SIGKILL, say)."""
    if not scratch.is_dir():
        if verbose:
            system.log(f"nothing to clean ({scratch} does not exist)")
        return
    cleaned = 0
    for run_dir in sorted(scratch.glob("run-*")):
        owner = run_dir / OWNER_FILE
        try:
            pid_text, ticks_text = owner.read_text().split()[:2]
            pid = int(pid_text)
            alive = system.pid_alive(pid) and str(system.process_start_ticks(pid)) == ticks_text
        except (OSError, ValueError):
            alive = False
        if alive:
            if verbose:
                system.log(f"{run_dir}: its run (pid {pid_text}) is still going; left alone")
            continue
        done = system.sweep(str(run_dir))
        cleaned += 1
        system.log(f"cleaned stale {run_dir}" + (f": {'; '.join(done)}" if done else ""))
    if verbose and not cleaned:
        system.log("nothing to clean")


if __name__ == "__main__":
    sys.exit(main())
