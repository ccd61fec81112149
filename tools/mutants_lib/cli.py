"""tools/mutants: the command line."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from . import report
from .catalog import CATALOG, CatalogError, Mutation, load, select
from .mutate import MutationError, check, make_copy
from .runner import MEMORY_LIMIT, Outcome, Runner, stop_all

REPO = Path(__file__).resolve().parents[2]
DEFAULT_TIMEOUT = 900.0  # seconds per mutant; the default suite takes a few minutes here


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tools/mutants",
        description="Break each curated guarantee on purpose (one exact source replacement "
                    "from tools/mutants.toml), one at a time, in a scratch copy of the tree, "
                    "and run the tests that must notice. Reports killed/survived per "
                    "mutation; exits 1 if any survived, 2 if any could not be judged (an "
                    "entry that no longer matches the code, a selection that fails or "
                    "collects nothing without the mutation). Run before a release.")
    parser.add_argument("--list", action="store_true",
                        help="list the mutations and check each still applies; run nothing")
    parser.add_argument("--only", metavar="NAME[,NAME]",
                        help="only these mutations (names from --list)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="mutants tested at once (default 1; each runs its own pytest)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="SECONDS",
                        help="per mutant, unless its entry sets one (default %(default)g); a "
                             "mutant stopped at its limit counts as caught, shown as timeout")
    parser.add_argument("--memory-limit", type=float, default=MEMORY_LIMIT / (1 << 30),
                        metavar="GIB", help="address space per process of a mutant's tests, "
                        "in GiB (default %(default)g; 0: none): a runaway mutant gets a "
                        "MemoryError instead of taking the machine")
    parser.add_argument("--keep", action="store_true",
                        help="keep the scratch copies and pytest logs for inspection")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip running each selection once without any mutation first")
    parser.add_argument("--all-tests", dest="fail_fast", action="store_false",
                        help="run each selection to the end (default: stop at the first "
                             "failing test, which is enough to kill the mutant)")
    parser.add_argument("--json", action="store_true",
                        help="print the report as JSON on stdout (progress goes to stderr)")
    parser.add_argument("--json-file", metavar="PATH", type=Path,
                        help="also write the JSON report here")
    parser.add_argument("--catalog", type=Path, default=CATALOG,
                        help="the mutation list (default tools/mutants.toml)")
    parser.add_argument("--source", type=Path, default=REPO,
                        help="the tree to copy and mutate (default: this checkout)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()),
                        help="where the run directory is made (default %(default)s)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error("--jobs must be at least 1")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    if args.memory_limit < 0:
        parser.error("--memory-limit must be 0 (none) or positive")
    return args


def problems_of(tree: Path, mutations: Sequence[Mutation]) -> dict[str, str]:
    """Why each mutation that does not apply to `tree` does not (name -> one line)."""
    problems = {}
    for mutation in mutations:
        try:
            check(tree, mutation)
        except MutationError as error:
            problems[mutation.name] = str(error)
    return problems


def tree_info(source: Path) -> dict[str, Any]:
    """The commit the run judged, and whether the tree had uncommitted changes."""
    info: dict[str, Any] = {"path": str(source)}
    try:
        head = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"],
                              capture_output=True, text=True, check=False, timeout=30)
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain",
                                "--untracked-files=no"],
                               capture_output=True, text=True, check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return info
    if head.returncode == 0:
        info["commit"] = head.stdout.strip()
        info["uncommitted_changes"] = bool(dirty.stdout.strip())
    return info


def _progress(done: int, total: int, outcome: Outcome) -> None:
    print(f"[{done}/{total}] {outcome.status:<8} {outcome.name} ({outcome.seconds:.1f}s) "
          f"{outcome.detail}", file=sys.stderr, flush=True)


def judge(runner: Runner, mutations: Sequence[Mutation], problems: dict[str, str], *,
          baseline: bool, jobs: int,
          progress: Callable[[int, int, Outcome], None] = _progress,
          ) -> tuple[list[Outcome], list[Outcome]]:
    """(outcomes in catalog order, baseline runs). Mutations with problems are errors and
    are not run; nor are those whose selection fails its baseline."""
    outcomes: dict[str, Outcome] = {
        name: Outcome(name, "error", detail=problem) for name, problem in problems.items()}
    runnable = [m for m in mutations if m.name not in problems]
    runs: list[Outcome] = []
    if baseline and runnable:
        parts = list(dict.fromkeys(
            (part, runner.timeout_of(m)) for m in runnable for part in m.baseline_parts()))
        print(f"tools/mutants: baseline: {len(parts)} test paths without any mutation",
              file=sys.stderr, flush=True)
        runs = runner.baseline(parts, lambda done, total, run: progress(
            done, total, Outcome(f"baseline: {run.name}", run.status, run.seconds,
                                 detail=run.detail)))
        verdicts = {key: run for key, run in zip(parts, runs, strict=True)}
        for mutation in list(runnable):
            timeout = runner.timeout_of(mutation)
            bad = [verdicts[(part, timeout)] for part in mutation.baseline_parts()
                   if verdicts[(part, timeout)].status != "passed"]
            if bad:
                run = bad[0]
                why = run.detail or ", ".join(run.failed[:3])
                outcomes[mutation.name] = Outcome(
                    mutation.name, "error",
                    detail=f"the selection does not pass without the mutation "
                           f"(baseline of {run.name} {run.status}: {why})")
                runnable.remove(mutation)
    total = len(runnable)
    if jobs == 1:
        for done, mutation in enumerate(runnable, start=1):
            outcome = runner.mutant(mutation)
            outcomes[mutation.name] = outcome
            progress(done, total, outcome)
    else:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            futures = [pool.submit(runner.mutant, m) for m in runnable]
            try:
                for done, future in enumerate(as_completed(futures), start=1):
                    outcome = future.result()
                    outcomes[outcome.name] = outcome
                    progress(done, total, outcome)
            except BaseException:
                for future in futures:
                    future.cancel()
                stop_all()
                raise
    return [outcomes[m.name] for m in mutations], runs


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        mutations = load(args.catalog)
        if args.only:
            mutations = select(mutations, args.only.split(","))
    except CatalogError as error:
        print(f"tools/mutants: error: {error}", file=sys.stderr)
        return 2
    source = args.source.resolve()
    if args.list:
        problems = problems_of(source, mutations)
        if args.json:
            print(json.dumps([{"name": m.name, "guarantee": m.guarantee, "file": m.file,
                               "selection": list(m.selection()), "source": m.source,
                               "problem": problems.get(m.name, "")} for m in mutations],
                             indent=2))
        else:
            print(report.listing(mutations, problems))
        return 2 if problems else 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    rundir = Path(tempfile.mkdtemp(prefix="blockspace-mutants-", dir=args.workdir))
    # One snapshot for the whole run: the baseline and every mutant judge the same tree,
    # even if someone edits the checkout meanwhile.
    snapshot = rundir / "_source"
    tree = tree_info(source)
    try:
        make_copy(source, snapshot)
    except MutationError as error:
        print(f"tools/mutants: error: {error}", file=sys.stderr)
        shutil.rmtree(rundir, ignore_errors=True)
        return 2
    problems = problems_of(snapshot, mutations)
    runner = Runner(snapshot, rundir, sys.executable, timeout=args.timeout, keep=args.keep,
                    fail_fast=args.fail_fast, memory=int(args.memory_limit * (1 << 30)) or None)
    for name, problem in problems.items():
        print(f"tools/mutants: error: {name}: {problem}", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        outcomes, baseline = judge(runner, mutations, problems, baseline=args.baseline,
                                   jobs=args.jobs)
    except KeyboardInterrupt:
        print("tools/mutants: interrupted (the pytest under way was stopped)", file=sys.stderr)
        return 130
    finally:
        if not args.keep:
            shutil.rmtree(rundir, ignore_errors=True)
    seconds = time.monotonic() - started
    document = report.to_json(mutations, outcomes, baseline, seconds=seconds,
                              tree=tree)
    if args.keep:
        document["rundir"] = str(rundir)
    if args.json_file is not None:
        args.json_file.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(report.table(mutations, outcomes, baseline, seconds))
        if args.keep:
            print(f"\nrun directory (copies, logs): {rundir}")
    return report.exit_status(outcomes)
