"""Smoke test of the benchmark harness's pure parts (tools/bench_lib): fio command lines and
JSON parsing, ratios and targets, tables, profile summaries. No timing, no root, no fio."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from bench_lib import catalog, cpu_layers, jobs, profile, report, rounds, setups, system  # noqa: E402,E501
from bench_lib.cli import parse_profiles  # noqa: E402
from bench_lib.runner import profile_passes  # noqa: E402


def fio_json(side: str, *, bw_bytes: float, iops: float, mean_ns: float = 50_000.0,
             p99_ns: float = 120_000.0, error: int = 0) -> dict[str, Any]:
    """The parts of fio 3.x's --output-format=json the harness reads."""
    empty = {"bw_bytes": 0, "iops": 0.0, "runtime": 0, "clat_ns": {"mean": 0.0}}
    stats = {
        "bw_bytes": bw_bytes,
        "bw": bw_bytes / 1024,
        "iops": iops,
        "runtime": 2000,
        "clat_ns": {"mean": mean_ns, "percentile": {"50.000000": 40_000, "99.000000": p99_ns,
                                                    "99.900000": 400_000}},
    }
    job = {"jobname": "x", "error": error, "read": empty, "write": empty, side: stats}
    return {"fio version": "fio-3.33", "jobs": [job]}


def test_fio_command_is_direct_libaio_time_based_over_the_region() -> None:
    job = jobs.JOBS_BY_NAME["randwrite-4k-qd16"]
    command = jobs.fio_command(job, "/dev/loop7", jobs.QUICK)
    assert command[0] == "fio"
    for flag in ("--direct=1", "--ioengine=libaio", "--rw=randwrite", "--bs=4096",
                 "--iodepth=16", f"--size={256 * jobs.MiB}", "--time_based", "--runtime=2000ms",
                 "--ramp_time=500ms", "--filename=/dev/loop7", "--output-format=json"):
        assert flag in command
    full = jobs.fio_command(jobs.JOBS_BY_NAME["seqread-1m-qd4"], "f", jobs.FULL, runtime=7)
    assert f"--size={jobs.GiB}" in full
    assert "--runtime=7000ms" in full
    assert "--bs=1048576" in full


def test_fio_runs_an_nbd_export_through_the_nbd_engine() -> None:
    uri = "nbd+unix:///vol?socket=/tmp/x.sock"
    job = jobs.JOBS_BY_NAME["randread-4k-qd16"]
    for command in (jobs.fio_command(job, uri, jobs.QUICK), jobs.prefill_command(uri, jobs.QUICK),
                    jobs.verify_command(uri, "v", "randwrite", 4096, 16, 1 << 20)):
        assert "--ioengine=nbd" in command
        assert f"--uri={uri}" in command
        assert not [a for a in command if a.startswith(("--filename", "--direct"))]


def test_the_job_set_is_the_issues() -> None:
    assert [(j.rw, j.bs, j.iodepth) for j in jobs.JOBS] == [
        ("write", jobs.MiB, 4), ("read", jobs.MiB, 4),
        ("randread", 4096, 1), ("randread", 4096, 16),
        ("randwrite", 4096, 1), ("randwrite", 4096, 16),
    ]


def test_parse_fio_reads_bandwidth_iops_and_latency() -> None:
    seq = jobs.JOBS_BY_NAME["seqwrite-1m-qd4"]
    result = jobs.parse_fio(json.dumps(fio_json("write", bw_bytes=512 * jobs.MiB, iops=512)),
                            seq)
    assert result.value == pytest.approx(512.0)
    assert result.bw_mib_s == pytest.approx(512.0)
    assert result.lat_mean_us == pytest.approx(50.0)
    assert result.lat_p99_us == pytest.approx(120.0)
    assert result.runtime_s == pytest.approx(2.0)

    rand = jobs.JOBS_BY_NAME["randread-4k-qd16"]
    result = jobs.parse_fio(fio_json("read", bw_bytes=40_000 * 4096, iops=40_000.5), rand)
    assert result.value == pytest.approx(40_000.5)  # IOPS for 4K jobs


def test_parse_fio_skips_warnings_before_the_json() -> None:
    text = "fio: file hash not empty on exit\n" + json.dumps(
        fio_json("read", bw_bytes=jobs.MiB, iops=1.0))
    result = jobs.parse_fio(text, jobs.JOBS_BY_NAME["seqread-1m-qd4"])
    assert result.bw_mib_s == pytest.approx(1.0)
    with pytest.raises(jobs.FioOutputError):
        jobs.extract_json("fio: no JSON at all")
    with pytest.raises(jobs.FioOutputError):
        jobs.extract_json('{"jobs": []}')


