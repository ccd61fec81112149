"""Running the tests against one mutant: a fresh scratch copy, pytest with the copy first on
PYTHONPATH (so its package wins over the editable install, in `python -m blockspace`
subprocesses too), a time limit, and a verdict from pytest's exit status."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .catalog import Mutation
from .mutate import MutationError, apply, make_copy

GRACE = 60.0  # seconds pytest gets after SIGINT to tear its fixtures down (mounts, loops)
# Address space per process of a mutant's run (pytest, and each daemon it starts): a mutant
# can make the suite allocate without end (three did, to 24 GiB, on a machine shared with
# others). Past it an allocation raises MemoryError in that process instead.
MEMORY_LIMIT = 8 << 30
# Sets the limit, then becomes the real command (no preexec_fn: runs may overlap in threads).
_LIMIT_SHIM = ("import os, resource, sys; n = int(sys.argv[1]); "
               "resource.setrlimit(resource.RLIMIT_AS, (n, n)); "
               "os.execvp(sys.argv[2], sys.argv[2:])")
# A pytest plugin for the runs: a hypothesis profile without the shrink phase. A mutant
# needs one failing example, not the smallest; shrinking one took the model test 5 minutes (and
# all the memory there was: see MEMORY_LIMIT).
PLUGIN = "blockspace_mutants_plugin"
PROFILE = "blockspace-mutants"
_PLUGIN_SOURCE = f'''"""Written by tools/mutants for its pytest runs."""
from hypothesis import Phase, settings

settings.register_profile({PROFILE!r}, phases=(Phase.explicit, Phase.reuse, Phase.generate))
'''
HAVE_HYPOTHESIS = importlib.util.find_spec("hypothesis") is not None

TAIL_LINES = 15
_REPORTED = re.compile(r"^(FAILED|ERROR) (\S+)", re.MULTILINE)
# A module that cannot be imported: with -x pytest exits 1 for it, as for a failed test.
_UNCOLLECTED = re.compile(r"^_+ ERROR collecting (\S+) _+$", re.MULTILINE)
_OUT_OF_MEMORY = re.compile(r"^E +MemoryError", re.MULTILINE)

# pytest's exit statuses other than 0 (passed) and 1 (tests failed): the tests did not run
# as selected, so nothing can be said about the mutation.
PYTEST_TROUBLE = {
    2: "pytest was interrupted or could not collect the tests (exit 2)",
    3: "pytest hit an internal error (exit 3)",
    4: "pytest was called wrongly (exit 4)",
    5: "the selection collected no tests (exit 5)",
}


@dataclass
class Run:
    """One pytest run: its exit status (None: stopped at the time limit), time and output."""

    returncode: int | None
    seconds: float
    output: str


@dataclass
class Outcome:
    """What happened to one mutation (or one baseline selection)."""

    name: str
    status: str  # killed, survived, timeout, error (baseline: passed, failed, timeout, error)
    seconds: float = 0.0
    failed: list[str] = field(default_factory=list)  # the tests that caught it
    detail: str = ""
    tail: str = ""  # the end of pytest's output, for errors and survivors
    kept: str = ""  # the scratch copy, with --keep

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def pytest_command(python: str, selection: Sequence[str], basetemp: Path, *,
                   fail_fast: bool = True, plugin: bool = False) -> list[str]:
    command = [python, "-m", "pytest", "-q", "--no-header", "-p", "no:cacheprovider", "-rfE",
               f"--basetemp={basetemp}"]
    if fail_fast:
        command.append("-x")  # one failing test is enough to call the mutant killed
    if plugin:
        command += ["-p", PLUGIN, f"--hypothesis-profile={PROFILE}"]
    return [*command, *selection]


def write_plugin(directory: Path) -> Path:
    """The plugin module in `directory` (made atomically: runs may start at once)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{PLUGIN}.py"
    if not path.exists():
        scratch = directory / f".{PLUGIN}.{threading.get_ident()}"
        scratch.write_text(_PLUGIN_SOURCE, encoding="utf-8")
        scratch.replace(path)
    return directory


