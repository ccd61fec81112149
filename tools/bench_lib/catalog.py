"""Names of the setups, the groups `--setups` accepts, and the targets of issue 7. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from bench_lib.jobs import JOBS


@dataclass(frozen=True)
class SetupInfo:
    name: str
    label: str
    group: str  # "baseline" or "blockspace"


SETUPS: tuple[SetupInfo, ...] = (
    SetupInfo("raw", "raw loop on one image", "baseline"),
    SetupInfo("qsd-raw", "qemu-storage-daemon FUSE export, raw", "baseline"),
    SetupInfo("qsd-quorum", "qemu-storage-daemon FUSE export, quorum 2-way", "baseline"),
    SetupInfo("btrfs-raid1", "btrfs raid1 (4 loops)", "baseline"),
    SetupInfo("btrfs-raid5", "btrfs raid5 (4 loops)", "baseline"),
    SetupInfo("pyfuse-blocking", "pyfuse3 pass-through, blocking I/O in handlers", "baseline"),
    SetupInfo("pyfuse-thread", "pyfuse3 pass-through, trio.to_thread per I/O", "baseline"),
    SetupInfo("simple", "Blockspace simple (4 disks)", "blockspace"),
    SetupInfo("mirror-2", "Blockspace mirror-2 (4 disks)", "blockspace"),
    SetupInfo("mirror-3", "Blockspace mirror-3 (4 disks)", "blockspace"),
    SetupInfo("parity-1", "Blockspace parity-1 (4 disks, 3+1)", "blockspace"),
    SetupInfo("parity-2", "Blockspace parity-2 (5 disks, 3+2)", "blockspace"),
    # fio's nbd engine (libnbd) on a Unix socket, no kernel device (issue 20 item 6).
    SetupInfo("nbd-qemu", "qemu-nbd on one image (NBD)", "nbd"),
    SetupInfo("nbd-nbdkit", "nbdkit file plugin on one image (NBD)", "nbd"),
    SetupInfo("nbd-python", "trio NBD pass-through, blocking I/O inline (NBD)", "nbd"),
    SetupInfo("nbd-simple", "Blockspace simple (4 disks) over mount --nbd", "nbd"),
)
SETUPS_BY_NAME = {s.name: s for s in SETUPS}
GROUPS = {
    "all": [s.name for s in SETUPS],
    # What runs when --setups is not given: the NBD group only with --nbd.
    "default": [s.name for s in SETUPS if s.group != "nbd"],
    "nbd": [s.name for s in SETUPS if s.group == "nbd"],
    "baselines": [s.name for s in SETUPS if s.group == "baseline"],
    "blockspace": [s.name for s in SETUPS if s.group == "blockspace"],
}

# Reference setups that get a ratio table of their own (the others appear in the targets).
RATIO_REFERENCES = ("qsd-raw", "pyfuse-blocking")


class SelectionError(ValueError):
    pass


def select_setups(text: str) -> list[str]:
    """`--setups raw,mirror-2` or group names (all, baselines, blockspace); catalogue order,
    no duplicates."""
    wanted: set[str] = set()
    for word in (w.strip() for w in text.split(",")):
        if not word:
            continue
        if word in GROUPS:
            wanted.update(GROUPS[word])
        elif word in SETUPS_BY_NAME:
            wanted.add(word)
        else:
            known = ", ".join([*GROUPS, *SETUPS_BY_NAME])
            raise SelectionError(f"unknown setup {word!r} (known: {known})")
    if not wanted:
        raise SelectionError("no setups selected")
    return [s.name for s in SETUPS if s.name in wanted]


@dataclass(frozen=True)
class Target:
    setup: str
    reference: str
    job: str
    ratio: float  # setup / reference must be >= ratio

    @property
    def text(self) -> str:
        return f"{self.setup} {self.job} >= {self.ratio:g}x {self.reference}"


def _targets() -> tuple[Target, ...]:
    out: list[Target] = []
    # mirror-2: >= 0.6x the qsd raw export on 4K random read and write qd16, >= 0.9x on
    # sequential read and write; >= 2x btrfs raid1 on seq write and 4K random write.
    out += [
        Target("mirror-2", "qsd-raw", "randread-4k-qd16", 0.6),
        Target("mirror-2", "qsd-raw", "randwrite-4k-qd16", 0.6),
        Target("mirror-2", "qsd-raw", "seqread-1m-qd4", 0.9),
        Target("mirror-2", "qsd-raw", "seqwrite-1m-qd4", 0.9),
        Target("mirror-2", "btrfs-raid1", "seqwrite-1m-qd4", 2.0),
        Target("mirror-2", "btrfs-raid1", "randwrite-4k-qd1", 2.0),
        Target("mirror-2", "btrfs-raid1", "randwrite-4k-qd16", 2.0),
    ]
    # parity-1 and parity-2: >= btrfs raid5 on all six jobs.
    for setup in ("parity-1", "parity-2"):
        out += [Target(setup, "btrfs-raid5", job.name, 1.0) for job in JOBS]
    # No job slower than 0.8x the pyfuse3 pass-through ceiling for the simple layout.
    out += [Target("simple", "pyfuse-blocking", job.name, 0.8) for job in JOBS]
    # Issue 20: over NBD, simple >= 0.7x qemu-nbd on 4K random read qd16 and >= 0.5x on 4K
    # random write qd16; >= 1.5x its own FUSE + loop path on 4K random read qd16, >= 1x on
    # every other job.
    out += [
        Target("nbd-simple", "nbd-qemu", "randread-4k-qd16", 0.7),
        Target("nbd-simple", "nbd-qemu", "randwrite-4k-qd16", 0.5),
    ]
    out += [Target("nbd-simple", "simple", job.name,
                   1.5 if job.name == "randread-4k-qd16" else 1.0) for job in JOBS]
    return tuple(out)


TARGETS = _targets()
