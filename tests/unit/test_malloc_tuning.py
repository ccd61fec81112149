"""The daemon's malloc settings: large request buffers are reused, not faulted in again."""

import os
import subprocess
import sys

import pytest

CHURN = """
import os, resource, sys
from blockspace.service.malloc_tuning import tune_malloc
if sys.argv[1] == "tuned":
    assert tune_malloc()
def churn():
    for _ in range(300):  # what a 512 KiB read does: a few large buffers per request
        parts = [bytes(bytearray(131072)) for _ in range(4)]
        out = bytearray(524288)
        for i, part in enumerate(parts):
            out[i * 131072:(i + 1) * 131072] = part
        bytes(out)
churn()  # warm up: the heap reaches its working size
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
churn()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True,
                            text=True, check=True, env={**os.environ, "GLIBC_TUNABLES": ""})
    return int(result.stdout)


@pytest.mark.skipif(not os.path.exists("/lib/x86_64-linux-gnu/libc.so.6")
                    and not os.path.exists("/lib/aarch64-linux-gnu/libc.so.6"),
                    reason="not a glibc system: the daemon leaves malloc alone there")
def test_tuned_malloc_stops_request_buffers_from_faulting_in_fresh_pages() -> None:
    default, tuned = page_faults("default"), page_faults("tuned")
    # 300 requests with ~2 MiB of buffers each: ~14k faults by default on this machine
    assert default > 5_000
    assert tuned < default / 20
