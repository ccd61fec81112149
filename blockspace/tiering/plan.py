"""What the tier optimizer should move (pure, no I/O): promotions to the ssd tier and
demotions from it, given the units' heat, what is on the ssd tier now, its capacity and
the pins.

Rules, in order:
1. Units pinned to hdd leave the ssd tier; units pinned to ssd come onto it (making room
   by demoting the coldest unpinned resident units). Pins are never overridden by heat.
2. Free ssd slots take the hottest units that are not there yet, if they are warm enough
   (heat >= `min_heat`).
3. A full ssd tier swaps a resident unit for a hotter one only when the newcomer is
   clearly hotter: heat(new) > heat(old) * (1 + hysteresis) + margin. So a plan applied
   once leaves nothing for the next plan to undo at the same heat (and decay scales all
   heat alike, so it stays so): no ping-pong.
4. At most `max_moves` moves (promotions + demotions) per plan: the rate limit per pass.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field

DEFAULT_HYSTERESIS = 0.25
DEFAULT_MIN_HEAT = 2.0
DEFAULT_MARGIN = 0.5


def clearly_hotter(new: float, old: float, hysteresis: float = DEFAULT_HYSTERESIS,
                   margin: float = DEFAULT_MARGIN) -> bool:
    """Whether a unit of heat `new` should take the ssd slot of one of heat `old`."""
    return new > old * (1.0 + hysteresis) + margin


@dataclass
class Plan:
    demote: list[int] = field(default_factory=list)  # leave the ssd tier, in this order
    promote: list[int] = field(default_factory=list)  # come onto it, after the demotions

    @property
    def moves(self) -> int:
        return len(self.demote) + len(self.promote)


def plan_moves(
    heat: Mapping[int, float],
    resident: Collection[int],
    capacity: int,
    *,
    pinned_ssd: Collection[int] = (),
    pinned_hdd: Collection[int] = (),
    max_moves: int = 1 << 30,
    hysteresis: float = DEFAULT_HYSTERESIS,
    min_heat: float = DEFAULT_MIN_HEAT,
    margin: float = DEFAULT_MARGIN,
) -> Plan:
    """The moves that bring the ssd tier closer to the hottest `capacity` units."""
    on_ssd = set(resident)
    want_ssd = set(pinned_ssd)
    want_hdd = set(pinned_hdd) - want_ssd
    plan = Plan()

    def heat_of(unit: int) -> float:
        return heat.get(unit, 0.0)

    def budget() -> bool:
        return plan.moves < max_moves

    # 1. Pins.
    for unit in sorted(on_ssd & want_hdd):
        if not budget():
            return plan
        plan.demote.append(unit)
        on_ssd.discard(unit)
    victims = sorted(on_ssd - want_ssd, key=lambda u: (heat_of(u), u))  # coldest first
    for unit in sorted(want_ssd - on_ssd, key=lambda u: (-heat_of(u), u)):
        if len(on_ssd) >= capacity:
            if not victims or plan.moves + 2 > max_moves:
                break  # pins beyond the capacity are refused when they are made
            victim = victims.pop(0)
            plan.demote.append(victim)
            on_ssd.discard(victim)
        if not budget():
            return plan
        plan.promote.append(unit)
        on_ssd.add(unit)

    # 2 and 3. Heat.
    candidates = sorted(
        (u for u, h in heat.items() if u not in on_ssd and u not in want_hdd and h >= min_heat),
        key=lambda u: (-heat_of(u), u),
    )
    for unit in candidates:
        if len(on_ssd) < capacity:
            if not budget():
                break
            plan.promote.append(unit)
            on_ssd.add(unit)
            continue
        if not victims or plan.moves + 2 > max_moves:
            break
        victim = victims[0]
        if not clearly_hotter(heat_of(unit), heat_of(victim), hysteresis, margin):
            break  # candidates only get colder from here
        victims.pop(0)
        plan.demote.append(victim)
        on_ssd.discard(victim)
        plan.promote.append(unit)
        on_ssd.add(unit)
    return plan
