"""Block checksums: one 16-byte entry per 4 KiB block, kept in each extent's checksum area.

Entry: u64 xxh3_64 of the block | u64 write sequence number. An all-zero entry means
"never written since the extent was allocated", and such a block must read as zeros; a
real hash is never zero (it is nudged to 1), so the two cannot be confused.

The sequence number says which write a block came from: all copies of one write carry the
same number, and later writes larger ones. A copy whose disk silently dropped a write
still verifies (old data, old checksum), but its sequence number is older than the other
copies' — that is how a lost write is told apart from the current data. Pure code.
"""

import struct
import sys
from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

import xxhash

from blockspace.errors import BlockspaceError

CSUM_BLOCK = 4096
ENTRY_SIZE = 16
UNWRITTEN = bytes(ENTRY_SIZE)
_ENTRY = struct.Struct("<QQ")
_ZERO_BLOCK = bytes(CSUM_BLOCK)
_BIG_ENDIAN = sys.byteorder == "big"  # entries are little-endian on disk


def block_hash(block: bytes | bytearray | memoryview) -> int:
    value = xxhash.xxh3_64_intdigest(block)
    return value or 1


def _hashes(view: memoryview) -> list[int]:
    digest = xxhash.xxh3_64_intdigest
    return [digest(view[i : i + CSUM_BLOCK]) or 1 for i in range(0, len(view), CSUM_BLOCK)]


def _words(entries: bytes | bytearray | memoryview) -> array:
    """Entries as u64 words: hash, seq, hash, seq... (on the hot path: no per-entry unpack)."""
    words = array("Q")
    words.frombytes(entries)
    if _BIG_ENDIAN:
        words.byteswap()
    return words


def entries_for(data: bytes | bytearray | memoryview, seq: int = 0) -> bytes:
    """Checksum entries of `data`, a whole number of blocks, written by write `seq`."""
    if len(data) % CSUM_BLOCK:
        raise ValueError(f"checksummed data must be whole 4K blocks, not {len(data)} bytes")
    view = memoryview(data).cast("B")
    hashes = _hashes(view)
    words = array("Q", bytes(16 * len(hashes)))
    words[0::2] = array("Q", hashes)
    if seq:
        words[1::2] = array("Q", [seq]) * len(hashes)
    if _BIG_ENDIAN:
        words.byteswap()
    return words.tobytes()


def entry_seq(entry: bytes | memoryview) -> int:
    """The write sequence number of an entry (0: unwritten, or written before seqs)."""
    return int(_ENTRY.unpack(entry)[1])


def entry_at(entries: bytes | bytearray, index: int) -> bytes:
    return bytes(entries[index * ENTRY_SIZE : (index + 1) * ENTRY_SIZE])


def entry_seqs(entries: bytes | bytearray | memoryview) -> list[int]:
    """The write sequence number of each entry."""
    return list(_words(entries)[1::2])


def unwritten_flags(entries: bytes | bytearray | memoryview) -> list[bool]:
    """For each entry: does it say "never written" (all zero)?"""
    words = _words(entries)
    return [not (a or b) for a, b in zip(words[0::2], words[1::2], strict=True)]


def any_unwritten(entries: bytes | bytearray | memoryview) -> bool:
    """Does some entry say "never written"? (The hot path's question: one C-level search
    rejects the usual case, where no entry is zero.)"""
    raw = entries if isinstance(entries, bytes) else bytes(entries)
    at = raw.find(UNWRITTEN)
    while at >= 0:
        if at % ENTRY_SIZE == 0:
            return True
        at = raw.find(UNWRITTEN, at + 1)
    return False


def entries_with_seqs(
    data: bytes | bytearray | memoryview, seqs: list[int], unwritten: list[bool] | None = None
) -> bytes:
    """Checksum entries of `data` (whole blocks), block i written by write `seqs[i]`; where
    `unwritten[i]` (and the block is zeros) the entry says "never written" instead. What a
    repair writes: the rebuilt blocks keep the write number of the row they belong to, so
    the sequence numbers keep telling which column is behind."""
    view = memoryview(data).cast("B")
    hashes = _hashes(view)
    if len(seqs) != len(hashes):
        raise ValueError("one sequence number per block")
    words = array("Q", bytes(16 * len(hashes)))
    for index, value in enumerate(hashes):
        if unwritten is not None and unwritten[index] and (
                view[index * CSUM_BLOCK : (index + 1) * CSUM_BLOCK] == _ZERO_BLOCK):
            continue
        words[2 * index] = value
        words[2 * index + 1] = seqs[index]
    if _BIG_ENDIAN:
        words.byteswap()
    return words.tobytes()