def limited(command: Sequence[str], memory: int | None) -> list[str]:
    """`command` run with an address-space limit of `memory` bytes (None: as it is)."""
    if not memory:
        return list(command)
    return [sys.executable, "-c", _LIMIT_SHIM, str(memory), *command]


def environment(copy: Path, name: str, *extra: Path) -> dict[str, str]:
    """The copy first on PYTHONPATH (then `extra`, then what was there)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(copy), *map(str, extra), env.get("PYTHONPATH", "")) if p)
    env["BLOCKSPACE_MUTANT"] = name  # for anyone reading a process list or a log
    # A mutant is an edit of a .py file: the copy's compiled modules (blockspace/build.py),
    # built from the unmutated sources, must not be what runs.
    env["BLOCKSPACE_PURE"] = "1"
    return env


_live: set[subprocess.Popen[bytes]] = set()  # pytest runs under way, for stop_all
_live_lock = threading.Lock()


def stop_all(grace: float = GRACE) -> None:
    """Stop every pytest still running (the runner was interrupted with --jobs > 1)."""
    with _live_lock:
        running = list(_live)
    for process in running:
        _stop(process, grace)


def _stop(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGINT first, so pytest runs its fixtures' cleanup; the whole group after `grace`."""
    try:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def run_pytest(command: Sequence[str], cwd: Path, env: dict[str, str], timeout: float,
               log: Path, *, grace: float = GRACE) -> Run:
    """Run pytest in its own session, its output in `log`; stop it at `timeout` seconds."""
    start = time.monotonic()
    returncode: int | None
    with log.open("wb") as out:
        process = subprocess.Popen(list(command), cwd=cwd, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)
        with _live_lock:
            _live.add(process)
        try:
            returncode = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(process, grace)
            returncode = None
        except BaseException:  # the runner itself interrupted: leave no pytest behind
            _stop(process, grace)
            raise
        finally:
            with _live_lock:
                _live.discard(process)
    output = log.read_text(encoding="utf-8", errors="replace")
    return Run(returncode, time.monotonic() - start, output)


def tail(output: str, lines: int = TAIL_LINES) -> str:
    return "\n".join(output.rstrip().splitlines()[-lines:])


def classify(run: Run, timeout: float) -> tuple[str, list[str], str]:
    """(status, failing tests, detail) of a mutant's run. A timeout counts as caught (the
    suite would not pass) but is told apart; exits other than 0 and 1 are errors."""
    failed = list(dict.fromkeys(m.group(2) for m in _REPORTED.finditer(run.output)))
    if _OUT_OF_MEMORY.search(run.output):
        failed.append("(MemoryError: stopped by the memory limit)")
    if run.returncode is None:
        return "timeout", failed, f"no verdict within {timeout:g}s (stopped)"
    if run.returncode == 0:
        return "survived", [], "every selected test passed with the guarantee broken"
    uncollected = _UNCOLLECTED.findall(run.output)
    if uncollected:
        return "error", failed, (f"pytest could not collect {', '.join(uncollected[:3])} "
                                 f"(exit {run.returncode})")
    if run.returncode == 1:
        return "killed", failed, ", ".join(failed[:3]) or "tests failed"
    trouble = PYTEST_TROUBLE.get(run.returncode, f"pytest ended with status {run.returncode}")
    return "error", failed, trouble


def check_import(python: str, copy: Path, env: dict[str, str], package: str) -> None:
    """MutationError unless `package` imports from the copy (not the editable install)."""
    probe = f"import {package}; print({package}.__file__)"
    result = subprocess.run([python, "-c", probe], cwd=copy, env=env, capture_output=True,
                            text=True, check=False, timeout=120)
    where = result.stdout.strip()
    if result.returncode != 0 or not Path(where).resolve().is_relative_to(copy.resolve()):
        raise MutationError(f"{package} does not import from the scratch copy "
                            f"({where or result.stderr.strip()[-200:]})")


