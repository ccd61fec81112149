"""Tests of the extent allocator: placement rule, capacity of uneven disks, all-or-nothing."""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)

from blockspace.errors import BlockspaceError, NoSpace
from blockspace.geometry.allocator import Extent, ExtentAllocator, max_slabs, usable_bytes

# -- reference models ---------------------------------------------------------------------


def greedy_slab_count(free: Mapping[int, int], width: int) -> int:
    """Slab-by-slab simulation of the most-free rule (ties to the lower disk id)."""
    counts = dict(free)
    slabs = 0
    while True:
        eligible = sorted((d for d in counts if counts[d] > 0), key=lambda d: (-counts[d], d))
        if len(eligible) < width:
            return slabs
        for disk_id in eligible[:width]:
            counts[disk_id] -= 1
        slabs += 1


def fill(alloc: ExtentAllocator, width: int, exclude: tuple[int, ...] = ()) -> list[list[Extent]]:
    """Allocate single slabs until NoSpace."""
    slabs = []
    while True:
        try:
            slabs.append(alloc.allocate(width, exclude=exclude))
        except NoSpace:
            return slabs


def assert_valid_slabs(slabs: list[list[Extent]], width: int) -> None:
    seen: set[Extent] = set()
    for slab in slabs:
        assert len(slab) == width
        assert len({disk_id for disk_id, _ in slab}) == width
        for extent in slab:
            assert extent not in seen
            seen.add(extent)


GIB_EXTENTS = 16  # "1 GiB" in the examples: 16 extents of 64 MiB


# -- capacity of uneven disks ---------------------------------------------------------------


def test_mirror2_on_1g_1g_2g_uses_all_space() -> None:
    disks = {0: GIB_EXTENTS, 1: GIB_EXTENTS, 2: 2 * GIB_EXTENTS}
    alloc = ExtentAllocator(disks)
    assert max_slabs(alloc.free_map(), 2) == 2 * GIB_EXTENTS
    slabs = fill(alloc, 2)
    assert len(slabs) == 2 * GIB_EXTENTS  # the whole 2 GiB worth of mirrored slabs
    assert_valid_slabs(slabs, 2)
    assert alloc.free_map() == {0: 0, 1: 0, 2: 0}
    # every slab has one copy on the big disk
    assert all(2 in {d for d, _ in slab} for slab in slabs)


def test_mirror2_on_three_equal_disks_gives_one_and_a_half_disks() -> None:
    n = 100
    alloc = ExtentAllocator({1: n, 2: n, 3: n})
    slabs = fill(alloc, 2)
    assert len(slabs) == 3 * n // 2  # 1.5x one disk, not 1x
    assert_valid_slabs(slabs, 2)
    assert sum(alloc.free_map().values()) == 0


def test_mirror2_on_three_equal_odd_disks_leaves_one_extent() -> None:
    alloc = ExtentAllocator({0: 7, 1: 7, 2: 7})
    assert len(fill(alloc, 2)) == 10
    assert sum(alloc.free_map().values()) == 1


def test_parity_width3_on_four_uneven_disks() -> None:
    disks = {0: 10, 1: 10, 2: 10, 3: 30}
    assert max_slabs(disks, 3) == 15  # the big disk cannot be fully used: 15 of its 30
    alloc = ExtentAllocator(disks)
    slabs = fill(alloc, 3)
    assert len(slabs) == 15
    assert_valid_slabs(slabs, 3)
    assert alloc.free_map() == {0: 0, 1: 0, 2: 0, 3: 15}

    disks = {0: 8, 1: 12, 2: 16, 3: 20}  # sum 56, 56 // 3 = 18 and nothing exceeds s
    alloc = ExtentAllocator(disks)
    slabs = fill(alloc, 3)
    assert len(slabs) == max_slabs(disks, 3) == 18
    assert_valid_slabs(slabs, 3)


# -- placement rule -------------------------------------------------------------------------


def test_placement_most_free_then_lowest_id_then_lowest_extent() -> None:
    alloc = ExtentAllocator({5: 4, 3: 4, 9: 6})
    assert alloc.allocate(2) == [(9, 0), (3, 0)]  # 9 has most free; 3 beats 5 on the tie
    assert alloc.allocate(2) == [(9, 1), (5, 0)]  # now 9:5 5:4 3:3
    assert alloc.free_map() == {3: 3, 5: 3, 9: 4}


