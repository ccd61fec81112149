"""`blockspace config show`: the defaults in effect on this host and where they come from
(blockspace/admin/config.py: /etc/blockspace/blockspace.toml or $BLOCKSPACE_CONFIG)."""

import argparse
from typing import Any

from blockspace.admin.config import load_config
from blockspace.cli.common import OK, Parser
from blockspace.cli.output import console, emit


def cmd_show(args: argparse.Namespace) -> int:
    def human(values: dict[str, Any]) -> None:
        console.print(f"from {values['source']}:", markup=False)
        for key, value in values.items():
            if key != "source":
                console.print(f"  {key} = {value}", markup=False)

    emit(args, load_config().as_dict(), human)
    return OK


def add_commands(commands: Any, common: Parser) -> None:
    config = commands.add_parser("config", help="this host's defaults").add_subparsers(
        dest="config_command", required=True, parser_class=Parser)
    p = config.add_parser("show", parents=[common],
                          help="the defaults in effect (/etc/blockspace/blockspace.toml)")
    p.set_defaults(func=cmd_show)
