"""The resiliency names a user may type, and what each means: the one table both
`volume create --resiliency` and `--tier MEDIA:SIZE:RESILIENCY` read."""

from typing import NamedTuple


class Resiliency(NamedTuple):
    kind: str  # simple, mirror or parity
    copies: int | None  # None: the kind's default, or whatever --copies says
    parity: int | None


RESILIENCY_NAMES: dict[str, Resiliency] = {
    "simple": Resiliency("simple", None, None),
    "mirror": Resiliency("mirror", None, None),
    "parity": Resiliency("parity", None, None),
    "mirror-2": Resiliency("mirror", 2, None),
    "mirror-3": Resiliency("mirror", 3, None),
    "parity-1": Resiliency("parity", None, 1),
    "parity-2": Resiliency("parity", None, 2),
}


def names_of_kind(kind: str) -> list[str]:
    """The counted names of a kind (mirror -> mirror-2, mirror-3), for error messages."""
    return [name for name, meaning in RESILIENCY_NAMES.items()
            if meaning.kind == kind and name != kind]