def test_lowest_free_extent_reused_after_release() -> None:
    alloc = ExtentAllocator({0: 10, 1: 10})
    slabs = [alloc.allocate(2) for _ in range(5)]
    assert slabs[2] == [(0, 2), (1, 2)]
    alloc.release(slabs[3] + slabs[1])
    assert alloc.allocate(2) == [(0, 1), (1, 1)]
    assert alloc.allocate(2) == [(0, 3), (1, 3)]
    assert alloc.allocate(2) == [(0, 5), (1, 5)]


def test_width_one_simple_spreads_over_disks() -> None:
    alloc = ExtentAllocator({0: 2, 1: 2})
    assert [alloc.allocate(1) for _ in range(4)] == [[(0, 0)], [(1, 0)], [(0, 1)], [(1, 1)]]
    with pytest.raises(NoSpace):
        alloc.allocate(1)


# -- errors leave state unchanged ------------------------------------------------------------


def test_nospace_changes_nothing_and_has_clear_message() -> None:
    alloc = ExtentAllocator({0: 3, 1: 1, 2: 0})
    alloc.allocate(2)  # takes disk 0 and disk 1
    before = alloc.free_map()
    with pytest.raises(NoSpace, match=r"a slab needs 2 disks with a free extent, only 1 have one"):
        alloc.allocate(2)
    assert alloc.free_map() == before
    with pytest.raises(NoSpace, match="needs 4 disks"):
        alloc.allocate(4)
    assert alloc.free_map() == before
    assert isinstance(NoSpace("x"), BlockspaceError)


def test_nospace_message_exact() -> None:
    alloc = ExtentAllocator({0: 1, 1: 1, 2: 0})
    with pytest.raises(NoSpace) as info:
        alloc.allocate(3)
    assert str(info.value) == (
        "not enough free space: a slab needs 3 disks with a free extent, only 2 have one"
    )


def test_allocate_many_all_or_nothing() -> None:
    alloc = ExtentAllocator({0: 4, 1: 4, 2: 8})
    before = alloc.free_map()
    with pytest.raises(NoSpace):
        alloc.allocate_many(2, 9)  # 8 fit
    assert alloc.free_map() == before
    slabs = alloc.allocate_many(2, 8)
    assert len(slabs) == 8
    assert_valid_slabs(slabs, 2)
    assert alloc.free_map() == {0: 0, 1: 0, 2: 0}
    assert alloc.allocate_many(2, 0) == []


def test_allocate_many_matches_repeated_allocate() -> None:
    disks = {0: 5, 1: 9, 2: 3, 3: 7}
    a, b = ExtentAllocator(disks), ExtentAllocator(disks)
    assert a.allocate_many(3, 7) == [b.allocate(3) for _ in range(7)]


def test_allocate_many_fails_even_if_single_slabs_would_fit() -> None:
    # 10 + 10 + 30 disks, width 3: 10 slabs fit, the 11th does not, though the big disk has room
    alloc = ExtentAllocator({0: 10, 1: 10, 2: 30})
    before = alloc.free_map()
    with pytest.raises(NoSpace, match="11 slabs"):
        alloc.allocate_many(3, 11)
    assert alloc.free_map() == before
    assert len(alloc.allocate_many(3, 10)) == 10


def test_exclude_is_honoured() -> None:
    alloc = ExtentAllocator({0: 10, 1: 5, 2: 5, 3: 1})
    slab = alloc.allocate(2, exclude={0})
    assert {d for d, _ in slab} == {1, 2}
    slabs = alloc.allocate_many(2, 3, exclude=[0, 3])
    assert all(d in (1, 2) for slab in slabs for d, _ in slab)
    before = alloc.free_map()
    assert before == {0: 10, 1: 1, 2: 1, 3: 1}
    with pytest.raises(NoSpace, match="only 1 have one"):
        alloc.allocate(2, exclude=(0, 1, 2))
    assert alloc.free_map() == before
    with pytest.raises(NoSpace):
        alloc.allocate_many(2, 2, exclude=(0,))
    assert alloc.free_map() == before
    assert alloc.allocate(2, exclude=(42,)) == [(0, 0), (1, 4)]  # unknown ids are ignored


