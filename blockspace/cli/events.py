"""`blockspace events POOL [--follow]` (the pool's event log, blockspace/events/log.py) and
`blockspace pool history POOL` (the commands that changed it); both read files in the state
directory, so they work mounted or not. The history is recorded here too, by `main`, when a
command that changes a pool succeeds."""

import argparse
import sys
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from blockspace.admin.registry import Registry
from blockspace.cli.common import OK, Parser, registry_of
from blockspace.cli.output import console, emit, json_line, table
from blockspace.events import history
from blockspace.events.log import EventLog, events_path
from blockspace.events.record import Event, describe, make_event


def when(timestamp: Any) -> str:
    try:
        return datetime.fromtimestamp(float(timestamp)).strftime("%Y-%m-%d %H:%M:%S")
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"


def event_line(event: Event) -> str:
    return f"{when(event.get('time'))}  {describe(event)}"


def cmd_events(args: argparse.Namespace) -> int:
    registry = registry_of(args)
    registry.get(args.pool)
    event_log = EventLog(events_path(registry.root, args.pool))
    events, end = event_log.read_with_end()
    if args.last is not None:
        events = events[-args.last:] if args.last else []
    if not args.follow:
        emit(args, events, print_events)
        return OK
    # Following: one line per event as it comes (JSON lines with --json), until interrupted.
    for event in events:
        print_one(args, event)
    stop = time.monotonic() + args.follow_for if args.follow_for else None
    # From where the read ended (a log created since then: from its start), so an event
    # written between the two is neither lost nor printed twice.
    for event in event_log.follow(after=end or (0, 0), stop=stop):
        print_one(args, event)
    return OK


def print_events(events: list[Event]) -> None:
    for event in events:
        console.print(event_line(event), markup=False, highlight=False)


def print_one(args: argparse.Namespace, event: Event) -> None:
    try:
        print(json_line(event) if args.json else event_line(event), flush=True)
    except BrokenPipeError:
        raise SystemExit(1) from None


def cmd_history(args: argparse.Namespace) -> int:
    registry = registry_of(args)
    registry.get(args.pool)
    entries = [{k: v for k, v in e.items() if k != "class"}
               for e in history.history_log(registry.root, args.pool).read()]

    def human(data: list[dict[str, Any]]) -> None:
        console.print(f"History for '{args.pool}':", markup=False, highlight=False)
        console.print(table(("time", "user", "command"),
                            [(when(e.get("time")), str(e.get("user", "?")),
                              str(e.get("command", ""))) for e in data]))

    emit(args, entries, human)
    return OK


def record_history(args: argparse.Namespace, argv: Sequence[str]) -> None:
    """Append the command to its pool's history if it is one that changed a pool. The
    change is done: a history that cannot be written is a warning, not a failure."""
    subcommand = getattr(args, f"{args.command}_command", None)
    pool = history.changed_pool(args.command, subcommand, vars(args))
    if pool is None:
        return
    words = ["blockspace", *history.command_words(argv)]
    try:
        history.record(registry_of(args).root, pool, words)
    except OSError as error:
        print(f"blockspace: warning: the pool history was not recorded: "
              f"{error.strerror or error}", file=sys.stderr)


def count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"takes a number of events (0 or more), not {text!r}")
    return value


def record_event(registry: Registry, pool: str, event_class: str, **fields: Any) -> None:
    """An event of a change made offline (with the pool unmounted, no daemon logs it)."""
    try:
        EventLog(events_path(registry.root, pool)).append(make_event(event_class, pool,
                                                                     **fields))
    except OSError as error:
        print(f"blockspace: warning: the event log was not written: {error.strerror or error}",
              file=sys.stderr)


def add_commands(commands: Any, common: Parser) -> None:
    p = commands.add_parser("events", parents=[common],
                            help="the pool's event log (disk states, errors, repairs, scrubs)")
    p.add_argument("pool")
    p.add_argument("-f", "--follow", action="store_true",
                   help="keep printing new events as they happen (JSON lines with --json)")
    p.add_argument("-n", "--last", type=count, metavar="N", help="only the last N events")
    p.add_argument("--follow-for", type=float, default=0.0, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_events)


def add_pool_commands(pool: Any, common: Parser) -> None:
    p = pool.add_parser("history", parents=[common],
                        help="every command that changed the pool, with time and user")
    p.add_argument("pool")
    p.set_defaults(func=cmd_history)