def test_verify_outcome() -> None:
    ok = json.dumps(fio_json("write", bw_bytes=1, iops=1))
    assert jobs.verify_outcome(0, ok, "") == "ok"
    bad = json.dumps(fio_json("write", bw_bytes=1, iops=1, error=84))
    outcome = jobs.verify_outcome(1, bad, "verify: bad header offset 8867840, wanted 5193728")
    assert outcome.startswith("FAILED (fio error 84)")
    assert "bad header" in outcome


def test_median_and_formatting() -> None:
    def result(value: float) -> jobs.JobResult:
        return jobs.JobResult("j", value, value, value, 0.0, 0.0, 1.0)

    chosen = jobs.median_result([result(3.0), result(1.0), result(2.0)])
    assert chosen.value == 2.0
    assert chosen.extra["samples"] == [3.0, 1.0, 2.0]
    assert jobs.format_value(2399.4, "bw") == "2399"
    assert jobs.format_value(77_600, "iops") == "77.6k"
    assert jobs.format_value(6_100, "iops") == "6.10k"
    assert jobs.format_value(950, "iops") == "950"
    assert jobs.format_value(None, "iops") == "-"


def results_with(figures: dict[str, dict[str, float]]) -> dict[str, Any]:
    out: dict[str, Any] = {"meta": {"mode": "quick"}, "setups": {}}
    for setup, by_job in figures.items():
        info = catalog.SETUPS_BY_NAME[setup]
        out["setups"][setup] = {
            "label": info.label, "group": info.group, "status": "ok",
            "jobs": {job: {"value": value} for job, value in by_job.items()},
        }
    return out


def round_entry(values: dict[str, float | None], *, cpu: float = 0.5,
                verify: str = "ok", status: str = "ok") -> dict[str, Any]:
    return {"label": "x", "status": status, "verify": {"seq": verify},
            "daemon": {"cpu": {job: cpu for job in values}, "rss_kib": {}},
            "jobs": {job: ({"value": v} if v is not None else {"error": "fio exited 1"})
                     for job, v in values.items()}}


def test_rounds_keep_the_median_round_per_job_and_every_failure() -> None:
    assert rounds.round_order(["a", "b", "c"], 0) == ["a", "b", "c"]
    assert rounds.round_order(["a", "b", "c"], 1) == ["c", "b", "a"]
    merged = rounds.merge_rounds([
        round_entry({"r": 100.0, "w": None}, cpu=0.1),
        round_entry({"r": 300.0, "w": 50.0}, cpu=0.3, verify="FAILED: crc32c mismatch"),
        round_entry({"r": 200.0, "w": 70.0}, cpu=0.2, status="failed"),
    ])
    assert merged["jobs"]["r"]["value"] == 200.0  # the median round, not an average
    assert merged["jobs"]["r"]["round"] == 3
    assert merged["jobs"]["r"]["round_values"] == [100.0, 300.0, 200.0]
    assert merged["daemon"]["cpu"]["r"] == 0.2  # the CPU of the round whose figure is kept
    assert merged["jobs"]["w"]["value"] == 50.0  # lower median of the rounds that measured
    assert merged["jobs"]["w"]["round_errors"] == {"1": "fio exited 1"}
    assert merged["verify"]["seq"] == "round 2: FAILED: crc32c mismatch"
    assert merged["problems"] == ["round 3: failed"]
    assert merged["rounds"] == 3
    single = round_entry({"r": 1.0})
    assert rounds.merge_rounds([single]) == single
    with pytest.raises(ValueError, match="no rounds"):
        rounds.merge_rounds([])


def test_the_report_shows_the_spread_over_rounds() -> None:
    results = results_with({"simple": {"seqread-1m-qd4": 600.0}})
    results["meta"]["rounds"] = 3
    results["setups"]["simple"]["jobs"]["seqread-1m-qd4"]["round_values"] = [600.0, 500.0, 900.0]
    text = report.markdown(report.finish(results))
    assert "median of 3 rounds" in text
    assert "| simple | - | 500-900 |" in text