def test_bad_width_and_count() -> None:
    alloc = ExtentAllocator({0: 4})
    for width in (0, -1):
        with pytest.raises(ValueError):
            alloc.allocate(width)
        with pytest.raises(ValueError):
            max_slabs({0: 4}, width)
    with pytest.raises(ValueError):
        alloc.allocate_many(1, -1)
    assert alloc.free_map() == {0: 4}


# -- release ---------------------------------------------------------------------------------


def test_release_errors_are_all_or_nothing() -> None:
    alloc = ExtentAllocator({0: 4, 1: 4})
    slab = alloc.allocate(2)
    before = alloc.free_map()
    with pytest.raises(ValueError, match="not allocated"):
        alloc.release([slab[0], (0, 3)])
    with pytest.raises(ValueError, match="twice"):
        alloc.release([slab[0], slab[0]])
    with pytest.raises(ValueError, match="out of range"):
        alloc.release([slab[0], (1, 4)])
    with pytest.raises(ValueError, match="unknown disk"):
        alloc.release([slab[0], (7, 0)])
    with pytest.raises(ValueError, match="not an extent"):
        alloc.release([slab[0], (1,)])  # type: ignore[list-item]
    assert alloc.free_map() == before
    assert all(alloc.is_used(e) for e in slab)
    alloc.release(slab)
    assert alloc.free_map() == {0: 4, 1: 4}
    with pytest.raises(ValueError, match="not allocated"):
        alloc.release(slab)


def test_release_of_generator() -> None:
    alloc = ExtentAllocator({0: 2, 1: 2})
    slab = alloc.allocate(2)
    alloc.release(e for e in slab)
    assert alloc.free_map() == {0: 2, 1: 2}


# -- constructor, disks ------------------------------------------------------------------------


def test_constructor_with_used_extents() -> None:
    used = [(0, 0), (1, 0), (0, 2), (1, 5), (2, 1)]
    alloc = ExtentAllocator({0: 4, 1: 6, 2: 2}, used)
    assert alloc.free_map() == {0: 2, 1: 4, 2: 1}
    assert alloc.free_extents(1) == 4
    assert all(alloc.is_used(e) for e in used)
    assert alloc.allocate(2) == [(1, 1), (0, 1)]
    assert alloc.allocate(2) == [(1, 2), (0, 3)]
    assert alloc.allocate(2) == [(1, 3), (2, 0)]
    assert alloc.allocate(1) == [(1, 4)]
    with pytest.raises(NoSpace):
        alloc.allocate(1)
    alloc.release([(1, 5)])  # an extent that came from the constructor
    assert alloc.allocate(1) == [(1, 5)]


def test_constructor_rejects_bad_used_extents() -> None:
    with pytest.raises(ValueError, match="twice"):
        ExtentAllocator({0: 4}, [(0, 1), (0, 1)])
    with pytest.raises(ValueError, match="out of range"):
        ExtentAllocator({0: 4}, [(0, 4)])
    with pytest.raises(ValueError, match="out of range"):
        ExtentAllocator({0: 4}, [(0, -1)])
    with pytest.raises(ValueError, match="unknown disk"):
        ExtentAllocator({0: 4}, [(1, 0)])
    with pytest.raises(ValueError):
        ExtentAllocator({0: -1})


def test_constructor_with_many_used_is_cheap() -> None:
    n = 100_000
    used = [(d, i) for d in range(4) for i in range(0, n - 1)]
    alloc = ExtentAllocator({d: n for d in range(64)}, used)
    assert alloc.free_extents(0) == 1
    # disks 4.. are the most free; disks 0..3 only have their last extent
    assert alloc.allocate(3) == [(4, 0), (5, 0), (6, 0)]
    alloc2 = ExtentAllocator({0: n, 1: n}, [(0, i) for i in range(n - 1)])
    assert alloc2.allocate(2) == [(1, 0), (0, n - 1)]


def test_add_and_remove_disk() -> None:
    alloc = ExtentAllocator({0: 2, 1: 2})
    slab = alloc.allocate(2)
    alloc.add_disk(2, 5)
    assert alloc.free_map() == {0: 1, 1: 1, 2: 5}
    assert alloc.allocate(2) == [(2, 0), (0, 1)]
    with pytest.raises(ValueError, match="already"):
        alloc.add_disk(2, 5)
    with pytest.raises(ValueError, match="used extents"):
        alloc.remove_disk(0)
    with pytest.raises(ValueError, match="unknown disk"):
        alloc.remove_disk(9)
    alloc.release([slab[0], (0, 1)])
    alloc.remove_disk(0)
    assert alloc.free_map() == {1: 1, 2: 4}
    assert alloc.disk_ids == [1, 2]
    with pytest.raises(ValueError, match="unknown disk"):
        alloc.free_extents(0)


