"""tools/scenarios: the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from . import report
from .system import Interrupted, missing_prerequisites, terminate_as_interrupt
from .trials import FULL, LAYOUTS, ONLY_ON, QUICK, SCENARIOS, Result, run_trial

# The short version, run by the default test suite (tests/test_scenarios.py): three scenarios
# on a mirror and on dual parity, small files: a disk lost and replaced under writes, one disk
# more than the tolerance lost, rot on one disk plus the loss of another.
QUICK_SET: tuple[tuple[str, str], ...] = tuple(
    (scenario, layout)
    for scenario in ("loss-within-tolerance", "loss-beyond-tolerance", "bitrot-and-loss")
    for layout in ("mirror-2", "parity-2")
)

DEFAULT_WORKDIR = Path("/var/tmp/blockspace-scenarios")


def _names(text: str, known: Mapping[str, object], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise SystemExit(f"tools/scenarios: error: unknown {what} {', '.join(unknown) or text!r}"
                         f" (choose from {', '.join(known)})")
    return names


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="tools/scenarios",
        description="Scripted fault trials: ext4 on a Blockspace volume under a real write "
                    "workload while disks die, flake, slow down or rot; every acknowledged byte "
                    "is checked at the end. See docs/scenarios.md.")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--all", action="store_true",
                       help="every scenario on every layout, full size (the documented suite)")
    which.add_argument("--quick", action="store_true",
                       help="the short version run by the test suite: "
                            + ", ".join(f"{s}/{la}" for s, la in QUICK_SET))
    parser.add_argument("--scenarios", "--only", metavar="A,B", help="only these scenarios "
                        f"({', '.join(SCENARIOS)})")
    parser.add_argument("--layouts", metavar="X,Y",
                        help=f"only these layouts ({', '.join(LAYOUTS)})")
    parser.add_argument("--size", choices=("full", "quick"),
                        help="data and fault durations (default: full, quick with --quick)")
    parser.add_argument("--provisioning", choices=("thin", "fixed"), default="thin",
                        help="of the trial volumes (default thin, the product's default)")
    parser.add_argument("--seed", type=int, default=1, help="content, rot and fault seed")
    parser.add_argument("--json", action="store_true",
                        help="print the results as JSON on stdout (verdicts go to stderr)")
    parser.add_argument("--json-file", metavar="PATH", help="also write the JSON here")
    parser.add_argument("--markdown", action="store_true", help="print the table as markdown")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                        help=f"where trial directories are made (default {DEFAULT_WORKDIR})")
    parser.add_argument("--keep", action="store_true",
                        help="keep each trial's directory (images, logs) after it ends")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every step")
    parser.add_argument("--list", action="store_true", help="list scenarios and layouts")
    args = parser.parse_args(argv)
    if not (args.all or args.quick or args.scenarios or args.layouts or args.list):
        parser.error("say what to run: --all, --quick, or --scenarios/--layouts")
    return args


def selection(args: argparse.Namespace) -> list[tuple[str, str]]:
    if args.quick and not (args.scenarios or args.layouts):
        return list(QUICK_SET)
    scenarios = _names(args.scenarios, SCENARIOS, "scenario") if args.scenarios else list(
        SCENARIOS)
    layouts = _names(args.layouts, LAYOUTS, "layout") if args.layouts else list(LAYOUTS)
    # A scenario made for some layouts (ONLY_ON) runs on those of the selected ones only.
    return [(s, la) for s in scenarios for la in layouts if la in ONLY_ON.get(s, layouts)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        for name, function in SCENARIOS.items():
            print(f"{name}: {(function.__doc__ or '').strip().splitlines()[0]}")
        print("layouts: " + ", ".join(f"{la.name} ({la.width} disks, tolerates {la.tolerance})"
                                      for la in LAYOUTS.values()))
        return 0
    missing = missing_prerequisites()
    if missing:
        print(f"tools/scenarios: {missing}", file=sys.stderr)
        return 2
    sizes = QUICK if (args.size == "quick" or (args.quick and args.size is None)) else FULL
    trials = selection(args)
    out = sys.stderr if args.json else sys.stdout

    def say(text: str) -> None:
        print(text, file=out, flush=True)

    def echo(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    say(f"{len(trials)} trials ({sizes.name} size, {args.provisioning} volumes), "
        f"seed {args.seed}")
    results: list[Result] = []
    started = time.monotonic()
    interrupted = False
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        with terminate_as_interrupt():
            for scenario, layout in trials:
                result = run_trial(scenario, layout, sizes, seed=args.seed,
                                   workroot=args.workdir, keep=args.keep,
                                   provisioning=args.provisioning,
                                   echo=echo if args.verbose else None)
                results.append(result)
                say(report.verdict_line(result))
    except (KeyboardInterrupt, Interrupted):
        interrupted = True
        say("interrupted: every mount, loop device and daemon of the running trial was "
            "taken down")
    finally:
        try:
            args.workdir.rmdir()  # only when empty: other runs (or --keep) may use it
        except OSError:
            pass
    seconds = time.monotonic() - started
    say("")
    say(report.table(results, markdown=args.markdown))
    say(report.summary(results, seconds))
    failed = [r for r in results if r.verdict == "FAILED"]
    for r in failed:
        say(f"\nFAILED {r.scenario} {r.layout}:")
        for problem in r.problems:
            say("  - " + problem.replace("\n", "\n    "))
    document = report.document(results, mode=sizes.name, seed=args.seed, seconds=seconds,
                               interrupted=interrupted)
    document["provisioning"] = args.provisioning
    if args.json:
        print(json.dumps(document, indent=2))
    if args.json_file:
        Path(args.json_file).write_text(json.dumps(document, indent=2) + "\n")
    if interrupted:
        return 130
    return 1 if failed else 0
