"""Applying one mutation: check it against a tree, copy the tree, break the copy.

The source tree is never written. A mutation whose original text is missing or not unique,
or whose result does not even compile, is a MutationError: the catalog has to follow the
code as it moves, and a mutant that cannot be imported proves nothing about the tests.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from .catalog import Mutation

# Never copied: the venv and git (large, and the copy must not share an index), caches whose
# bytecode could outlive a same-sized edit, and a demo pool's mounts.
EXCLUDES = (".venv", ".git", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache",
            "/demo", "/build")


class MutationError(Exception):
    """The mutation cannot be applied as the catalog says (one line, why)."""


def mutated_text(text: str, mutation: Mutation) -> str:
    """`text` with the mutation's original replaced; MutationError unless it occurs exactly
    once (overlapping occurrences count) and the result still compiles."""
    first = text.find(mutation.original)
    if first < 0:
        raise MutationError(
            f"{mutation.file}: the original text is not there (the code moved or changed: "
            f"find the same logic and update the entry)")
    again = text.find(mutation.original, first + 1)
    if again >= 0:
        count = 2
        while (again := text.find(mutation.original, again + 1)) >= 0:
            count += 1
        raise MutationError(f"{mutation.file}: the original text occurs {count} times "
                            f"(make it unique: take in a neighbouring line)")
    new = text[:first] + mutation.replacement + text[first + len(mutation.original):]
    if mutation.file.endswith(".py"):
        try:
            compile(new, mutation.file, "exec", dont_inherit=True)
        except SyntaxError as error:
            raise MutationError(f"{mutation.file}: the mutated file does not compile "
                                f"(line {error.lineno}: {error.msg})") from None
    return new


def check(tree: Path, mutation: Mutation) -> str:
    """The mutated text of the mutation's file in `tree`; also checks that the tests it
    names exist there. MutationError otherwise."""
    path = tree / mutation.file
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MutationError(f"{mutation.file}: no such file") from None
    new = mutated_text(text, mutation)
    missing = [test for test in mutation.test_paths() if not (tree / test).exists()]
    if missing:
        raise MutationError(f"the selection names tests that do not exist: {', '.join(missing)}")
    return new


def _ignore(root: Path) -> Callable[[str, list[str]], set[str]]:
    """shutil.copytree's filter: EXCLUDES by name anywhere, "/name" only at the top."""
    anywhere = {e for e in EXCLUDES if not e.startswith("/")}
    top = {e[1:] for e in EXCLUDES if e.startswith("/")}

    def ignore(directory: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n in anywhere}
        if Path(directory) == root:
            skip |= {n for n in names if n in top}
        return skip

    return ignore


def make_copy(source: Path, dest: Path) -> None:
    """A scratch copy of the working tree (uncommitted changes included), like
    `rsync -a --exclude .venv --exclude .git`: symlinks kept as links, times and modes kept."""
    if dest.exists():
        raise MutationError(f"{dest} exists already: not a fresh scratch copy")
    try:
        shutil.copytree(source, dest, symlinks=True, ignore=_ignore(source))
    except (OSError, shutil.Error) as error:
        raise MutationError(f"copying {source} to {dest} failed: {str(error)[:300]}") from None


def apply(copy: Path, mutation: Mutation) -> None:
    """Break the copy: write the mutated file in place (checked again against the copy)."""
    new = check(copy, mutation)
    (copy / mutation.file).write_text(new, encoding="utf-8")