def test_large_pool_allocation() -> None:
    alloc = ExtentAllocator({d: 100_000 for d in range(64)})
    slabs = alloc.allocate_many(8, 2000)
    assert_valid_slabs(slabs, 8)
    assert sum(alloc.free_map().values()) == 64 * 100_000 - 16_000


# -- max_slabs and usable_bytes ------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(
    free=st.dictionaries(st.integers(0, 12), st.integers(0, 25), max_size=8),
    width=st.integers(1, 6),
)
def test_max_slabs_equals_greedy_simulation(free: dict[int, int], width: int) -> None:
    assert max_slabs(free, width) == greedy_slab_count(free, width)


@settings(max_examples=100, deadline=None)
@given(
    disks=st.dictionaries(st.integers(0, 9), st.integers(0, 20), min_size=1, max_size=6),
    width=st.integers(1, 4),
)
def test_allocator_reaches_max_slabs(disks: dict[int, int], width: int) -> None:
    alloc = ExtentAllocator(disks)
    expected = max_slabs(alloc.free_map(), width)
    slabs = fill(alloc, width)
    assert len(slabs) == expected
    assert_valid_slabs(slabs, width)
    assert max_slabs(alloc.free_map(), width) == 0


def test_max_slabs_huge_counts() -> None:
    free = {d: 10**7 for d in range(64)}
    assert max_slabs(free, 2) == 32 * 10**7
    assert max_slabs(free, 64) == 10**7
    assert max_slabs(free, 65) == 0
    uneven = {d: 10**7 - d * 123_457 for d in range(64)}
    s = max_slabs(uneven, 5)
    assert sum(min(f, s) for f in uneven.values()) >= 5 * s
    assert sum(min(f, s + 1) for f in uneven.values()) < 5 * (s + 1)
    lopsided = {0: 10**7, 1: 10**7, 2: 1, 3: 1}
    assert max_slabs(lopsided, 2) == 10**7 + 1
    assert max_slabs(lopsided, 3) == 2


def test_max_slabs_edge_cases() -> None:
    assert max_slabs({}, 1) == 0
    assert max_slabs({0: 0, 1: 0}, 1) == 0
    assert max_slabs({0: 5}, 1) == 5
    assert max_slabs({0: 5}, 2) == 0
    assert max_slabs({0: 16, 1: 16, 2: 32}, 2) == 32
    with pytest.raises(ValueError):
        max_slabs({0: -1}, 1)


def test_usable_bytes() -> None:
    slab = 64 << 20
    disks = {0: 16, 1: 16, 2: 32}  # 1G + 1G + 2G in 64 MiB extents
    assert usable_bytes(disks, 2, 1, slab) == 2 << 30  # mirror-2: 2 GiB
    assert usable_bytes(disks, 3, 2, slab) == 16 * 2 * slab  # parity 2+1: 16 slabs
    assert usable_bytes(disks, 1, 1, slab) == 4 << 30  # simple, one column: everything
    assert usable_bytes({0: 10, 1: 10, 2: 10, 3: 30}, 3, 2, 4096) == 15 * 2 * 4096
    assert usable_bytes({0: 1}, 2, 1, slab) == 0
    with pytest.raises(ValueError):
        usable_bytes(disks, 2, 3, slab)
    with pytest.raises(ValueError):
        usable_bytes(disks, 2, 1, -1)


# -- model check: random interleaving of allocate / release / disks --------------------------------