def test_ratios_and_targets() -> None:
    results = results_with({
        "qsd-raw": {"randread-4k-qd16": 50_000, "randwrite-4k-qd16": 40_000,
                    "seqread-1m-qd4": 2000, "seqwrite-1m-qd4": 0},
        "mirror-2": {"randread-4k-qd16": 35_000, "randwrite-4k-qd16": 20_000,
                     "seqread-1m-qd4": 1900},
    })
    assert report.ratio(results, "mirror-2", "qsd-raw", "randread-4k-qd16") == pytest.approx(0.7)
    assert report.ratio(results, "mirror-2", "qsd-raw", "seqwrite-1m-qd4") is None  # ref 0
    assert report.ratio(results, "mirror-2", "btrfs-raid1", "seqwrite-1m-qd4") is None
    by_text = {t["target"]: t for t in report.finish(results)["targets"]}
    assert by_text["mirror-2 randread-4k-qd16 >= 0.6x qsd-raw"]["status"] == "met"
    assert by_text["mirror-2 randwrite-4k-qd16 >= 0.6x qsd-raw"]["status"] == "missed"
    assert by_text["mirror-2 seqread-1m-qd4 >= 0.9x qsd-raw"]["status"] == "met"
    assert by_text["mirror-2 seqwrite-1m-qd4 >= 2x btrfs-raid1"]["status"] == "n/a"
    assert results["ratios"]["qsd-raw"]["mirror-2"]["randwrite-4k-qd16"] == pytest.approx(0.5)


def test_targets_cover_the_issue() -> None:
    texts = {t.text for t in catalog.TARGETS}
    assert "simple randwrite-4k-qd1 >= 0.8x pyfuse-blocking" in texts
    assert "parity-2 seqread-1m-qd4 >= 1x btrfs-raid5" in texts
    assert "mirror-2 seqwrite-1m-qd4 >= 2x btrfs-raid1" in texts
    assert "nbd-simple randread-4k-qd16 >= 0.7x nbd-qemu" in texts
    assert "nbd-simple randwrite-4k-qd16 >= 0.5x nbd-qemu" in texts
    assert "nbd-simple randread-4k-qd16 >= 1.5x simple" in texts
    assert "nbd-simple seqwrite-1m-qd4 >= 1x simple" in texts
    assert len(catalog.TARGETS) == 7 + 12 + 6 + 2 + 6


def test_markdown_tables() -> None:
    results = results_with({
        "pyfuse-blocking": {j.name: 100.0 for j in jobs.JOBS},
        "simple": {j.name: 90.0 for j in jobs.JOBS},
    })
    results["setups"]["simple"]["daemon"] = {"rss_kib": {"seqwrite-1m-qd4": 51200},
                                             "rss_start_kib": 30720, "hwm_kib": 60000,
                                             "cpu": {"seqwrite-1m-qd4": 0.5}}
    results["setups"]["simple"]["verify"] = {"verify-seq-1m-qd4": "ok"}
    results["setups"]["simple"]["mkfs"] = {"mkfs_s": 1.0, "mount_s": 0.1, "write_s": 0.5,
                                           "fsync_s": 2.0, "read_s": 1.5, "hash_ok": False}
    results["setups"]["btrfs-raid5"] = {"status": "unavailable", "reason": "no btrfs",
                                        "jobs": {}}
    text = report.markdown(report.finish(results))
    assert "| simple | 90 | 90 | 90 | 90 | 90 | 90 | 50 | **NO**: mkfs trial hash |" in text
    assert "| btrfs-raid5 | unavailable: no btrfs |" in text
    assert "| simple 4K W qd16 >= 0.8x pyfuse-blocking | 0.90 | met |" in text.replace(
        "randwrite-4k-qd16", "4K W qd16")
    assert "Ratios to pyfuse-blocking" in text
    assert "parity-1" not in text  # targets of setups not in the run are left out


def test_select_setups() -> None:
    assert catalog.select_setups("mirror-2,raw") == ["raw", "mirror-2"]
    assert catalog.select_setups("blockspace") == ["simple", "mirror-2", "mirror-3",
                                                   "parity-1", "parity-2"]
    assert len(catalog.select_setups("all")) == len(catalog.SETUPS)
    nbd = ["nbd-qemu", "nbd-nbdkit", "nbd-python", "nbd-simple"]
    assert catalog.select_setups("nbd") == nbd
    assert not set(nbd) & set(catalog.select_setups("default"))  # the default run: no NBD
    assert set(catalog.select_setups("default,nbd")) == set(catalog.select_setups("all"))
    with pytest.raises(catalog.SelectionError):
        catalog.select_setups("raid0")
    assert set(setups.BUILDERS) == {s.name for s in catalog.SETUPS}


