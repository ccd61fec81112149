"""Running a handful of I/O jobs at once, with errors that stay readable.

trio wraps failures of a nursery in an ExceptionGroup; callers of the volume want the one
BlockspaceError that says what went wrong (and the FUSE adapter needs its errno).
"""

from collections.abc import Awaitable, Callable

import trio

from blockspace.errors import BlockspaceError

Job = Callable[[], Awaitable[None]]


def bind(fn: Callable[..., Awaitable[None]], *args: object) -> Job:
    """A job calling fn(*args): like functools.partial, typed for run_all."""

    async def job() -> None:
        await fn(*args)

    return job


async def run_all(jobs: list[Job]) -> None:
    """Run jobs concurrently; a single job runs inline and none costs nothing (no nursery).
    If jobs fail with BlockspaceErrors only, the first of them is raised on its own."""
    if not jobs:
        return
    if len(jobs) == 1:
        await jobs[0]()
        return
    try:
        async with trio.open_nursery() as nursery:
            for job in jobs:
                nursery.start_soon(job)
    except BaseExceptionGroup as group:
        found = leaves(group)
        if found and all(isinstance(leaf, BlockspaceError) for leaf in found):
            raise found[0] from None
        raise


def leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in leaves(inner)]
    return [error]
