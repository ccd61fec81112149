"""Shared fixtures. `blockspace_env` is the integration tier's scratch area: everything it
mounts, attaches or starts is taken down again after the test, pass or fail."""

from collections.abc import Iterator

import pytest
from integration.helpers import BlockspaceEnv


@pytest.fixture
def blockspace_env() -> Iterator[BlockspaceEnv]:
    env = BlockspaceEnv.create()
    try:
        yield env
    finally:
        problems = env.cleanup()
    if problems:
        pytest.fail("teardown could not clean up cleanly: " + "; ".join(problems))
