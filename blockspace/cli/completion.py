"""Bash completion for `blockspace`, generated from its argparse parser: the command words
at each level, and each command's options. Installed by `blockspace system install`."""

import argparse

TEMPLATE = """# bash completion for blockspace (generated from its parser)
_blockspace() {
    local cur path word
    cur="${COMP_WORDS[COMP_CWORD]}"
    path=""
    for word in "${COMP_WORDS[@]:1:COMP_CWORD-1}"; do
        case "$path $word" in
%(paths)s
        esac
    done
    case "$path" in
%(words)s
    esac
}
complete -o default -F _blockspace blockspace
"""


def _walk(parser: argparse.ArgumentParser, path: str,
          found: dict[str, tuple[list[str], list[str]]]) -> None:
    options = sorted(o for a in parser._actions for o in a.option_strings  # noqa: SLF001
                     if a.help != argparse.SUPPRESS)
    commands: list[str] = []
    for action in parser._actions:  # noqa: SLF001
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for name, sub in action.choices.items():
                commands.append(name)
                _walk(sub, f"{path} {name}".strip(), found)
    found[path] = (sorted(commands), options)


def bash_completion(parser: argparse.ArgumentParser) -> str:
    found: dict[str, tuple[list[str], list[str]]] = {}
    _walk(parser, "", found)
    paths = []
    words = []
    for path, (commands, options) in sorted(found.items()):
        for name in commands:
            child = f"{path} {name}".strip()
            paths.append(f'            "{path} {name}") path="{child}" ;;')
        words.append(f'        "{path}") COMPREPLY=($(compgen -W "{" ".join(commands + options)}"'
                     ' -- "$cur")) ;;')
    return TEMPLATE % {"paths": "\n".join(paths), "words": "\n".join(words)}
