"""The report: a table per mutation (result, time, which test caught it), the survivors with
their guarantees, and the same as JSON."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from .catalog import Mutation
from .runner import Outcome

CAUGHT = ("killed", "timeout")
ORDER = ("killed", "timeout", "survived", "error")


def counts(outcomes: Sequence[Outcome]) -> dict[str, int]:
    found = Counter(o.status for o in outcomes)
    return {status: found.get(status, 0) for status in ORDER}


def exit_status(outcomes: Sequence[Outcome]) -> int:
    """0: every mutant caught; 1: some survived; 2: some could not be judged (errors)."""
    tally = counts(outcomes)
    if tally["error"]:
        return 2
    return 1 if tally["survived"] else 0


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def table(mutations: Sequence[Mutation], outcomes: Sequence[Outcome],
          baseline: Sequence[Outcome] = (), seconds: float | None = None) -> str:
    by_name = {m.name: m for m in mutations}
    width = max([len("mutation"), *(len(o.name) for o in outcomes)])
    lines = []
    if baseline:
        lines.append("baseline (each selection without any mutation):")
        for run in baseline:
            note = f"  {run.detail}" if run.detail else ""
            lines.append(f"  {run.status:<8} {run.seconds:7.1f}s  {_clip(run.name, 70)}{note}")
        lines.append("")
    lines.append(f"{'mutation':<{width}}  {'result':<8}  {'time':>8}  caught by / why")
    lines.append(f"{'-' * width}  {'-' * 8}  {'-' * 8}  {'-' * 40}")
    for outcome in outcomes:
        lines.append(f"{outcome.name:<{width}}  {outcome.status:<8}  {outcome.seconds:7.1f}s  "
                     f"{_clip(outcome.detail, 100)}")
    tally = counts(outcomes)
    summary = ", ".join(f"{n} {status}" for status, n in tally.items() if n)
    took = f" in {seconds:.0f}s" if seconds is not None else ""
    lines.append("")
    lines.append(f"{len(outcomes)} mutations: {summary}{took}")
    survivors = [o for o in outcomes if o.status == "survived"]
    if survivors:
        lines.append("")
        lines.append("Survived: no selected test notices these guarantees broken:")
        for outcome in survivors:
            mutation = by_name.get(outcome.name)
            if mutation is not None:
                lines.append(f"- {outcome.name} ({mutation.file}; tests: "
                             f"{mutation.describe_selection()}): {mutation.guarantee}")
    errors = [o for o in outcomes if o.status == "error"]
    if errors:
        lines.append("")
        lines.append("Errors (the run fails until they are fixed):")
        for outcome in errors:
            lines.append(f"- {outcome.name}: {outcome.detail}")
            if outcome.tail:
                lines.extend("    " + line for line in outcome.tail.splitlines()[-5:])
    kept = [o.kept for o in outcomes if o.kept]
    if kept:
        lines.append("")
        lines.append(f"Scratch copies kept under {kept[0].rsplit('/', 1)[0]}")
    return "\n".join(lines)


def listing(mutations: Sequence[Mutation], problems: dict[str, str]) -> str:
    """`--list`: every entry, whether it applies to today's tree, and what must catch it."""
    width = max(len(m.name) for m in mutations)
    lines = []
    for mutation in mutations:
        problem = problems.get(mutation.name)
        state = "ERROR" if problem else "ok"
        lines.append(f"{mutation.name:<{width}}  {state:<5}  {mutation.file}  "
                     f"[{mutation.describe_selection()}]")
        lines.append(f"{'':<{width}}         {mutation.guarantee}")
        if problem:
            lines.append(f"{'':<{width}}         -> {problem}")
    bad = len(problems)
    lines.append("")
    lines.append(f"{len(mutations)} mutations, {len(mutations) - bad} apply to this tree"
                 + (f", {bad} do not" if bad else ""))
    return "\n".join(lines)


def to_json(mutations: Sequence[Mutation], outcomes: Sequence[Outcome],
            baseline: Sequence[Outcome] = (), *, seconds: float | None = None,
            tree: dict[str, Any] | None = None) -> dict[str, Any]:
    by_name = {m.name: m for m in mutations}
    rows = []
    for outcome in outcomes:
        row = outcome.to_dict()
        mutation = by_name.get(outcome.name)
        if mutation is not None:
            row.update(guarantee=mutation.guarantee, file=mutation.file,
                       selection=list(mutation.selection()), source=mutation.source)
        rows.append(row)
    return {
        "tree": tree or {},
        "seconds": seconds,
        "summary": counts(outcomes),
        "exit_status": exit_status(outcomes),
        "baseline": [run.to_dict() for run in baseline],
        "mutations": rows,
    }
