"""tools/mutants (README "Mutation check"): the catalog is read strictly and applies to
today's tree, a mutation is applied to a scratch copy only, a missing or ambiguous original
is an error, pytest's verdict is read right, and the report says what survived.

The runner is driven end to end on a tiny tree of its own (a fake `blockspace` package with
two tests), never on the project's suite: a few seconds in all.
"""

from __future__ import annotations

import json
import os
import re
import sys
import textwrap
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))

from mutants_lib import catalog, report  # noqa: E402
from mutants_lib.catalog import CatalogError, Mutation  # noqa: E402
from mutants_lib.cli import judge, main, problems_of  # noqa: E402
from mutants_lib.mutate import MutationError, apply, check, make_copy, mutated_text  # noqa: E402
from mutants_lib.runner import (  # noqa: E402
    Outcome,
    Run,
    Runner,
    classify,
    environment,
    pytest_command,
)

REPO = Path(__file__).resolve().parents[2]


def mutation(**fields: object) -> Mutation:
    values: dict[str, object] = {
        "name": "m", "guarantee": "g", "file": "blockspace/core.py",
        "original": "return 2 * x", "replacement": "return 3 * x",
        "tests": ("tests/test_core.py",),
    }
    values.update(fields)
    return Mutation(**values)  # type: ignore[arg-type]


def entry(**fields: object) -> dict[str, object]:
    values: dict[str, object] = {
        "name": "m", "guarantee": "g", "file": "blockspace/core.py",
        "original": "a", "replacement": "b",
    }
    values.update(fields)
    return values


CORE = '''\
def double(x: int) -> int:
    return 2 * x


def triple(x: int) -> int:
    return 3 * x
'''

