"""Heat of tiering units: access counts that decay over time, in bounded memory (pure).

Every read or write of a unit adds one "touch"; a touch loses half its weight every
`half_life` seconds. Instead of decaying every entry on every tick, a touch made at time t
is stored with weight 2^((t - base) / half_life), so stored scores never change and
`heat(u) = score(u) * 2^(-(now - base) / half_life)` at any time. When the exponent grows
large the scores are rescaled once and `base` moves to now.

Memory is bounded: at most `capacity` units are tracked; when a new unit would exceed it,
the colder half of the table is forgotten (they are the least likely to matter to the
optimizer, and forgetting means "cold", which is what they are).

The state persists as a small JSON document (`to_state`/`from_state`), which is checked
strictly on load: a damaged or crafted file is refused (and the caller starts cold).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

DEFAULT_HALF_LIFE = 1800.0  # seconds
DEFAULT_CAPACITY = 1 << 18  # tracked units (about 25 MiB of Python objects at most)
_RESCALE_AT = 512.0  # exponent (in half-lives) at which scores are rescaled
STATE_VERSION = 1


class HeatError(ValueError):
    """A persisted heat state that cannot be trusted."""


class HeatMap:
    def __init__(
        self,
        units: int,
        *,
        half_life: float = DEFAULT_HALF_LIFE,
        capacity: int = DEFAULT_CAPACITY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if units < 1 or capacity < 2 or not half_life > 0:
            raise ValueError("heat map needs units >= 1, capacity >= 2, half_life > 0")
        self.units = units
        self.half_life = float(half_life)
        self.capacity = capacity
        self._clock = clock
        self._base = clock()
        self._scores: dict[int, float] = {}

    def __len__(self) -> int:
        return len(self._scores)

    def _exponent(self, now: float) -> float:
        return (now - self._base) / self.half_life

    def _rescale(self, now: float) -> None:
        factor = 2.0 ** -self._exponent(now)
        self._scores = {u: s * factor for u, s in self._scores.items() if s * factor > 1e-9}
        self._base = now

    def touch(self, unit: int, count: float = 1.0) -> None:
        """Count `count` accesses to `unit` now."""
        if not 0 <= unit < self.units:
            raise ValueError(f"unit {unit} outside 0..{self.units - 1}")
        now = self._clock()
        exponent = self._exponent(now)
        if exponent > _RESCALE_AT or exponent < -_RESCALE_AT:
            self._rescale(now)
            exponent = 0.0
        if unit not in self._scores and len(self._scores) >= self.capacity:
            self._forget_coldest()
        self._scores[unit] = self._scores.get(unit, 0.0) + count * 2.0**exponent

    def touch_range(self, first: int, last: int) -> None:
        for unit in range(first, last + 1):
            self.touch(unit)

    def _forget_coldest(self) -> None:
        keep = self.capacity // 2
        ranked = sorted(self._scores.items(), key=lambda item: item[1], reverse=True)
        self._scores = dict(ranked[:keep])

    def heat(self, unit: int) -> float:
        score = self._scores.get(unit)
        if score is None:
            return 0.0
        return score * 2.0 ** -self._exponent(self._clock())

    def snapshot(self) -> dict[int, float]:
        """Every tracked unit's heat now."""
        factor = 2.0 ** -self._exponent(self._clock())
        return {unit: score * factor for unit, score in self._scores.items()}

    def hottest(self, count: int, exclude: Iterable[int] = ()) -> list[tuple[int, float]]:
        """Up to `count` (unit, heat) pairs, hottest first."""
        excluded = set(exclude)
        factor = 2.0 ** -self._exponent(self._clock())
        ranked = sorted(
            ((u, s * factor) for u, s in self._scores.items() if u not in excluded),
            key=lambda item: (-item[1], item[0]),
        )
        return ranked[:count]

    def buckets(self, count: int) -> list[float]:
        """The volume cut into `count` equal spans of units: the summed heat of each."""
        count = max(1, min(count, self.units))
        totals = [0.0] * count
        for unit, value in self.snapshot().items():
            totals[unit * count // self.units] += value
        return totals

    # ---- persistence --------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        now = self._clock()
        self._rescale(now)
        return {
            "version": STATE_VERSION,
            "units": self.units,
            "half_life": self.half_life,
            "saved": now,
            "heat": [[u, s] for u, s in sorted(self._scores.items())],
        }

    def load_state(self, state: object) -> None:
        """Replace the table by a saved one (decayed by the time since it was saved).
        HeatError, changing nothing, if it is damaged or belongs to another geometry."""
        if not isinstance(state, dict) or set(state) != {
            "version", "units", "half_life", "saved", "heat"
        }:
            raise HeatError("heat state has the wrong fields")
        if state["version"] != STATE_VERSION or state["units"] != self.units:
            raise HeatError("heat state is of another version or volume geometry")
        saved = state["saved"]
        if not isinstance(saved, int | float) or isinstance(saved, bool) or not math.isfinite(
            saved
        ):
            raise HeatError("heat state save time is not a number")
        entries = state["heat"]
        if not isinstance(entries, list) or len(entries) > self.capacity:
            raise HeatError("heat state table is not a list within the capacity")
        scores: dict[int, float] = {}
        for entry in entries:
            if not isinstance(entry, list) or len(entry) != 2:
                raise HeatError("heat state entry is not [unit, heat]")
            unit, value = entry
            if type(unit) is not int or not 0 <= unit < self.units or unit in scores:
                raise HeatError("heat state unit out of range or repeated")
            if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
                raise HeatError("heat state value is not a finite non-negative number")
            scores[unit] = float(value)
        now = self._clock()
        elapsed = max(0.0, now - float(saved))
        factor = 2.0 ** -min(elapsed / self.half_life, 1000.0)
        self._scores = {u: v * factor for u, v in scores.items() if v * factor > 1e-9}
        self._base = now
