"""`blockspace`: the command line. It parses, validates, calls the library (or the daemon,
when the pool is mounted) and prints a table or JSON. A failed command prints one line on
stderr and exits with the code of blockspace/cli/common.py (README "Exit codes"); nothing is
written before validation passes.

One module per command group: cli/pool.py, volume.py, disk.py, scrub.py, mount.py,
faults.py, tiers.py; what they print goes through cli/output.py."""

import argparse
import logging
import sys
import traceback
from collections.abc import Sequence

from blockspace.cli import disk, events, faults, iostat, mount, pool, scrub, tiers, volume
from blockspace.cli.common import INTERNAL_ERROR, Parser, UsageError
from blockspace.cli.output import error_line
from blockspace.errors import BlockspaceError


def build_parser() -> Parser:
    common = Parser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="machine-readable output")
    common.add_argument("--state-dir", default=argparse.SUPPRESS,
                        help="registry directory (default $BLOCKSPACE_STATE_DIR or "
                             "/var/lib/blockspace)")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS)

    parser = Parser(prog="blockspace", parents=[common],
                    description="Pooled storage: mirror and parity volumes served as files.",
                    epilog="Exit codes: 0 done, 1 failed, 2 bad input (nothing changed), "
                           "3 data at risk, 4 not mounted, 5 nothing to act on, "
                           "70 internal error.")
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    verbose = False
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
            error_line(str(error))
            return error.exit_code
        if error is not None:
            error_line(f"blockspace: error: {error}")
            return error.exit_code
        if isinstance(caught, OSError):  # the state directory, a socket, a device file
            error_line(f"blockspace: error: {caught}")
            return 1
        # A bug. Still one line (and the contract tests fail on it); -v shows where.
        if verbose:
            traceback.print_exception(caught, file=sys.stderr)
        error_line(f"blockspace: internal error: {type(caught).__name__}: {caught} "
                   "(a bug; run with -v for the traceback)")
        return INTERNAL_ERROR
