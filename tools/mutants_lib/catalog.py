"""The curated mutation list (tools/mutants.toml): what each entry says, read strictly.

An entry names a guarantee, the file that keeps it, the exact source text to replace (a
unique substring, may span lines) and its replacement, and the tests that must catch the
break. A typo in the catalog is an error here, never a silently different mutation.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CATALOG = Path(__file__).resolve().parents[1] / "mutants.toml"
DEFAULT_MARKER = "not slow"  # the default suite, as `make test` runs it
NAME = re.compile(r"^[a-z0-9][a-z0-9-]*$")
REQUIRED = ("name", "guarantee", "file", "original", "replacement")
OPTIONAL = ("tests", "keyword", "marker", "timeout", "source")


class CatalogError(Exception):
    """The catalog cannot be read as written (one line: which entry, what is wrong)."""


@dataclass(frozen=True)
class Mutation:
    name: str
    guarantee: str  # what the code promises, in one sentence
    file: str  # relative to the repository root
    original: str  # exact text in `file`, found exactly once
    replacement: str
    tests: tuple[str, ...] = ()  # pytest paths or node ids; empty: the whole default suite
    keyword: str = ""  # a pytest -k expression, if any
    marker: str = DEFAULT_MARKER  # a pytest -m expression; "" for none
    timeout: float | None = None  # seconds; None: the runner's --timeout
    source: str = ""  # where the mutation comes from (an issue row), for the report

    def selection(self) -> tuple[str, ...]:
        """The pytest arguments that choose the tests which must catch this mutation."""
        return (*self._filters(), *self.tests)

    def baseline_parts(self) -> list[tuple[str, ...]]:
        """The selection cut per path: it passes unbroken when each part does, and parts are
        shared between entries (each is run once, however many entries name it)."""
        return [(*self._filters(), test) for test in self.tests] or [self._filters()]

    def _filters(self) -> tuple[str, ...]:
        args: list[str] = []
        if self.marker:
            args += ["-m", self.marker]
        if self.keyword:
            args += ["-k", self.keyword]
        return tuple(args)

    def describe_selection(self) -> str:
        parts = list(self.tests) or ["the default suite"]
        if self.keyword:
            parts.append(f"-k {self.keyword!r}")
        if self.marker and self.marker != DEFAULT_MARKER:
            parts.append(f"-m {self.marker!r}")
        return " ".join(parts)

    def test_paths(self) -> list[str]:
        """The files and directories the selection names (node ids without their ::tail)."""
        return [test.split("::", 1)[0] for test in self.tests]


def _text(entry: dict[str, Any], key: str, where: str) -> str:
    value = entry[key]
    if not isinstance(value, str):
        raise CatalogError(f"{where}: {key} must be a string, not {type(value).__name__}")
    return value


def parse_entry(entry: object, index: int) -> Mutation:
    """One `[[mutation]]` table as a Mutation; CatalogError on anything off."""
    where = f"mutation #{index + 1}"
    if not isinstance(entry, dict):
        raise CatalogError(f"{where}: not a table")
    if isinstance(entry.get("name"), str):
        where = f"mutation {entry['name']!r}"
    missing = [key for key in REQUIRED if key not in entry]
    if missing:
        raise CatalogError(f"{where}: missing {', '.join(missing)}")
    unknown = sorted(set(entry) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise CatalogError(f"{where}: unknown keys {', '.join(unknown)}")
    name = _text(entry, "name", where)
    if not NAME.match(name):
        raise CatalogError(f"{where}: a name is lower-case letters, digits and dashes")
    values = {key: _text(entry, key, where) for key in REQUIRED}
    if not values["guarantee"].strip():
        raise CatalogError(f"{where}: the guarantee is empty")
    if not values["original"]:
        raise CatalogError(f"{where}: the original text is empty")
    if values["original"] == values["replacement"]:
        raise CatalogError(f"{where}: the replacement is the original text (no mutation)")
    if Path(values["file"]).is_absolute() or ".." in Path(values["file"]).parts:
        raise CatalogError(f"{where}: file must be a path inside the repository")
    tests = entry.get("tests", [])
    if not isinstance(tests, list) or not all(isinstance(t, str) and t for t in tests):
        raise CatalogError(f"{where}: tests must be a list of pytest paths or node ids")
    if any(Path(t.split("::", 1)[0]).is_absolute() for t in tests):
        raise CatalogError(f"{where}: tests are paths inside the repository")
    optional = {key: _text(entry, key, where) for key in ("keyword", "marker", "source")
                if key in entry}
    timeout = entry.get("timeout")
    if timeout is not None and (isinstance(timeout, bool)
                                or not isinstance(timeout, int | float) or timeout <= 0):
        raise CatalogError(f"{where}: timeout must be a positive number of seconds")
    return Mutation(
        name=name, guarantee=" ".join(values["guarantee"].split()), file=values["file"],
        original=values["original"], replacement=values["replacement"], tests=tuple(tests),
        timeout=None if timeout is None else float(timeout), **optional,
    )


def parse(document: dict[str, Any]) -> list[Mutation]:
    """Every entry of a parsed catalog, in order; CatalogError for the first problem."""
    unknown = sorted(set(document) - {"mutation"})
    if unknown:
        raise CatalogError(f"unknown top-level keys {', '.join(unknown)} (only [[mutation]])")
    entries = document.get("mutation", [])
    if not isinstance(entries, list) or not entries:
        raise CatalogError("the catalog has no [[mutation]] entries")
    mutations = [parse_entry(entry, index) for index, entry in enumerate(entries)]
    seen: set[str] = set()
    for mutation in mutations:
        if mutation.name in seen:
            raise CatalogError(f"mutation {mutation.name!r} is listed twice")
        seen.add(mutation.name)
    return mutations


def load(path: Path = CATALOG) -> list[Mutation]:
    try:
        with path.open("rb") as handle:
            document = tomllib.load(handle)
    except OSError as error:
        raise CatalogError(f"{path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise CatalogError(f"{path}: {error}") from None
    return parse(document)


def select(mutations: Sequence[Mutation], names: Iterable[str]) -> list[Mutation]:
    """The mutations named (in catalog order); CatalogError for a name not in the catalog."""
    wanted = [name.strip() for name in names if name.strip()]
    known = {m.name for m in mutations}
    unknown = [name for name in wanted if name not in known]
    if unknown or not wanted:
        raise CatalogError(f"no mutation named {', '.join(unknown) or '(none given)'}; "
                           f"see --list")
    return [m for m in mutations if m.name in wanted]
