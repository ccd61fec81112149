"""`blockspace completion bash|zsh`: a shell completion script generated from the parser
itself (shtab), so it never falls behind the commands. Install it, e.g.
`blockspace completion bash > /etc/bash_completion.d/blockspace`."""

import argparse
from collections.abc import Callable
from typing import Any

from blockspace.cli.common import OK, Parser

SHELLS = ("bash", "zsh")


def script(parser: argparse.ArgumentParser, shell: str) -> str:
    """The completion script of `parser` for `shell` (bash or zsh)."""
    import shtab  # only this command needs it: not every command's start-up

    return str(shtab.complete(parser, shell=shell))


def add_commands(commands: Any, common: Parser, build_parser: Callable[[], Parser]) -> None:
    p = commands.add_parser("completion", parents=[common],
                            help="print a shell completion script")
    p.add_argument("shell", choices=SHELLS)

    def cmd_completion(args: argparse.Namespace) -> int:
        print(script(build_parser(), args.shell), end="")
        return OK

    p.set_defaults(func=cmd_completion)