TESTS = '''\
import signal
import subprocess
import sys
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from blockspace.core import double


def test_double() -> None:
    assert double(4) == 8


def test_hangs_when_told(request) -> None:
    if request.config.getoption("keyword") == "hang":
        signal.pause()  # until the runner's SIGINT at its time limit


def test_allocates_when_told(request) -> None:
    if request.config.getoption("keyword") == "allocate":
        bytearray(1536 << 20)  # refused at once under a 1 GiB limit: nothing is touched


def test_a_subprocess_elsewhere_imports_the_copy(request) -> None:
    """Like a daemon started by a test: another directory, only PYTHONPATH to go by."""
    found = subprocess.run(
        [sys.executable, "-c", "import blockspace.core; print(blockspace.core.__file__)"],
        cwd="/", capture_output=True, text=True, check=True).stdout.strip()
    assert Path(found).is_relative_to(Path.cwd())  # the runner runs pytest in the copy


@given(st.integers(min_value=0, max_value=1 << 30))
def test_shrinks_when_told(request, value: int) -> None:
    if request.config.getoption("keyword") == "shrink":
        assert value < 1000  # fails at once; shrinking would walk it down to 1000
'''


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A tiny project: a fake `blockspace` package (`double` is tested, `triple` is not),
    and things a scratch copy must leave out."""
    root = tmp_path / "src"
    (root / "blockspace").mkdir(parents=True)
    (root / "blockspace" / "__init__.py").write_text("")
    (root / "blockspace" / "core.py").write_text(CORE)
    (root / "tests").mkdir()
    (root / "tests" / "test_core.py").write_text(TESTS)
    for junk in (".git", ".venv/bin", "blockspace/__pycache__", "demo"):
        (root / junk).mkdir(parents=True)
        (root / junk / "x").write_text("junk")
    (root / "tests" / "demo").mkdir()  # only the top-level demo/ is left out
    (root / "tests" / "demo" / "keep.txt").write_text("kept")
    return root


# ---- the catalog -------------------------------------------------------------------------


def test_every_curated_mutation_applies_to_this_tree_and_the_table_rows_are_there() -> None:
    """The list follows the code: an entry whose text moved fails here, at once, not only
    when someone runs the tool before a release."""
    mutations = catalog.load()
    assert problems_of(REPO, mutations) == {}
    rows = {m.source for m in mutations if m.source.startswith("issue 21 table row")}
    assert rows == {f"issue 21 table row {n}" for n in range(1, 10)}
    assert len(mutations) >= 30


def test_an_entry_reads_into_a_mutation_with_its_selection() -> None:
    parsed = catalog.parse({"mutation": [entry(
        name="slot-alternates", tests=["tests/a.py::test_x", "tests/b.py"], keyword="slot",
        timeout=60, guarantee="  spread\n over   lines ")]})
    assert parsed == [Mutation("slot-alternates", "spread over lines", "blockspace/core.py",
                               "a", "b", ("tests/a.py::test_x", "tests/b.py"), "slot",
                               "not slow", 60.0)]
    assert parsed[0].selection() == ("-m", "not slow", "-k", "slot", "tests/a.py::test_x",
                                     "tests/b.py")
    assert parsed[0].test_paths() == ["tests/a.py", "tests/b.py"]
    assert parsed[0].baseline_parts() == [("-m", "not slow", "-k", "slot", "tests/a.py::test_x"),
                                          ("-m", "not slow", "-k", "slot", "tests/b.py")]
    default = catalog.parse({"mutation": [entry(marker="")]})[0]
    assert default.selection() == ()
    assert default.baseline_parts() == [()]  # the whole default suite, as one part
    assert default.describe_selection() == "the default suite"


@pytest.mark.parametrize(("fields", "message"), [
    ({"guarantee": None}, "missing guarantee"),
    ({"colour": "red"}, "unknown keys colour"),
    ({"name": "Has Spaces"}, "lower-case"),
    ({"replacement": "a"}, "no mutation"),
    ({"original": ""}, "original text is empty"),
    ({"file": "/etc/passwd"}, "inside the repository"),
    ({"file": "../x.py"}, "inside the repository"),
    ({"tests": "tests/a.py"}, "list of pytest paths"),
    ({"tests": ["/abs/test.py"]}, "paths inside the repository"),
    ({"timeout": 0}, "positive number"),
    ({"timeout": True}, "positive number"),
    ({"original": 3}, "must be a string"),
])
def test_a_bad_entry_is_refused_with_its_name_and_reason(
    fields: dict[str, object], message: str
) -> None:
    values = entry(**fields)
    values = {k: v for k, v in values.items() if v is not None}
    with pytest.raises(CatalogError, match=message):
        catalog.parse({"mutation": [values]})


def test_duplicate_names_unknown_tables_and_an_empty_list_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match="listed twice"):
        catalog.parse({"mutation": [entry(), entry()]})
    with pytest.raises(CatalogError, match="unknown top-level keys extra"):
        catalog.parse({"mutation": [entry()], "extra": 1})
    with pytest.raises(CatalogError, match="no \\[\\[mutation\\]\\] entries"):
        catalog.parse({})
    broken = tmp_path / "broken.toml"
    broken.write_text("[[mutation]\n")
    with pytest.raises(CatalogError, match="broken.toml"):
        catalog.load(broken)


def test_only_picks_named_mutations_in_catalog_order_and_refuses_unknown_names() -> None:
    mutations = [mutation(name=n) for n in ("a", "b", "c")]
    assert [m.name for m in catalog.select(mutations, ["c", " a"])] == ["a", "c"]
    with pytest.raises(CatalogError, match="no mutation named zz"):
        catalog.select(mutations, ["a", "zz"])


def test_the_toml_literal_strings_keep_the_source_text_exactly(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    path.write_text(textwrap.dedent("""\
        [[mutation]]
        name = "m"
        guarantee = "g"
        file = "blockspace/core.py"
        original = '''
            return 2 * x
        '''
        replacement = '''
            return 3 * x  # mutant
        '''
        """))
    (loaded,) = catalog.load(path)
    assert loaded.original == "    return 2 * x\n"
    assert loaded.replacement == "    return 3 * x  # mutant\n"


# ---- applying a mutation -----------------------------------------------------------------


def test_the_original_text_is_replaced_once() -> None:
    assert mutated_text(CORE, mutation()) == CORE.replace("return 2 * x", "return 3 * x")


def test_an_original_that_is_not_there_is_an_error_not_a_skip() -> None:
    with pytest.raises(MutationError, match="original text is not there"):
        mutated_text(CORE, mutation(original="return 5 * x"))


@pytest.mark.parametrize(("original", "count"), [("return", 2), (" * x\n", 2), ("xx", 2)])
def test_an_original_found_more_than_once_is_an_error(original: str, count: int) -> None:
    text = CORE + "# xxx\n"  # "xx" occurs twice in "xxx", overlapping
    with pytest.raises(MutationError, match=f"occurs {count} times"):
        mutated_text(text, mutation(original=original, replacement="?"))


def test_a_mutant_that_does_not_compile_is_an_error() -> None:
    with pytest.raises(MutationError, match="does not compile"):
        mutated_text(CORE, mutation(replacement="return 2 *"))
    text = "plain text, not python\n"  # other files are not compiled
    assert mutated_text(text, mutation(file="docs/x.md", original="plain", replacement="(")) \
        == "( text, not python\n"


def test_check_names_a_missing_file_or_a_missing_test(tree: Path) -> None:
    assert "3 * x" in check(tree, mutation())
    with pytest.raises(MutationError, match="no such file"):
        check(tree, mutation(file="blockspace/gone.py"))
    with pytest.raises(MutationError, match="do not exist: tests/test_gone.py"):
        check(tree, mutation(tests=("tests/test_core.py::test_double",
                                    "tests/test_gone.py::test_x")))


def test_the_mutation_lands_in_the_copy_and_the_source_is_untouched(
    tree: Path, tmp_path: Path
) -> None:
    copy = tmp_path / "copy"
    make_copy(tree, copy)
    apply(copy, mutation())
    assert (copy / "blockspace" / "core.py").read_text() == CORE.replace("2 * x", "3 * x")
    assert (tree / "blockspace" / "core.py").read_text() == CORE
    for left_out in (".git", ".venv", "blockspace/__pycache__", "demo"):
        assert not (copy / left_out).exists(), left_out
    assert (copy / "tests" / "demo" / "keep.txt").read_text() == "kept"
    with pytest.raises(MutationError, match="not a fresh scratch copy"):
        make_copy(tree, copy)


# ---- pytest's verdict --------------------------------------------------------------------


def test_exit_statuses_are_read_as_killed_survived_timeout_or_error() -> None:
    output = ("F\nFAILED tests/test_a.py::test_x - assert 1 == 2\n"
              "ERROR tests/test_b.py::test_y - RuntimeError\n1 failed\n")
    assert classify(Run(1, 1.0, output), 60) == (
        "killed", ["tests/test_a.py::test_x", "tests/test_b.py::test_y"],
        "tests/test_a.py::test_x, tests/test_b.py::test_y")
    assert classify(Run(0, 1.0, "3 passed"), 60)[0] == "survived"
    assert classify(Run(None, 60.0, ""), 60) == ("timeout", [], "no verdict within 60s (stopped)")
    assert classify(Run(5, 1.0, ""), 60) == ("error", [], "the selection collected no tests "
                                                         "(exit 5)")
    assert classify(Run(2, 1.0, "ImportError"), 60)[0] == "error"
    # With -x a module that cannot be imported exits 1 too: not a kill, the tests never ran.
    uncollected = ("____ ERROR collecting tests/engine/test_crash.py ____\nImportError\n"
                   "ERROR tests/engine/test_crash.py\n1 error in 0.3s\n")
    assert classify(Run(1, 1.0, uncollected), 60) == (
        "error", ["tests/engine/test_crash.py"],
        "pytest could not collect tests/engine/test_crash.py (exit 1)")
    assert classify(Run(-9, 1.0, ""), 60)[2] == "pytest ended with status -9"


def test_the_pytest_command_stops_at_the_first_failure_unless_asked() -> None:
    command = pytest_command("py", ("-m", "not slow", "tests/a.py"), Path("/t"))
    assert command[:3] == ["py", "-m", "pytest"]
    assert "-x" in command
    assert "--basetemp=/t" in command
    assert command[-3:] == ["-m", "not slow", "tests/a.py"]
    assert "-x" not in pytest_command("py", (), Path("/t"), fail_fast=False)


# ---- the runner, end to end on the tiny tree --------------------------------------------


def test_a_caught_mutant_is_killed_an_untested_one_survives_and_the_source_stays(
    tree: Path, tmp_path: Path
) -> None:
    """Also proves the copy's package wins over the editable install: the real blockspace
    has no `blockspace.core`, so the tests only pass importing the copy's."""
    runner = Runner(tree, tmp_path / "run", sys.executable, timeout=120, package="blockspace")
    caught = mutation(name="double-doubles")
    untested = mutation(name="triple-triples", original="return 3 * x",
                        replacement="return 4 * x")
    outcomes, baseline = judge(runner, [caught, untested], {}, baseline=True, jobs=1,
                               progress=lambda *_: None)
    assert [(b.status, b.name) for b in baseline] == [
        ("passed", "-m not slow tests/test_core.py")]  # one selection shared by both
    assert [(o.name, o.status) for o in outcomes] == [
        ("double-doubles", "killed"), ("triple-triples", "survived")]
    assert outcomes[0].failed == ["tests/test_core.py::test_double"]
    assert "passed" in outcomes[1].tail
    assert (tree / "blockspace" / "core.py").read_text() == CORE
    left = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert left == ["_plugin"]  # no copy kept without --keep, only the runs' pytest plugin