class Runner:
    """Runs one mutant per call; calls for different mutations may overlap (`--jobs`): each
    works in its own directory of the run directory, `<name>/` with `tree/` (the copy),
    `tmp/` (pytest's --basetemp) and `pytest.log`. Without `keep`, each is removed after."""

    BASELINE = "_baseline"  # no mutation name starts with "_"

    def __init__(self, source: Path, rundir: Path, python: str, *, timeout: float,
                 keep: bool = False, fail_fast: bool = True, grace: float = GRACE,
                 memory: int | None = MEMORY_LIMIT, package: str | None = "blockspace") -> None:
        self.source = source
        self.rundir = rundir
        self.python = python
        self.timeout = timeout
        self.keep = keep
        self.fail_fast = fail_fast
        self.grace = grace
        self.memory = memory
        self.package = package  # must import from the copy; None: not checked

    def timeout_of(self, mutation: Mutation) -> float:
        return mutation.timeout if mutation.timeout is not None else self.timeout

    def _pytest(self, tree: Path, work: Path, label: str, selection: Sequence[str],
                timeout: float) -> Run:
        plugin = [write_plugin(self.rundir / "_plugin")] if HAVE_HYPOTHESIS else []
        env = environment(tree, label, *plugin)
        if self.package is not None:
            check_import(self.python, tree, env, self.package)
        command = pytest_command(self.python, selection, work / "tmp", fail_fast=self.fail_fast,
                                 plugin=bool(plugin))
        return run_pytest(limited(command, self.memory), tree, env, timeout,
                          work / "pytest.log", grace=self.grace)

    def _done(self, work: Path) -> str:
        """Remove a mutant's directory unless `keep`; its path when kept."""
        if self.keep:
            return str(work)
        try:
            shutil.rmtree(work)
        except FileNotFoundError:
            pass
        except OSError as error:  # e.g. a mount a failed test left behind
            print(f"tools/mutants: warning: could not remove {work}: {error}", file=sys.stderr)
        return ""

    def mutant(self, mutation: Mutation) -> Outcome:
        """Copy, break, test: the outcome (a mutation's own trouble is an "error" outcome,
        not an exception)."""
        work = self.rundir / mutation.name
        timeout = self.timeout_of(mutation)
        try:
            work.mkdir(parents=True)
            make_copy(self.source, work / "tree")
            apply(work / "tree", mutation)
            run = self._pytest(work / "tree", work, mutation.name, mutation.selection(),
                               timeout)
        except (MutationError, OSError) as error:
            return Outcome(mutation.name, "error", detail=str(error), kept=self._done(work))
        status, failed, detail = classify(run, timeout)
        return Outcome(mutation.name, status, run.seconds, failed, detail,
                       tail=tail(run.output),
                       kept=self._done(work))

    def baseline(self, selections: Sequence[tuple[tuple[str, ...], float]],
                 progress: Callable[[int, int, Outcome], None] | None = None) -> list[Outcome]:
        """Each distinct (selection, timeout) run once on an unbroken copy: a mutant is only
        "killed" by tests that pass without it. Status passed, failed, timeout or error."""
        root = self.rundir / self.BASELINE
        try:
            root.mkdir(parents=True)
            make_copy(self.source, root / "tree")
        except (MutationError, OSError) as error:
            self._done(root)
            return [Outcome(" ".join(s), "error", detail=str(error)) for s, _ in selections]
        outcomes = []
        for number, (selection, timeout) in enumerate(selections):
            label = " ".join(selection)
            work = root / str(number)
            work.mkdir()
            try:
                run = self._pytest(root / "tree", work, self.BASELINE, selection, timeout)
            except MutationError as error:
                outcomes.append(Outcome(label, "error", detail=str(error)))
            else:
                status, failed, detail = classify(run, timeout)
                verdict = {"survived": "passed", "killed": "failed"}.get(status, status)
                outcomes.append(Outcome(label, verdict, run.seconds, failed,
                                        "" if verdict == "passed" else detail,
                                        tail="" if verdict == "passed" else tail(run.output)))
            if progress is not None:
                progress(number + 1, len(selections), outcomes[-1])
        self._done(root)
        return outcomes
