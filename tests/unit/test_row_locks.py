"""Row locks: overlapping holders take turns, nothing stays held after a cancellation or an
error, and keys that hash onto one lock take it once."""

import pytest
import trio
import trio.testing

from blockspace.volume.row_locks import RowLocks


def test_holders_of_a_common_row_take_turns_and_others_do_not_wait() -> None:
    async def scenario() -> None:
        locks = RowLocks()
        events: list[str] = []
        first_in = trio.Event()
        release_first = trio.Event()

        async def first() -> None:
            async with locks.hold([(0, 1), (0, 2)]):
                events.append("first in")
                first_in.set()
                await release_first.wait()
                events.append("first out")

        async def second() -> None:
            await first_in.wait()
            async with locks.hold([(0, 2), (0, 3)]):  # shares row 2
                events.append("second in")

        async def unrelated() -> None:
            await first_in.wait()
            async with locks.hold([(7, 9)]):
                events.append("unrelated in")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            nursery.start_soon(second)
            nursery.start_soon(unrelated)
            await trio.testing.wait_all_tasks_blocked()
            assert events == ["first in", "unrelated in"]
            release_first.set()
        assert events == ["first in", "unrelated in", "first out", "second in"]

    trio.run(scenario)


def test_a_cancelled_waiter_and_a_failed_holder_leave_nothing_held() -> None:
    count = 4096
    held = (0, 5)
    # a row whose lock comes first in lock order: taken before the wait on the held one
    free = next((0, row) for row in range(6, 10_000) if hash((0, row)) % count
                < hash(held) % count)

    async def scenario() -> None:
        locks = RowLocks(count)
        holding = trio.Event()
        release = trio.Event()

        async def holder() -> None:
            async with locks.hold([held]):
                holding.set()
                await release.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder)
            await holding.wait()
            with trio.move_on_after(0.05) as scope:  # waits for `held`, holding `free`
                async with locks.hold([free, held]):
                    pytest.fail("that row is held")
            assert scope.cancelled_caught
            release.set()
        with pytest.raises(RuntimeError, match="inside"):
            async with locks.hold([free, held]):
                raise RuntimeError("inside")

        async def other_task() -> None:
            with trio.fail_after(1):  # every lock is free again, for anyone
                async with locks.hold([free, held]):
                    pass

        async with trio.open_nursery() as nursery:
            nursery.start_soon(other_task)

    trio.run(scenario)


def test_keys_on_one_lock_take_it_once() -> None:
    async def scenario() -> None:
        locks = RowLocks(count=1)  # every key hashes onto the same lock
        with trio.fail_after(1):
            async with locks.hold([(0, 1), (0, 2), (3, 4)]):
                pass
            async with locks.hold([(0, 1)]):
                pass

    trio.run(scenario)