def test_keep_leaves_the_mutated_copy_and_its_log(tree: Path, tmp_path: Path) -> None:
    runner = Runner(tree, tmp_path / "run", sys.executable, timeout=120, keep=True)
    outcome = runner.mutant(mutation(name="kept"))
    assert outcome.status == "killed"
    kept = Path(outcome.kept)
    assert "return 3 * x" in (kept / "tree" / "blockspace" / "core.py").read_text()
    assert "FAILED tests/test_core.py::test_double" in (kept / "pytest.log").read_text()


def test_a_mutant_that_hangs_is_stopped_at_its_time_limit(tree: Path, tmp_path: Path) -> None:
    runner = Runner(tree, tmp_path / "run", sys.executable, timeout=120, grace=30)
    hang = mutation(name="hangs", original="return 3 * x", replacement="return 4 * x",
                    keyword="hang", timeout=1.0)
    outcome = runner.mutant(hang)
    assert outcome.status == "timeout"
    assert outcome.detail == "no verdict within 1s (stopped)"
    assert outcome.seconds < 30  # SIGINT ended it; the group was not left to the grace


def test_a_mutant_that_allocates_without_end_gets_a_memory_error(
    tree: Path, tmp_path: Path
) -> None:
    runner = Runner(tree, tmp_path / "run", sys.executable, timeout=120, memory=1 << 30)
    outcome = runner.mutant(mutation(name="greedy", keyword="allocate"))
    assert outcome.status == "killed"
    assert outcome.failed == ["tests/test_core.py::test_allocates_when_told",
                              "(MemoryError: stopped by the memory limit)"]


