"""Shared fixtures, and the test tiers. Tests live in folders by cost, and each test gets the
marker of its folder: `unit` (pure, in-process, the everyday loop: `make test-unit`), `engine`
(pool and volume in-process on memory or image disks), `integration` (real mounts, losetup,
mkfs, kill -9) and `tools` (the bench, scenario, VM-lab and mutation harnesses).

`blockspace_env` is the integration tier's scratch area: everything it mounts, attaches or
starts is taken down again after the test, pass or fail."""

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from integration.helpers import BlockspaceEnv

from blockspace.disks.hostlock import LOCK_DIR_ENV


@pytest.fixture(autouse=True, scope="session")
def host_lock_dir() -> Iterator[str]:
    """The host locks of the disks the tests make (blockspace/disks/hostlock.py) go to a
    scratch directory, not /run/blockspace/locks; the daemons and CLIs the tests start
    inherit it, so they all see the same locks, as the processes of one host do."""
    directory = tempfile.mkdtemp(prefix="blockspace-locks-")
    previous = os.environ.get(LOCK_DIR_ENV)
    os.environ[LOCK_DIR_ENV] = directory
    try:
        yield directory
    finally:
        if previous is None:
            os.environ.pop(LOCK_DIR_ENV, None)
        else:
            os.environ[LOCK_DIR_ENV] = previous
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def blockspace_env() -> Iterator[BlockspaceEnv]:
    env = BlockspaceEnv.create()
    try:
        yield env
    finally:
        problems = env.cleanup()
    if problems:
        pytest.fail("teardown could not clean up cleanly: " + "; ".join(problems))


TIERS = ("unit", "engine", "integration", "tools")
TESTS = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        parts = item.path.relative_to(TESTS).parts
        tier = parts[0] if len(parts) > 1 else None
        if tier not in TIERS:
            raise pytest.UsageError(f"{item.nodeid}: every test lives in one of {TIERS}")
        item.add_marker(getattr(pytest.mark, tier))