def test_parse_profiles() -> None:
    assert parse_profiles("mirror-2:randwrite-4k-qd16, parity-1:randread-4k-qd16") == [
        ("mirror-2", "randwrite-4k-qd16"), ("parity-1", "randread-4k-qd16")]
    with pytest.raises(catalog.SelectionError):
        parse_profiles("mirror-2")


def test_profiling_without_perf_keeps_the_py_spy_passes_and_says_why() -> None:
    passes, missing = profile_passes("/p/x", None)
    assert [name for name, *_ in passes] == ["threads", "gil", "flamegraph"]
    assert missing is not None
    assert "perf is not installed" in missing
    passes, missing = profile_passes("/p/x", "/usr/bin/perf")
    assert [name for name, *_ in passes] == ["threads", "gil", "flamegraph", "perf"]
    assert passes[-1][3] == "/p/x.perf.data"
    assert missing is None


def test_profile_summary_of_collapsed_stacks() -> None:
    text = "\n".join([
        "thread (1): MainThread;run (trio/_core/_run.py:10);"
        "read (blockspace/volume/volume.py:5) 30",
        "thread (1): MainThread;run (trio/_core/_run.py:10);get_events (_core/_io_epoll.py:2) 10",
        "thread (2): io#0;_worker_loop (blockspace/disks/devices.py:308);_pread "
        "(/usr/lib/x/blockspace/disks/devices.py:400) 60",
        "garbage line",
    ])
    summary = profile.summarize(text)
    assert summary.samples == 100
    assert summary.self_samples["_pread (blockspace/disks/devices.py)"] == 60
    assert summary.total_samples["_worker_loop (blockspace/disks/devices.py)"] == 60
    assert summary.threads["thread (1): MainThread"] == 40
    assert summary.idle_samples == 10
    assert summary.self_lines["read (blockspace/volume/volume.py:5)"] == 30
    rendered = profile.render(summary, expected_per_thread=100)
    assert "60.0%  _pread (blockspace/disks/devices.py)" in rendered
    assert "busy" in rendered


def test_cpu_layers_of_a_perf_report() -> None:
    text = "\n".join([
        "# Samples: 4K of event 'cpu-clock:ppp'",
        "    30.00%  libpython3.11.so.1.0           [.] _PyEval_EvalFrameDefault",
        "    10.00%  [kernel.kallsyms]              [k] __pi_memcpy",
        "     8.00%  [kernel.kallsyms]              [k] fuse_copy_folio",
        "     7.00%  [kernel.kallsyms]              [k] copy_folio_from_iter_atomic",
        "     6.00%  libc.so.6                      [.] __memmove_avx_unaligned_erms",
        "     5.00%  _xxhash.cpython-311-x86_64-linux-gnu.so  [.] XXHL64_seed_avx2",
        "     4.00%  [kernel.kallsyms]              [k] io_issue_sqe",
        "     3.00%  libisal.so.2                   [.] gf_vect_dot_prod_avx2",
        "     2.00%  [kernel.kallsyms]              [k] finish_task_switch.isra.0",
        "     1.00%  libc.so.6                      [.] _int_free",
        "               |--0.50%--0x7f1b34f84e00",  # a call-graph line: not a sample line
    ])
    shares = cpu_layers.layers(text)
    assert shares == {
        "Python interpreter": 30.0,
        "kernel: memory copies": 10.0,
        "kernel: FUSE request transfer": 8.0,
        "kernel: page cache and file system": 7.0,
        "user-space memory copies (libc memcpy)": 6.0,
        "hashing (xxhash)": 5.0,
        "kernel: io_uring": 4.0,
        "erasure coding (ISA-L / liberasurecode)": 3.0,
        "kernel: other (syscalls, scheduling, interrupts)": 2.0,
        "other user space (malloc, libc, pyfuse3, ...)": 1.0,
    }
    rendered = cpu_layers.render(shares, "== CPU by layer")
    assert rendered.splitlines()[1] == "  30.0%  Python interpreter"
    assert cpu_layers.render(cpu_layers.layers(""), "t") == "t\n(no samples)\n"