def test_a_failing_hypothesis_example_is_not_shrunk(tree: Path, tmp_path: Path) -> None:
    """One failing example kills a mutant; the smallest one is not worth minutes."""
    runner = Runner(tree, tmp_path / "run", sys.executable, timeout=120, keep=True)
    outcome = runner.mutant(mutation(name="shrinks", keyword="shrink"))
    assert outcome.status == "killed"
    log = (Path(outcome.kept) / "pytest.log").read_text()
    found = re.search(r"^E +value=([\d_]+),$", log, re.MULTILINE)  # the failing case
    assert found is not None, log
    assert int(found.group(1).replace("_", "")) != 1000  # where shrinking would end


def test_a_selection_that_fails_without_the_mutation_makes_its_mutants_errors(
    tree: Path, tmp_path: Path
) -> None:
    (tree / "tests" / "test_core.py").write_text(TESTS + "\n\ndef test_broken() -> None:\n"
                                                  "    assert False\n")
    (tree / "tests" / "test_other.py").write_text(
        "from blockspace.core import double\n\n\n"
        "def test_double_again() -> None:\n    assert double(1) == 2\n")
    runner = Runner(tree, tmp_path / "run", sys.executable, timeout=120)
    both = mutation(name="both", tests=("tests/test_core.py", "tests/test_other.py"))
    other = mutation(name="other", tests=("tests/test_other.py",))
    outcomes, baseline = judge(runner, [both, other], {}, baseline=True, jobs=1,
                               progress=lambda *_: None)
    # Each path once, however many entries name it.
    assert [(b.name, b.status) for b in baseline] == [
        ("-m not slow tests/test_core.py", "failed"), ("-m not slow tests/test_other.py",
                                                       "passed")]
    assert outcomes[0].status == "error"
    assert "does not pass without the mutation" in outcomes[0].detail
    assert "tests/test_core.py::test_broken" in outcomes[0].detail
    assert (outcomes[1].name, outcomes[1].status) == ("other", "killed")


def test_a_selection_that_collects_nothing_is_an_error(tree: Path, tmp_path: Path) -> None:
    runner = Runner(tree, tmp_path / "run", sys.executable, timeout=120)
    outcome = runner.mutant(mutation(keyword="no_such_test"))
    assert (outcome.status, outcome.detail) == ("error", "the selection collected no tests "
                                                         "(exit 5)")


# ---- the report and the command line ----------------------------------------------------