class AllocatorModel(RuleBasedStateMachine):
    """Against a brute-force model: every placement follows the rule, nothing is handed out
    twice, no slab has two extents on one disk, failures change nothing."""

    slabs = Bundle("slabs")

    def __init__(self) -> None:
        super().__init__()
        self.alloc: ExtentAllocator | None = None
        self.sizes: dict[int, int] = {}
        self.used: set[Extent] = set()

    @initialize(
        sizes=st.dictionaries(st.integers(0, 7), st.integers(0, 12), min_size=1, max_size=6),
        data=st.data(),
    )
    def init(self, sizes: dict[int, int], data: st.DataObject) -> None:
        all_extents = [(d, i) for d, n in sizes.items() for i in range(n)]
        used = data.draw(st.lists(st.sampled_from(all_extents), unique=True)) if all_extents else []
        self.alloc = ExtentAllocator(sizes, used)
        self.sizes = dict(sizes)
        self.used = set(used)

    def model_free(self) -> dict[int, int]:
        return {
            d: n - sum(1 for (ud, _) in self.used if ud == d) for d, n in sorted(self.sizes.items())
        }

    def expected_slab(self, width: int, exclude: set[int]) -> list[Extent] | None:
        free = self.model_free()
        eligible = sorted(
            (d for d in free if free[d] > 0 and d not in exclude), key=lambda d: (-free[d], d)
        )
        if len(eligible) < width:
            return None
        return [
            (d, min(i for i in range(self.sizes[d]) if (d, i) not in self.used))
            for d in eligible[:width]
        ]

    @rule(
        target=slabs,
        width=st.integers(1, 5),
        exclude=st.sets(st.integers(0, 8), max_size=3),
    )
    def allocate(self, width: int, exclude: set[int]) -> list[Extent]:
        assert self.alloc is not None
        expected = self.expected_slab(width, exclude)
        before = self.alloc.free_map()
        if expected is None:
            with pytest.raises(NoSpace):
                self.alloc.allocate(width, exclude=exclude)
            assert self.alloc.free_map() == before
            return []
        slab = self.alloc.allocate(width, exclude=exclude)
        assert slab == expected
        assert len({d for d, _ in slab}) == width
        assert not self.used & set(slab)
        self.used |= set(slab)
        return slab

    @rule(
        target=slabs,
        width=st.integers(1, 4),
        count=st.integers(0, 6),
        exclude=st.sets(st.integers(0, 8), max_size=3),
    )
    def allocate_many(self, width: int, count: int, exclude: set[int]) -> object:
        assert self.alloc is not None
        free = {d: f for d, f in self.model_free().items() if d not in exclude}
        before = self.alloc.free_map()
        if greedy_slab_count(free, width) < count:
            with pytest.raises(NoSpace):
                self.alloc.allocate_many(width, count, exclude=exclude)
            assert self.alloc.free_map() == before
            return multiple()
        result = self.alloc.allocate_many(width, count, exclude=exclude)
        assert len(result) == count
        for slab in result:
            assert slab == self.expected_slab(width, exclude)
            assert len({d for d, _ in slab}) == width
            assert not any(d in exclude for d, _ in slab)
            assert not self.used & set(slab)
            self.used |= set(slab)
        return multiple(*result)

    @rule(slab=consumes(slabs))
    def release(self, slab: list[Extent]) -> None:
        assert self.alloc is not None
        if not slab or not set(slab) <= self.used:
            return  # failed allocation, or its disk is gone
        self.alloc.release(slab)
        self.used -= set(slab)

    @rule(extent=st.tuples(st.integers(0, 8), st.integers(-1, 13)))
    def release_bogus(self, extent: Extent) -> None:
        assert self.alloc is not None
        if extent in self.used:
            return
        before = self.alloc.free_map()
        with pytest.raises(ValueError):
            self.alloc.release([extent])
        assert self.alloc.free_map() == before

    @rule(disk_id=st.integers(0, 8), count=st.integers(0, 12))
    def add_disk(self, disk_id: int, count: int) -> None:
        assert self.alloc is not None
        if disk_id in self.sizes:
            with pytest.raises(ValueError):
                self.alloc.add_disk(disk_id, count)
            return
        self.alloc.add_disk(disk_id, count)
        self.sizes[disk_id] = count

    @rule(disk_id=st.integers(0, 8))
    def remove_disk(self, disk_id: int) -> None:
        assert self.alloc is not None
        if disk_id not in self.sizes or any(d == disk_id for d, _ in self.used):
            with pytest.raises(ValueError):
                self.alloc.remove_disk(disk_id)
            return
        self.alloc.remove_disk(disk_id)
        del self.sizes[disk_id]

    @invariant()
    def free_counts_match(self) -> None:
        if self.alloc is None:
            return
        assert self.alloc.free_map() == self.model_free()
        for d in self.sizes:
            assert self.alloc.free_extents(d) == self.model_free()[d]


TestAllocatorModel = AllocatorModel.TestCase
TestAllocatorModel.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# -- degraded placement -------------------------------------------------------------------