def test_parse_mountinfo_unescapes_paths() -> None:
    line = ("42 27 0:39 / /var/tmp/b\\040x/export.img rw,nosuid - fuse /dev/fuse "
            "rw,user_id=0")
    (mount,) = system.parse_mountinfo(line)
    assert mount.mountpoint == "/var/tmp/b x/export.img"
    assert mount.fstype == "fuse"
    assert mount.device == "0:39"
    assert system.is_under("/a/b/c", "/a/b")
    assert not system.is_under("/a/bc", "/a/b")


def test_chart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One panel per job, one bar per setup as long as its figure, each bar labelled with
    it ("n/a" where a setup has none); matplotlib is in the `test` extra, so this runs."""
    import matplotlib.pyplot as plt
    from bench_lib import chart

    close = plt.close
    drawn: list[Any] = []
    monkeypatch.setattr(plt, "close", drawn.append)  # keep the figure to look into
    results = results_with({"raw": {j.name: 10.0 for j in jobs.JOBS},
                            "mirror-2": {"seqread-1m-qd4": 5.0}})
    path = tmp_path / "chart.png"
    chart.draw(results, str(path), "test")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (figure,) = drawn
    try:
        assert [ax.get_title() for ax in figure.axes] == [
            job.label + (" (IOPS)" if job.metric == "iops" else "") for job in jobs.JOBS]
        for ax, job in zip(figure.axes, jobs.JOBS, strict=True):
            mirror = 5.0 if job.name == "seqread-1m-qd4" else None
            assert [bar.get_width() for bar in ax.patches] == [10.0, mirror or 0.0], job.name
            assert [text.get_text() for text in ax.texts] == [
                jobs.format_value(10.0, job.metric),
                jobs.format_value(mirror, job.metric) if mirror else "n/a"], job.name
    finally:
        close(figure)


def test_scan_daemon_log() -> None:
    from bench_lib.runner import scan_log

    text = "\n".join([
        "2026-11-25 19:43:40,001 INFO blockspace.service.daemon: pool bench mounted",
        "2026-11-25 19:43:43,277 WARNING blockspace.volume.volume: checksum mismatch on disk 2, "
        "blocks [9296]",
        "2026-11-25 19:43:44,277 WARNING blockspace.volume.volume: checksum mismatch on disk 3, "
        "blocks [15824]",
        "2026-11-25 19:43:48,358 ERROR blockspace.service.fuse_ops: "
        "write vol at 247312384+4096 failed",
    ])
    found = scan_log(text)
    assert (found["warnings"], found["errors"]) == (2, 1)
    # the two warnings differ only in numbers: one sample for both
    assert found["samples"] == [
        "WARNING blockspace.volume.volume: checksum mismatch on disk 2, blocks [9296]",
        "ERROR blockspace.service.fuse_ops: write vol at 247312384+4096 failed",
    ]
    results = results_with({"parity-1": {"randwrite-4k-qd16": 1.0}})
    results["setups"]["parity-1"]["daemon_log"] = found
    results["setups"]["parity-1"]["verify"] = {"verify-seq-1m-qd4": "FAILED (fio error 84)"}
    lines = report.problems(results)
    assert "parity-1: verify-seq-1m-qd4: FAILED (fio error 84)" in lines
    assert any(line.startswith("parity-1: daemon log: 1 errors, 2 warnings") for line in lines)


def test_cpu_per_io_and_checksum_cache_bound_in_the_report() -> None:
    results = results_with({"simple": {j.name: 100.0 for j in jobs.JOBS}})
    results["setups"]["simple"]["daemon"] = {
        "rss_kib": {"seqwrite-1m-qd4": 51200}, "rss_start_kib": 30720, "hwm_kib": 60000,
        "cpu": {"seqwrite-1m-qd4": 0.5, "randwrite-4k-qd16": 0.2},
    }
    results["meta"]["checksum_cache_bound_mib"] = 17.2
    text = report.markdown(report.finish(results))
    assert "checksum page cache, bounded at 17.2 MiB per pool" in text
    # 0.5 cores at 100 MiB/s: 5 ms per MiB; 0.2 cores at 100 IOPS: 2000 us per I/O
    assert "| simple | 5.0 | - | - | - | - | 2000 |" in text


def test_the_checksum_cache_bound_comes_from_the_store() -> None:
    from bench_lib.cli import checksum_cache_bound_mib

    from blockspace.pool.checksum_store import DEFAULT_MAX_PAGES, PAGE

    bound = checksum_cache_bound_mib()
    assert bound is not None
    assert DEFAULT_MAX_PAGES * PAGE / 2**20 <= bound < 20