@dataclass
class Choice:
    """The outcome of comparing the copies of a range, block by block."""

    data: bytearray
    entries: bytearray
    repairs: dict[int, list[int]] = field(default_factory=dict)  # position -> blocks to rewrite
    unrecoverable: list[int] = field(default_factory=list)  # blocks with no valid copy
    checksum_errors: int = 0
    failed: dict[int, int] = field(default_factory=dict)  # position -> blocks failing
    stale: int = 0  # valid copies older than the newest (a lost write)
    lost: int = 0  # copies saying "never written" where another holds a write (zeroed)
    mismatches: int = 0  # valid copies of the same write that differ
    # position -> blocks where that copy is behind the chosen one (unwritten or older):
    # damage in normal service, the expected state of a returning disk in its catch-up
    behind: dict[int, int] = field(default_factory=dict)


def choose_blocks(copies: dict[int, tuple[bytes, bytes]]) -> Choice:
    """For each block, the newest copy that verifies wins (ties: the lowest position);
    copies that fail, are older, or differ are listed for repair."""
    size = len(next(iter(copies.values()))[0])
    choice = Choice(bytearray(size), bytearray(size // CSUM_BLOCK * ENTRY_SIZE))
    order = sorted(copies)
    for index in range(size // CSUM_BLOCK):
        lo, hi = index * CSUM_BLOCK, (index + 1) * CSUM_BLOCK
        valid, failing = [], []
        for position in order:
            data, entries = copies[position]
            if block_ok(data[lo:hi], entry_at(entries, index)):
                valid.append(position)
            else:
                choice.checksum_errors += 1
                choice.failed[position] = choice.failed.get(position, 0) + 1
                failing.append(position)
        if not valid:
            choice.unrecoverable.append(index)  # nothing to repair from: leave it as it is
            continue
        for position in failing:
            choice.repairs.setdefault(position, []).append(index)
        best = max(valid, key=lambda p: (entry_seq(entry_at(copies[p][1], index)),
                                         entry_at(copies[p][1], index) != UNWRITTEN, -p))
        best_data = copies[best][0][lo:hi]
        best_entry = entry_at(copies[best][1], index)
        choice.data[lo:hi] = best_data
        choice.entries[index * ENTRY_SIZE : (index + 1) * ENTRY_SIZE] = best_entry
        for position in valid:
            if position == best:
                continue
            entry = entry_at(copies[position][1], index)
            if entry == UNWRITTEN and best_entry != UNWRITTEN:
                # "Never written" is a claim like any other: here another copy holds a
                # write, so this one lost it (zeroed under us), and is repaired.
                choice.lost += 1
                choice.behind[position] = choice.behind.get(position, 0) + 1
            elif entry_seq(entry) < entry_seq(best_entry):
                choice.stale += 1
                choice.behind[position] = choice.behind.get(position, 0) + 1
            elif copies[position][0][lo:hi] != best_data:
                choice.mismatches += 1
            else:
                continue
            choice.repairs.setdefault(position, []).append(index)
    return choice


def newer_elsewhere(mine: bytes, others: list[bytes]) -> bool:
    """Does another copy's entry carry a later write than ours for any block?"""
    others = [other for other in others if other != mine]  # the usual case: identical
    if not others:
        return False
    seqs = _words(mine)[1::2]
    for other in others:
        if any(theirs > ours for theirs, ours in zip(_words(other)[1::2], seqs, strict=True)):
            return True
    return False


def block_ok(block: bytes | bytearray | memoryview, entry: bytes | memoryview) -> bool:
    if bytes(entry) == UNWRITTEN:
        return bytes(block) == _ZERO_BLOCK
    value, _ = _ENTRY.unpack(entry)
    return block_hash(block) == value


def bad_blocks(
    data: bytes | bytearray | memoryview | list[memoryview], entries: bytes | bytearray
) -> list[int]:
    """Indices of the blocks of `data` that do not match their entries. `data` may be a
    list of whole-block buffers, taken as one run of blocks in order (a scattered read)."""
    if len(entries) == ENTRY_SIZE and isinstance(data, bytes) and len(data) == CSUM_BLOCK:
        # the usual 4K request: one hash, no lists
        if (xxhash.xxh3_64_intdigest(data) or 1) == int.from_bytes(entries[:8], "little"):
            return []
    parts = data if isinstance(data, list) else [memoryview(data).cast("B")]
    if any(len(part) % CSUM_BLOCK for part in parts):
        raise ValueError("checksummed data must be whole 4K blocks")
    count = sum(len(part) for part in parts) // CSUM_BLOCK
    if len(entries) != count * ENTRY_SIZE:
        raise ValueError("entry count does not match the block count")
    words = _words(entries)
    hashes = _hashes(parts[0]) if len(parts) == 1 else [h for p in parts for h in _hashes(p)]
    if array("Q", hashes) == words[0::2]:  # all good, the usual case: compared in C
        return []
    blocks = [part[i : i + CSUM_BLOCK] for part in parts for i in range(0, len(part), CSUM_BLOCK)]
    bad = []
    for index, (actual, expected) in enumerate(zip(hashes, words[0::2], strict=True)):
        if actual == expected:
            continue
        if expected == 0 and words[2 * index + 1] == 0:  # unwritten: must read as zeros
            if blocks[index] == _ZERO_BLOCK:
                continue
        bad.append(index)
    return bad


def block_runs(indexes: list[int]) -> list[tuple[int, int]]:
    """Sorted block indexes -> (first, count) runs of consecutive ones."""
    runs: list[tuple[int, int]] = []
    for index in indexes:
        if runs and runs[-1][0] + runs[-1][1] == index:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((index, 1))
    return runs


# ---- known answers --------------------------------------------------------------------------


class SelfTestFailed(BlockspaceError):
    """A checksum or erasure code gives a wrong known answer: refuse to serve rather than
    write or trust data with it."""


XXH3_64_OF_EMPTY = 0x2D06800538D394C2  # xxHash's published XXH3_64bits("") with seed 0
KAT_BLOCK = bytes((j * 7 + 3) % 256 for j in range(CSUM_BLOCK))
KAT_BLOCK_HASH = 0xD7428746842BE37E
ZERO_BLOCK_HASH = 0x93D76FE148C689BA
KAT_SEQ = 0x0102030405060708
# entries_for(KAT_BLOCK + zero block, KAT_SEQ): little-endian hash | seq per block.
KAT_ENTRIES = bytes.fromhex(
    "7ee32b84468742d70807060504030201" "ba89c648e16fd7930807060504030201"
)


# bad_blocks' signature: (data, entries) -> indices of the blocks that do not verify
Verifier = Callable[[bytes | bytearray | memoryview | list[memoryview], bytes | bytearray],
                    list[int]]


def self_test(verify: Verifier = bad_blocks) -> None:
    """Known-answer test of the block checksum as the hot path computes and compares it:
    xxh3_64 itself, the entry layout, `verify` (`bad_blocks`) and the unwritten rule.
    SelfTestFailed (one line) on any difference. A test hands in a broken `verify`: patching
    the module's `bad_blocks` cannot reach this call where the module is compiled (mypyc
    calls a module's own functions directly)."""

    def fail(what: str) -> None:
        raise SelfTestFailed(f"checksum self-test failed: {what} (a broken xxhash build?): "
                             "refusing to serve")

    if xxhash.xxh3_64_intdigest(b"") != XXH3_64_OF_EMPTY:
        fail("xxh3_64 of nothing is not the published value")
    if block_hash(KAT_BLOCK) != KAT_BLOCK_HASH or block_hash(_ZERO_BLOCK) != ZERO_BLOCK_HASH:
        fail("xxh3_64 of a known 4 KiB block is not its known value")
    data = KAT_BLOCK + _ZERO_BLOCK
    entries = entries_for(data, KAT_SEQ)
    if entries != KAT_ENTRIES:
        fail("checksum entries of known blocks differ from their known bytes")
    if verify(data, entries) or verify([memoryview(data)], entries):
        fail("known-good blocks do not verify")
    flipped = bytearray(data)
    flipped[CSUM_BLOCK + 100] ^= 1
    if verify(bytes(flipped), entries) != [1]:
        fail("a flipped bit is not detected")
    if not block_ok(_ZERO_BLOCK, UNWRITTEN) or block_ok(KAT_BLOCK, UNWRITTEN):
        fail("the unwritten entry does not mean zeros")