def test_degraded_allocation_uses_every_live_disk_then_standby_disks() -> None:
    alloc = ExtentAllocator({0: 4, 1: 4, 2: 4, 3: 4})
    live, absent = alloc.allocate_degraded(4, exclude=[2, 3], standby=[2, 3], max_absent=2)
    assert sorted(d for d, _ in live) == [0, 1]
    assert sorted(d for d, _ in absent) == [2, 3]
    assert all(alloc.is_used(e) for e in live + absent)


def test_degraded_allocation_beyond_the_tolerance_changes_nothing() -> None:
    alloc = ExtentAllocator({0: 4, 1: 4, 2: 4})
    before = alloc.free_map()
    with pytest.raises(NoSpace, match="wait for a rebuild"):
        alloc.allocate_degraded(3, exclude=[1, 2], standby=[1, 2], max_absent=1)
    full = ExtentAllocator({0: 4, 1: 0})
    with pytest.raises(NoSpace):  # the standby disk is full
        full.allocate_degraded(2, exclude=[1], standby=[1], max_absent=1)
    assert alloc.free_map() == before


@given(
    kind=st.sampled_from(["mirror", "parity"]),
    columns=st.integers(1, 6),
    extra=st.integers(2, 3),
    data=st.data(),
)
def test_absent_positions_keep_every_column_readable(
    kind: str, columns: int, extra: int, data: st.DataObject
) -> None:
    from blockspace.geometry.layouts import LayoutSpec, absent_positions, data_positions

    if kind == "mirror":
        spec = LayoutSpec("mirror", columns, copies=extra)
    else:
        spec = LayoutSpec("parity", max(2, columns), parity=extra - 1)
    count = data.draw(st.integers(0, spec.tolerance))
    absent = absent_positions(spec, count)
    assert len(set(absent)) == count
    assert all(0 <= p < spec.width for p in absent)
    if kind == "mirror":
        for column in range(spec.columns):
            assert set(data_positions(spec, 0, column)) - set(absent)
    with pytest.raises(ValueError):
        absent_positions(spec, spec.tolerance + 1)


@pytest.mark.parametrize(
    ("used", "message"),
    [
        ([(0, 1), (1, 1), (0, 1)], "listed as used twice"),
        ([(0, 1), (1, True)], "must be an integer"),
        ([(0, 1), (1, -1)], "out of range"),
        ([(0, 1), (1, 10)], "out of range"),
        ([(0, 1), (5, 1)], "unknown disk"),
        ([(0, 1), (1,)], "not an extent"),
        ([(0, 1), 7], "not an extent"),
    ],
)
def test_the_used_list_is_checked_whole_then_extent_by_extent(
    used: list[object], message: str
) -> None:
    """A pool opens with its used extents checked by whole-list calls; a bad one still
    fails with the message of the extent-by-extent check."""
    with pytest.raises(ValueError, match=message):
        ExtentAllocator({0: 10, 1: 10}, used)  # type: ignore[arg-type]
    allocator = ExtentAllocator({0: 10, 1: 10}, [(0, 1), (1, 9), (0, 0)])
    assert allocator.free_map() == {0: 8, 1: 9}


def test_counted_allocator_equals_one_built_from_the_extent_list() -> None:
    """Opening a pool hands the allocator the per-disk sets validation counted
    (`ExtentAllocator.counted`): it must place exactly as one given the extents as a list."""
    disks = {0: 6, 1: 6, 2: 4}
    used = [(0, 0), (0, 3), (1, 1), (2, 0), (2, 3)]
    listed = ExtentAllocator(disks, used)
    counted = ExtentAllocator.counted(disks, {0: {0, 3}, 1: {1}, 2: {0, 3}})
    for disk_id in disks:
        assert counted.free_extents(disk_id) == listed.free_extents(disk_id)
    assert all(counted.is_used(extent) for extent in used)
    placements = [counted.allocate(2) for _ in range(5)]
    assert placements == [listed.allocate(2) for _ in range(5)]
    assert not set(used) & {extent for slab in placements for extent in slab}


@pytest.mark.parametrize(("in_use", "message"), [
    ({7: {0}}, "unknown disk 7"),
    ({0: {6}}, "out of range"),
    ({0: {-1}}, "out of range"),
])
def test_counted_allocator_refuses_what_does_not_fit_the_disks(
        in_use: dict[int, set[int]], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ExtentAllocator.counted({0: 6, 1: 6}, in_use)
