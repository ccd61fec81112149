"""Heat of tiering units: decay, bounded memory, persistence and its strict loading."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockspace.tiering.heat import HeatError, HeatMap


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_heat_counts_and_halves_every_half_life() -> None:
    clock = Clock()
    heat = HeatMap(100, half_life=10.0, clock=clock)
    for _ in range(8):
        heat.touch(3)
    assert heat.heat(3) == pytest.approx(8.0)
    clock.now += 10.0
    assert heat.heat(3) == pytest.approx(4.0)
    heat.touch(3)
    clock.now += 20.0
    assert heat.heat(3) == pytest.approx(5.0 / 4)
    assert heat.heat(4) == 0.0
    assert heat.hottest(1) == [(3, pytest.approx(1.25))]


def test_rescaling_keeps_values_over_long_times() -> None:
    clock = Clock()
    heat = HeatMap(10, half_life=1.0, clock=clock)
    heat.touch(1)
    for _ in range(2000):  # far past the exponent at which scores are rescaled
        clock.now += 1.0
        heat.touch(2)
    assert heat.heat(2) == pytest.approx(2.0, rel=1e-6)  # geometric sum 1 + 1/2 + ...
    assert heat.heat(1) == 0.0
    assert all(math.isfinite(v) for v in heat.snapshot().values())


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 9999), max_size=600), st.integers(2, 64))
def test_memory_is_bounded(units: list[int], capacity: int) -> None:
    heat = HeatMap(10_000, capacity=capacity, clock=Clock())
    for unit in units:
        heat.touch(unit)
        assert len(heat) <= capacity


def test_the_hottest_survive_pruning() -> None:
    heat = HeatMap(1000, capacity=8, clock=Clock())
    for _ in range(50):
        heat.touch(7)
    for unit in range(100, 200):
        heat.touch(unit)
    assert heat.heat(7) == pytest.approx(50.0)


def test_state_round_trip_decays_by_the_time_away() -> None:
    clock = Clock()
    heat = HeatMap(50, half_life=100.0, clock=clock)
    for unit in (1, 1, 1, 1, 9):
        heat.touch(unit)
    state = json.loads(json.dumps(heat.to_state()))
    clock.now += 100.0
    other = HeatMap(50, half_life=100.0, clock=clock)
    other.load_state(state)
    assert other.heat(1) == pytest.approx(2.0)
    assert other.heat(9) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "change",
    [
        lambda s: s.update(version=2),
        lambda s: s.update(units=51),
        lambda s: s.pop("heat"),
        lambda s: s.update(extra=1),
        lambda s: s.update(saved="x"),
        lambda s: s.update(saved=float("nan")),
        lambda s: s.update(heat=[[1, -1.0]]),
        lambda s: s.update(heat=[[1, float("inf")]]),
        lambda s: s.update(heat=[[50, 1.0]]),
        lambda s: s.update(heat=[[1, 1.0], [1, 2.0]]),
        lambda s: s.update(heat=[[True, 1.0]]),
        lambda s: s.update(heat=[["1", 1.0]]),
        lambda s: s.update(heat=[[1]]),
        lambda s: s.update(heat={"1": 1}),
        lambda s: s.update(heat=[[i, 1.0] for i in range(50)] * 10000),
    ],
)
def test_damaged_state_is_refused_and_changes_nothing(change) -> None:  # type: ignore[no-untyped-def]
    clock = Clock()
    heat = HeatMap(50, capacity=64, clock=clock)
    heat.touch(2)
    state = heat.to_state()
    change(state)
    with pytest.raises(HeatError):
        heat.load_state(state)
    assert heat.heat(2) == pytest.approx(1.0)
    with pytest.raises(HeatError):
        heat.load_state([1, 2])


def test_buckets() -> None:
    heat = HeatMap(8, clock=Clock())
    heat.touch(0)
    heat.touch(7)
    heat.touch(7)
    assert heat.buckets(4) == [1.0, 0.0, 0.0, 2.0]
    assert len(heat.buckets(100)) == 8
