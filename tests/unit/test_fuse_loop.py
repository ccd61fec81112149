"""The FUSE wait that reads queued requests at once (blockspace/service/fuse_loop.py), on a
pipe standing in for /dev/fuse: a queued request costs no pass through the scheduler, an
empty fd waits, other tasks still run, a waiter whose request was taken waits again, and
`terminate` ends every waiter."""

import os
from collections.abc import Iterator

import pytest
import trio
import trio.testing

from blockspace.service.fuse_loop import QueuedFirst, session_fd


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    read_end, write_end = os.pipe()
    os.set_blocking(read_end, False)  # a read of an empty "fd" fails instead of hanging
    try:
        yield read_end, write_end
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_queued_request_is_taken_without_a_pass_through_the_scheduler(
    pipe: tuple[int, int],
) -> None:
    read_end, write_end = pipe

    async def scenario() -> None:
        waiter = QueuedFirst(read_end)
        ran: list[str] = []

        async def bystander() -> None:
            ran.append("bystander")

        os.write(write_end, b"r")
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bystander)
            assert await waiter() is True
            assert ran == []  # nothing else ran in between: no checkpoint was taken
        assert (waiter.at_once, waiter.after_wait) == (1, 0)

    trio.run(scenario)


def test_an_empty_fd_waits_until_a_request_arrives(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe

    async def scenario() -> None:
        waiter = QueuedFirst(read_end)
        got: list[bool] = []

        async def serve() -> None:
            got.append(await waiter())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            os.write(write_end, b"r")
        assert got == [True]
        assert (waiter.at_once, waiter.after_wait) == (0, 1)

    trio.run(scenario)


def test_requests_that_never_await_still_let_other_tasks_run(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe

    async def scenario() -> None:
        waiter = QueuedFirst(read_end, fairness=4)
        os.write(write_end, b"r")  # always queued: the waiter never has to wait
        ticks = 0
        longest = 0

        async def bystander() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(bystander)
            await trio.lowlevel.checkpoint()
            in_a_row = 0
            for _ in range(40):
                before = ticks
                assert await waiter() is True
                in_a_row = in_a_row + 1 if ticks == before else 0
                longest = max(longest, in_a_row)
            nursery.cancel_scope.cancel()
        # Every 4th request checkpoints; trio runs a batch's tasks in random order, so the
        # bystander's tick may show only after the next three requests.
        assert longest < 2 * 4
        assert ticks >= 40 // 4 - 1

    trio.run(scenario)


def test_a_waiter_whose_request_another_task_took_waits_again(pipe: tuple[int, int]) -> None:
    read_end, write_end = pipe

    async def scenario() -> None:
        waiter = QueuedFirst(read_end)
        served: list[str] = []
        stale: list[str] = []

        async def worker(name: str) -> None:
            while await waiter():
                try:
                    os.read(read_end, 1)  # pyfuse3's read, right after the wait returns
                except BlockingIOError:
                    stale.append(name)  # told "readable" with nothing queued
                served.append(name)

        with trio.fail_after(5):  # terminate must end all three
            async with trio.open_nursery() as nursery:
                for name in "abc":
                    nursery.start_soon(worker, name)
                await trio.testing.wait_all_tasks_blocked()
                for count in (1, 2, 3):
                    os.write(write_end, b"r")
                    await trio.testing.wait_all_tasks_blocked()
                    assert len(served) == count
                waiter.terminate()
                trio.lowlevel.notify_closing(read_end)  # what pyfuse3.terminate does
        assert stale == []

    trio.run(scenario)


def test_terminate_ends_tasks_waiting_on_the_fd_or_for_their_turn(pipe: tuple[int, int]) -> None:
    read_end, _ = pipe

    async def scenario() -> None:
        waiter = QueuedFirst(read_end)
        results: list[bool] = []

        async def serve() -> None:
            results.append(await waiter())

        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                for _ in range(3):  # one waits on the fd, two for the lock
                    nursery.start_soon(serve)
                await trio.testing.wait_all_tasks_blocked()
                waiter.terminate()
                trio.lowlevel.notify_closing(read_end)
        assert results == [False, False, False]
        assert await waiter() is False  # and any later call

    trio.run(scenario)


def test_the_session_fd_is_the_one_descriptor_init_opened() -> None:
    assert session_fd({3, 7}, {3, 7, 9}) == 9
    assert session_fd({3}, {3}) is None  # none opened: keep pyfuse3's loop
    assert session_fd(set(), {4, 5}) is None  # ambiguous: keep pyfuse3's loop
