"""The work queue of the NBD connections (blockspace/service/work_queue.py): every job runs, no
more workers than asked, a busy worker takes the next job itself, close drains the queue, a
job that raises ends the nursery."""

import pytest
import trio
import trio.testing

from blockspace.service.work_queue import WorkQueue


def test_jobs_run_concurrently_on_at_most_the_workers_asked() -> None:
    running: list[int] = []
    done: list[int] = []
    gate = trio.Event()

    async def job(number: int) -> None:
        running.append(number)
        await gate.wait()
        done.append(number)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            work = WorkQueue(nursery, job, workers=3)
            for number in range(5):
                work.submit(number)
            await trio.testing.wait_all_tasks_blocked()
            assert running == [0, 1, 2]  # the other two wait for a worker
            assert work.workers == 3
            gate.set()
            work.close()
        assert sorted(done) == [0, 1, 2, 3, 4]
        assert work.workers == 3

    trio.run(main)


def test_an_idle_worker_is_woken_rather_than_a_new_one_started() -> None:
    seen: list[int] = []

    async def job(number: int) -> None:
        seen.append(number)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            work = WorkQueue(nursery, job, workers=8)
            for number in range(20):
                work.submit(number)
                await trio.testing.wait_all_tasks_blocked()  # the job done, its worker idle
            assert work.workers == 1
            # Two jobs submitted back to back wake one idle worker each, or start one.
            work.submit(20)
            work.submit(21)
            await trio.testing.wait_all_tasks_blocked()
            assert work.workers == 2
            work.close()
        assert seen == list(range(22))

    trio.run(main)


def test_close_lets_queued_jobs_finish_and_refuses_new_ones() -> None:
    done: list[int] = []

    async def job(number: int) -> None:
        await trio.lowlevel.checkpoint()
        done.append(number)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            work = WorkQueue(nursery, job, workers=1)
            for number in range(4):
                work.submit(number)
            work.close()
            with pytest.raises(RuntimeError, match="closed"):
                work.submit(5)
        assert done == [0, 1, 2, 3]

    trio.run(main)


def test_a_job_that_raises_ends_the_nursery() -> None:
    async def job(number: int) -> None:
        if number == 1:
            raise ValueError("a bug")
        await trio.sleep_forever()

    async def main() -> None:
        with pytest.RaisesGroup(ValueError, allow_unwrapped=True, flatten_subgroups=True):
            async with trio.open_nursery() as nursery:
                work = WorkQueue(nursery, job, workers=4)
                work.submit(0)
                work.submit(1)

    trio.run(main)


def test_at_least_one_worker() -> None:
    async def main() -> None:
        async with trio.open_nursery() as nursery:
            with pytest.raises(ValueError, match="at least one"):
                WorkQueue(nursery, trio.sleep, workers=0)

    trio.run(main)
