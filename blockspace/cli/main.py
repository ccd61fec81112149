"""`blockspace`: the command line. It parses, validates, calls the library (or the daemon,
when the pool is mounted) and prints a table or JSON. A failed command prints one line on
stderr and exits with the code of blockspace/cli/common.py (README "Exit codes"); nothing is
written before validation passes.

One module per command group: cli/pool.py, volume.py, disk.py, scrub.py, mount.py,
faults.py, tiers.py, attach.py, system.py; what they print goes through cli/output.py."""

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

from blockspace import __version__
from blockspace.build import build_kind
from blockspace.cli import (
    attach,
    completion,
    configuration,
    disk,
    events,
    faults,
    iostat,
    mount,
    pool,
    scrub,
    system,
    tiers,
    volume,
)
from blockspace.cli.common import INTERNAL_ERROR, Parser, UsageError
from blockspace.cli.output import error_line, json_line
from blockspace.errors import BlockspaceError


def version_line() -> str:
    """'blockspace 0.1.0 (compiled)': the build says whether the hot modules run as mypyc's
    C or as Python (blockspace/build.py), for a user's report and the tests."""
    return f"blockspace {__version__} ({build_kind()})"


def build_parser() -> Parser:
    common = Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")
    common.add_argument("--state-dir", default=argparse.SUPPRESS,
                        help="registry directory (default $BLOCKSPACE_STATE_DIR or "
                             "/var/lib/blockspace)")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)
    common.add_argument("--force-lease", action="store_true", default=argparse.SUPPRESS,
                        help="a command that writes an unmounted pool takes its writer lease "
                             "even if another host holds it: only for a host known dead")

    parser = Parser(prog="blockspace", parents=[common],
                    description="Pooled storage: mirror and parity volumes served as files.",
                    epilog="Exit codes: 0 done, 1 failed, 2 bad input (nothing changed), "
                           "3 data at risk, 4 not mounted, 5 nothing to act on, "
                           "70 internal error.")
    parser.add_argument("--version", action="version", version=version_line())
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    pool.add_commands(commands, common)
    volume.add_commands(commands, common)
    disk.add_commands(commands, common)
    scrub.add_commands(commands, common)
    mount.add_commands(commands, common)
    faults.add_commands(commands, common)
    tiers.add_commands(commands, common)
    events.add_commands(commands, common)
    iostat.add_commands(commands, common)
    attach.add_commands(commands, common)
    system.add_commands(commands, common, parser)
    configuration.add_commands(commands, common)
    completion.add_commands(commands, common, build_parser)
    return parser


def user_error(error: BaseException) -> BlockspaceError | None:
    """The user error behind `error`: itself, or the first of a group trio raised out of a
    nursery whose every failure is a user error (a disk job's bad id, for one)."""
    if isinstance(error, BlockspaceError):
        return error
    if isinstance(error, BaseExceptionGroup):
        leaves = [user_error(e) for e in error.exceptions]
        if leaves and all(leaf is not None for leaf in leaves):
            return leaves[0]
    return None


def fail(message: str, exit_code: int, json_mode: bool) -> int:
    """A failed command's one line on stderr; with --json also an object on stdout, so a
    script reading stdout learns why without parsing the line."""
    error_line(message)
    if json_mode:
        print(json_line({"error": message, "exit_code": exit_code}))
    return exit_code


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    verbose = False
    # Known before parsing, so that a usage error too is answered in JSON.
    json_mode = "--json" in (sys.argv[1:] if argv is None else argv)
    try:
        args = parser.parse_args(argv)
        args.json = getattr(args, "json", False)
        args.state_dir = getattr(args, "state_dir", None)
        args.verbose = verbose = getattr(args, "verbose", False)
        if not args.command == "mount" or not getattr(args, "foreground", False):
            logging.basicConfig(level=logging.DEBUG if args.verbose else logging.ERROR,
                                format="%(levelname)s: %(message)s")
        code = int(args.func(args))
        if code == 0:
            events.record_history(args, sys.argv[1:] if argv is None else argv)
        return code
    except KeyboardInterrupt:
        return 130
    except BaseException as caught:
        if isinstance(caught, SystemExit | GeneratorExit):
            raise
        error = user_error(caught)
        if isinstance(error, UsageError):
            return fail(str(error), error.exit_code, json_mode)
        if error is not None:
            return fail(f"blockspace: error: {error}", error.exit_code, json_mode)
        if isinstance(caught, OSError):  # the state directory, a socket, a device file
            return fail(f"blockspace: error: {caught}", 1, json_mode)
        # A bug. Still one line (and the contract tests fail on it); -v shows where.
        if verbose:
            traceback.print_exception(caught, file=sys.stderr)
        return fail(f"blockspace: internal error: {type(caught).__name__}: {caught} "
                    "(a bug; run with -v for the traceback)", INTERNAL_ERROR, json_mode)
