"""The shell completion and the man page come from the parser itself: bash completes real
commands and options with the generated script, and the man page names every command."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blockspace.cli.main import build_parser

REPO = Path(__file__).resolve().parents[2]


def completion(shell: str) -> str:
    return subprocess.run([sys.executable, "-m", "blockspace", "completion", shell],
                          capture_output=True, text=True, check=True, timeout=60).stdout


def complete_in_bash(script: Path, *words: str) -> list[str]:
    """What bash offers for the last of `words`, through the generated completion function."""
    quoted = " ".join(f"'{w}'" for w in ("blockspace", *words))
    probe = (f"source {script}; COMP_WORDS=({quoted}); COMP_CWORD={len(words)}; "
             'COMP_LINE="${COMP_WORDS[*]}"; COMP_POINT=${#COMP_LINE}; _shtab_blockspace; '
             'printf "%s\\n" "${COMPREPLY[@]}"')
    result = subprocess.run(["bash", "-c", probe], capture_output=True, text=True, timeout=60,
                            check=True)
    return result.stdout.split()


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completes_commands_subcommands_and_options(tmp_path: Path) -> None:
    script = tmp_path / "blockspace.bash"
    script.write_text(completion("bash"))
    assert complete_in_bash(script, "po") == ["pool"]
    assert complete_in_bash(script, "pool", "im") == ["import"]
    assert complete_in_bash(script, "pool", "import", "--dir") == ["--directory"]
    assert "completion" in complete_in_bash(script, "")


def test_zsh_script_names_every_command() -> None:
    script = completion("zsh")
    assert script.startswith("#compdef blockspace")
    commands = build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for command in commands:
        assert command in script


def test_man_page_names_every_command_and_renders(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(REPO / "tools" / "gen-man"), str(tmp_path)],
                   check=True, capture_output=True, timeout=60)
    page = (tmp_path / "blockspace.1").read_text()
    assert page.startswith(".TH BLOCKSPACE")
    for text in ("blockspace pool", "blockspace volume", "blockspace disk", "blockspace mount",
                 "\\-\\-directory", "\\-\\-resiliency"):
        assert text in page, text
    if shutil.which("man"):
        shown = subprocess.run(["man", "-l", str(tmp_path / "blockspace.1")],
                               capture_output=True, text=True, timeout=60,
                               env={"MANPAGER": "cat", "PATH": "/usr/bin:/bin"})
        assert shown.returncode == 0, shown.stderr
        assert "blockspace pool import" in shown.stdout.replace("\u2010", "-")
