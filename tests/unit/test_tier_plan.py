"""The tier optimizer's planning: capacity, pins, hysteresis (no ping-pong), rate limit."""

from hypothesis import given, settings
from hypothesis import strategies as st

from blockspace.tiering.plan import plan_moves


def apply(resident: set[int], plan) -> set[int]:  # type: ignore[no-untyped-def]
    after = set(resident)
    for unit in plan.demote:
        assert unit in after
        after.discard(unit)
    for unit in plan.promote:
        assert unit not in after
        after.add(unit)
    return after


def test_fills_free_slots_with_the_hottest() -> None:
    plan = plan_moves({1: 10.0, 2: 50.0, 3: 5.0, 4: 1.0}, set(), 2)
    assert plan.promote == [2, 1]
    assert plan.demote == []


def test_swaps_only_when_clearly_hotter() -> None:
    assert plan_moves({1: 10.0, 2: 12.0}, {1}, 1).moves == 0  # 12 <= 10 * 1.25 + 0.5
    plan = plan_moves({1: 10.0, 2: 40.0}, {1}, 1)
    assert plan.demote == [1]
    assert plan.promote == [2]


def test_pins_win_over_heat() -> None:
    plan = plan_moves({1: 100.0, 2: 0.0}, {1}, 1, pinned_ssd={2}, pinned_hdd=set())
    assert plan.demote == [1]
    assert plan.promote == [2]
    plan = plan_moves({1: 100.0}, {1}, 4, pinned_hdd={1})
    assert plan.demote == [1]
    assert plan.promote == []
    assert plan_moves({1: 100.0}, set(), 4, pinned_hdd={1}).moves == 0


def test_max_moves() -> None:
    heat = {u: float(100 - u) for u in range(50)}
    plan = plan_moves(heat, set(), 40, max_moves=5)
    assert plan.moves == 5


heats = st.dictionaries(st.integers(0, 40), st.floats(0, 1000, allow_nan=False), max_size=40)


@settings(max_examples=300, deadline=None)
@given(heats, st.sets(st.integers(0, 40), max_size=12), st.integers(1, 12),
       st.sets(st.integers(0, 40), max_size=4), st.sets(st.integers(0, 40), max_size=6),
       st.one_of(st.integers(1, 10), st.just(1000)))
def test_plan_properties(heat, resident, capacity, pinned_ssd, pinned_hdd, max_moves):  # type: ignore[no-untyped-def]
    resident = set(sorted(resident)[:capacity])
    pinned_ssd = set(sorted(pinned_ssd)[:capacity])
    plan = plan_moves(heat, resident, capacity, pinned_ssd=pinned_ssd, pinned_hdd=pinned_hdd,
                      max_moves=max_moves)
    after = apply(resident, plan)
    assert len(after) <= capacity
    assert plan.moves <= max_moves
    hdd_only = pinned_hdd - pinned_ssd
    assert not (set(plan.promote) & hdd_only)
    assert not (set(plan.demote) & pinned_ssd)
    if max_moves >= 1000:
        assert not (after & hdd_only)
        assert pinned_ssd <= after
    # Hysteresis: at the same heat, the next plan changes nothing.
    again = plan_moves(heat, after, capacity, pinned_ssd=pinned_ssd, pinned_hdd=pinned_hdd)
    if max_moves >= 1000:
        assert again.moves == 0, (plan, again)
