"""`blockspace system install|uninstall [--root DIR]`: the systemd units (blockspace@.service,
blockspace-scrub@.service and .timer), /sbin/mount.blockspace and the bash completion,
put in place by blockspace/admin/install.py; `systemctl daemon-reload` after an install
into / on a machine that runs systemd."""

import argparse
import sys
from pathlib import Path
from typing import Any

from blockspace.admin import install
from blockspace.cli.common import OK, Parser
from blockspace.cli.completion import script
from blockspace.cli.output import console, emit
from blockspace.errors import BlockspaceError, InvalidInput


def _root(args: argparse.Namespace) -> Path:
    root = Path(args.root)
    if not root.is_dir():
        raise InvalidInput(f"--root {args.root} is not a directory")
    return root


def cmd_install(args: argparse.Namespace) -> int:
    root = _root(args)
    command = install.entry_point()
    files = install.plan(command, sys.executable, install.package_root(),
                         script(args.root_parser, "bash"))
    written = install.apply(root, files)
    reload = "skipped: --no-reload"
    if not args.no_reload:
        if not install.systemd_running(root):
            reload = "skipped: systemd is not running here" if root.resolve() == Path("/") \
                else "skipped: installed under another root"
        else:
            why = install.daemon_reload()
            if why is not None:
                raise BlockspaceError(f"installed, but systemctl daemon-reload failed: {why}")
            reload = "done"
    info = {"root": str(root), "command": command, "files": [str(p) for p in written],
            "daemon_reload": reload}
    emit(args, info, _print_install)
    return OK


def _print_install(info: dict[str, Any]) -> None:
    for path in info["files"]:
        console.print(f"installed {path}")
    console.print(f"units run {info['command']}; daemon-reload: {info['daemon_reload']}")


def cmd_uninstall(args: argparse.Namespace) -> int:
    root = _root(args)
    removed = install.remove(root)
    if not args.no_reload and removed and install.systemd_running(root):
        install.daemon_reload()
    emit(args, {"root": str(root), "removed": [str(p) for p in removed]},
         lambda i: console.print("\n".join(f"removed {p}" for p in i["removed"])
                                 or "nothing was installed"))
    return OK


def add_commands(commands: Any, common: Parser, root_parser: argparse.ArgumentParser) -> None:
    group = commands.add_parser("system", help="install the systemd units, mount helper and "
                                "completion").add_subparsers(dest="system_command",
                                                             required=True, parser_class=Parser)
    for name, func, text in (("install", cmd_install, "install the units, "
                              "/sbin/mount.blockspace and the bash completion"),
                             ("uninstall", cmd_uninstall, "remove what install put in place")):
        p = group.add_parser(name, parents=[common], help=text)
        p.add_argument("--root", default="/", metavar="DIR",
                       help="install under this directory instead of / (packaging, tests)")
        p.add_argument("--no-reload", action="store_true",
                       help="do not run systemctl daemon-reload")
        p.set_defaults(func=func, root_parser=root_parser)