def test_the_report_lists_each_result_the_survivors_guarantees_and_the_errors() -> None:
    mutations = [mutation(name="caught"), mutation(name="missed", guarantee="It promises."),
                 mutation(name="stale")]
    outcomes = [Outcome("caught", "killed", 2.5, ["tests/t.py::test_a"], "tests/t.py::test_a"),
                Outcome("missed", "survived", 3.0, detail="every selected test passed"),
                Outcome("stale", "error", detail="blockspace/core.py: the original text is "
                                                 "not there")]
    text = report.table(mutations, outcomes, seconds=6)
    assert re.search(r"^caught +killed +2\.5s +tests/t\.py::test_a$", text, re.MULTILINE)
    assert "3 mutations: 1 killed, 1 survived, 1 error in 6s" in text
    assert "- missed (blockspace/core.py; tests: tests/test_core.py): It promises." in text
    assert "- stale: blockspace/core.py: the original text is not there" in text
    document = json.loads(json.dumps(report.to_json(mutations, outcomes, seconds=6)))
    assert document["summary"] == {"killed": 1, "timeout": 0, "survived": 1, "error": 1}
    assert document["exit_status"] == 2
    assert document["mutations"][1]["guarantee"] == "It promises."
    assert document["mutations"][1]["selection"] == ["-m", "not slow", "tests/test_core.py"]


@pytest.mark.parametrize(("statuses", "expected"), [
    (["killed", "timeout"], 0), (["killed", "survived"], 1), (["survived", "error"], 2),
])
def test_the_exit_status_fails_on_any_survivor_or_error(
    statuses: list[str], expected: int
) -> None:
    assert report.exit_status([Outcome(str(i), s) for i, s in enumerate(statuses)]) == expected


def test_list_checks_every_entry_against_the_tree(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.toml"
    good.write_text(textwrap.dedent("""\
        [[mutation]]
        name = "doubles"
        guarantee = "double doubles"
        file = "blockspace/core.py"
        original = "return 2 * x"
        replacement = "return 3 * x"
        tests = ["tests/test_core.py"]
        """))
    assert main(["--list", "--catalog", str(good), "--source", str(tree)]) == 0
    assert "doubles  ok     blockspace/core.py  [tests/test_core.py]" in capsys.readouterr().out
    stale = tmp_path / "stale.toml"
    stale.write_text(good.read_text().replace("2 * x", "7 * x"))
    assert main(["--list", "--catalog", str(stale), "--source", str(tree)]) == 2
    assert "original text is not there" in capsys.readouterr().out
    assert main(["--only", "nope", "--catalog", str(good), "--source", str(tree)]) == 2
    assert "no mutation named nope" in capsys.readouterr().err


def test_a_run_from_the_command_line_reports_and_cleans_up(
    tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.toml"
    good.write_text(textwrap.dedent("""\
        [[mutation]]
        name = "doubles"
        guarantee = "double doubles"
        file = "blockspace/core.py"
        original = "return 2 * x"
        replacement = "return 3 * x"
        tests = ["tests/test_core.py"]

        [[mutation]]
        name = "triples"
        guarantee = "triple triples"
        file = "blockspace/core.py"
        original = "return 3 * x"
        replacement = "return 4 * x"
        tests = ["tests/test_core.py"]
        """))
    work = tmp_path / "work"
    result = tmp_path / "result.json"
    status = main(["--catalog", str(good), "--source", str(tree), "--workdir", str(work),
                   "--json-file", str(result)])
    assert status == 1  # "triples" survives: no test looks at triple()
    out = capsys.readouterr().out
    assert "2 mutations: 1 killed, 1 survived" in out
    assert "- triples (blockspace/core.py; tests: tests/test_core.py): triple triples" in out
    document = json.loads(result.read_text())
    assert [(m["name"], m["status"]) for m in document["mutations"]] == [
        ("doubles", "killed"), ("triples", "survived")]
    assert document["tree"]["path"] == str(tree)
    assert list(work.iterdir()) == []  # the snapshot and the copies are gone


def test_a_mutant_runs_the_pure_sources_not_a_compiled_build(tmp_path: Path) -> None:
    """The mutated .py is what must run: a compiled module of the copy (built from the
    unmutated source, blockspace/build.py) would shadow it and let the mutant survive."""
    env = environment(tmp_path, "some-mutant")
    assert env["BLOCKSPACE_PURE"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(tmp_path)
