"""Where a daemon's CPU goes, by layer, from `perf report --sort dso,sym --stdio -g none`.

py-spy sees only Python frames; this sees everything the process ran, kernel included: the
FUSE transfer of request data, the page-cache copy of a write, io_uring, hashing, the Python
interpreter itself. Pure: the perf text in, shares out.
"""

from __future__ import annotations

import re
from collections import Counter

# A sample line: "    18.05%  libpython3.11.so.1.0   [.] _PyEval_EvalFrameDefault"
_LINE = re.compile(
    r"^\s*(?P<share>\d+(?:\.\d+)?)%\s+(?P<dso>\S+)\s+\[(?P<kind>[.k])\]\s+(?P<sym>.*)$")

LAYERS = (
    "Python interpreter",
    "user-space memory copies (libc memcpy)",
    "hashing (xxhash)",
    "erasure coding (ISA-L / liberasurecode)",
    "other user space (malloc, libc, pyfuse3, ...)",
    "kernel: FUSE request transfer",
    "kernel: memory copies",
    "kernel: page cache and file system",
    "kernel: io_uring",
    "kernel: other (syscalls, scheduling, interrupts)",
)
_KERNEL_FS = ("ext4", "filemap", "folio", "copy_folio", "generic_perform_write", "xas_",
              "jbd2", "iomap", "xfs_", "mark_buffer", "block_write", "__filemap", "pagecache")


def layer_of(dso: str, kind: str, symbol: str) -> str:
    if kind == "k":
        if symbol.startswith(("fuse_", "gup_", "__iov_iter_get_pages", "iov_iter_get_pages")):
            return "kernel: FUSE request transfer"
        if "memcpy" in symbol or "memmove" in symbol or symbol.startswith(
                ("copy_user", "rep_movs", "_copy_to_user", "_copy_from_user")):
            return "kernel: memory copies"
        if symbol.startswith(("io_", "__io_")):
            return "kernel: io_uring"
        if any(marker in symbol for marker in _KERNEL_FS):
            return "kernel: page cache and file system"
        return "kernel: other (syscalls, scheduling, interrupts)"
    if dso.startswith(("libpython", "python")):
        return "Python interpreter"
    if "xxhash" in dso:
        return "hashing (xxhash)"
    if any(name in dso for name in ("isal", "erasurecode", "pyeclib", "libXorcode", "gf_")):
        return "erasure coding (ISA-L / liberasurecode)"
    if dso.startswith("libc") and ("memmove" in symbol or "memcpy" in symbol):
        return "user-space memory copies (libc memcpy)"
    return "other user space (malloc, libc, pyfuse3, ...)"


def layers(report: str) -> Counter[str]:
    """Percent of the samples per layer (summing to ~100 over the lines perf printed)."""
    shares: Counter[str] = Counter()
    for line in report.splitlines():
        found = _LINE.match(line)
        if found:
            shares[layer_of(found["dso"], found["kind"], found["sym"].strip())] += float(
                found["share"])
    return shares


def render(shares: Counter[str], title: str) -> str:
    if not shares:
        return f"{title}\n(no samples)\n"
    rows = [f"{shares[layer]:6.1f}%  {layer}" for layer in LAYERS if shares[layer] >= 0.05]
    return "\n".join([title, *rows]) + "\n"
