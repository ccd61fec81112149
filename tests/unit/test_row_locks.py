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


def test_locks_exist_only_while_held_or_waited_for() -> None:
    """An idle volume holds no lock objects (200 empty volumes once cost 280 MiB of them);
    a lock waited for survives its holder's release and goes with its last user, also when
    that user is a cancelled waiter."""

    async def scenario() -> None:
        locks = RowLocks()
        assert len(locks) == 0

        async def holder(holding: trio.Event, release: trio.Event) -> None:
            async with locks.hold([(0, 1), (0, 2)]):
                holding.set()
                await release.wait()

        async def waiter() -> None:
            async with locks.hold([(0, 2)]):
                assert len(locks) == 1  # the shared row's lock passed on, the other gone

        holding, release = trio.Event(), trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder, holding, release)
            await holding.wait()
            assert len(locks) == 2
            nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            release.set()
        assert len(locks) == 0

        holding, release = trio.Event(), trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder, holding, release)
            await holding.wait()
            with trio.move_on_after(0.01):
                async with locks.hold([(5, 5), (0, 1)]):
                    pytest.fail("that row is held")
            assert len(locks) == 2  # the cancelled waiter left none of its own behind
            release.set()
        assert len(locks) == 0

    trio.run(scenario)
