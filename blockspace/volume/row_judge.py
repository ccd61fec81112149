"""Which fragments of a parity row to believe. Pure: no I/O.

A fragment that fails its checksum is plainly bad. Two kinds of damage pass that test:

- a fragment whose blocks read as zeros with all-zero ("never written") entries: a hole
  punched into an image, a thin store or a disk returning zeros for what it lost. Every
  write of a row's block writes its parity, and (since the first write of a row's block
  stamps every data column's entry there, parity.py `_row_writes`) every data column's
  entry too, so "never written" next to a written block of the same row is a claim the
  row contradicts: DESIGN.md invariant 8.
- a fragment that kept an older write: the disk dropped one (a lost write). Its entry
  still verifies, but its write sequence number is older than the row's newest, which
  every parity fragment carries (parity is written with every write of its row).

Which fragment is wrong is found in that order of suspicion (a parity fragment behind the
row; a data fragment claiming "never written"; a data fragment with an older write), and
proved where the row has redundancy to spare: the row without the suspect must agree with
its own parity. Where it has none to spare (m = 1, or disks out), the suspicion order alone
decides, and only when exactly one fragment is the first suspect; otherwise the row is
reported, never guessed.

A torn write leaves the same marks as damage, and is not damage. A power cut can land a
row's new data and not its parity, parity and not the data, a block without its entry, or
a first write without the stamps of the columns it did not touch (which then still say
"never written"). What tells the two apart is the write-intent log: a torn write lies in a
region it left dirty, damage anywhere. So:

- In a dirty region, with every fragment present, the region resync (parity.py
  `make_consistent`) settles each row: what this judgment locates is rebuilt; what it cannot
  settle is taken as a torn write (`torn_contents`: every data fragment that verifies holds
  a legal old or new version, "never written" included); and every fragment of the row is
  rewritten with one write number, so that no mark of the tear survives into normal
  service, where it would be taken for damage (`row_looks_behind`).
- Everywhere else, a mark is damage: with a spare fragment it is located and repaired; with
  none (k fragments verify: the row cannot be checked) a read is refused (EIO) rather than
  served zeros or garbage, but only for what would rest on a fragment in doubt. A fragment
  that verifies and claims nothing against its row is served as it is (`Verdict.as_it_is`):
  with no spare, nothing could contradict it, so refusing it would fail a read that one
  consistent interpretation of the row serves, an acknowledged one after a crash that met a
  disk out (the tear's parity in doubt, the untouched columns sound). What is refused there
  is the rebuild of a missing column from parity that may have missed a write: the write
  hole, reported instead of served.
"""

import itertools
import operator
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from blockspace.geometry.erasure import ErasureCodec
from blockspace.ondisk.checksums import (
    CSUM_BLOCK,
    ENTRY_SIZE,
    any_unwritten,
    bad_blocks,
    entry_seqs,
    unwritten_flags,
)

PARITY_BEHIND = 0  # a parity fragment unwritten or older than the row: always stale
UNWRITTEN_DATA = 1  # a data fragment saying "never written" where the row holds a write
OLDER_DATA = 2  # a data fragment with an older write than the row's newest

Raw = Mapping[int, tuple[bytes, bytes]]  # fragment index -> (data, entries) as read


@dataclass
class Verdict:
    """What a row's fragments (one block range) are worth."""

    trusted: dict[int, bytes]  # fragments believed (at least k when `ok`)
    bad: dict[int, str] = field(default_factory=dict)  # index -> corrupt, unwritten, stale
    seqs: list[int] = field(default_factory=list)  # per block: the row's newest write
    unwritten: list[bool] = field(default_factory=list)  # per block: nothing written there
    problem: str = ""  # why the row cannot be served or repaired ("" if it can)
    claims: bool = False  # the problem rests on an unverified "never written" or stale parity
    checked: bool = False  # the trusted fragments were proved to agree with their parity
    spare: bool = False  # more fragments verify than the k needed: the row can be checked
    ranks: dict[int, int] = field(default_factory=dict)  # suspect index -> how (PARITY_BEHIND..)

    @property
    def ok(self) -> bool:
        return not self.problem

    def as_it_is(self, index: int) -> bool:
        """May fragment `index` be served as it is from a row the judgment could not settle?
        Only where nothing can contradict it: the row has no spare fragment to check it
        by, it verifies, and it is not itself behind its row by its own entries (a parity
        fragment older than the row, a data fragment saying "never written" where the row
        holds a write). A data fragment older than parity is no such claim (the row's
        newest write may have been another column's): what a claim about another fragment
        puts in doubt is what would be rebuilt from that fragment, not this one."""
        return (not self.spare and index in self.trusted
                and self.ranks.get(index) not in (PARITY_BEHIND, UNWRITTEN_DATA))

    def located(self) -> dict[int, str]:
        """The fragments found bad although their checksums verify."""
        return {index: why for index, why in self.bad.items() if why != "corrupt"}


def consistent(codec: ErasureCodec, fragments: Mapping[int, bytes]) -> bool:
    """Do these fragments (more than k of them) agree with each other?"""
    if len(fragments) <= codec.k:
        return True
    chosen = dict(sorted(fragments.items())[: codec.k])
    others = [index for index in fragments if index not in chosen]
    rebuilt = codec.reconstruct(chosen, others)
    return all(rebuilt[index] == bytes(fragments[index]) for index in others)


def _suspicion(k: int, seqs: dict[int, list[int]], unwritten: dict[int, list[bool]]
               ) -> dict[int, int]:
    """Fragment index -> how suspect it is (lower: more), for the fragments behind the row
    somewhere."""
    blocks = len(next(iter(seqs.values()))) if seqs else 0
    written = [any(not flags[b] for flags in unwritten.values()) for b in range(blocks)]
    newest = [max(s[b] for s in seqs.values()) for b in range(blocks)]
    rank = {}
    for index in seqs:
        mine, empty = seqs[index], unwritten[index]
        claims_empty = any(written[b] and empty[b] for b in range(blocks))
        if index >= k:
            if claims_empty or any(mine[b] < newest[b] for b in range(blocks)):
                rank[index] = PARITY_BEHIND
        elif claims_empty:
            rank[index] = UNWRITTEN_DATA
        elif any(mine[b] < newest[b] for b in range(blocks)):
            rank[index] = OLDER_DATA
    return rank


def _reason(index: int, rank: int, unwritten: dict[int, list[bool]]) -> str:
    if rank == UNWRITTEN_DATA or (rank == PARITY_BEHIND and any(unwritten[index])):
        return "unwritten"
    return "stale"


def judge_row(codec: ErasureCodec, raw: Raw, width: int) -> Verdict:
    """Decide which of a row's fragments (`raw`, each the same block range; fragments not
    in it are out or unreadable) to believe, and which to rebuild."""
    k = codec.k
    corrupt = [index for index in sorted(raw) if bad_blocks(*raw[index])]
    verified = {index: raw[index] for index in sorted(raw) if index not in corrupt}
    data = {index: bytes(d) for index, (d, _) in verified.items()}
    verdict = Verdict(trusted=data, bad={index: "corrupt" for index in corrupt})
    seqs = {index: entry_seqs(e) for index, (_, e) in verified.items()}
    unwritten = {index: unwritten_flags(e) for index, (_, e) in verified.items()}
    rank = _suspicion(k, seqs, unwritten)
    verdict.ranks = dict(rank)
    verdict.spare = len(data) > k
    if len(data) < k:
        verdict.problem = f"only {len(data)} of the {k} fragments needed verify"
    elif len(data) > k and consistent(codec, data):
        verdict.checked = True  # whatever the entries suggest, the row adds up
    elif len(data) == k:
        if any(r in (PARITY_BEHIND, UNWRITTEN_DATA) for r in rank.values()):
            verdict.problem = ("a fragment claims never written (or parity is behind) and "
                               "no spare fragment can confirm it")
            verdict.claims = True
    else:
        _locate(codec, verdict, rank, width, unwritten)
    _row_seqs(verdict, seqs, unwritten)
    return verdict


def _locate(codec: ErasureCodec, verdict: Verdict, rank: dict[int, int], width: int,
            unwritten: dict[int, list[bool]]) -> None:
    """The row does not add up: find the fragments behind it, fewest first."""
    data = verdict.trusted
    budget = codec.m - (width - len(data))
    suspects = sorted(rank, key=lambda index: (rank[index], index))
    verdict.claims = any(r in (PARITY_BEHIND, UNWRITTEN_DATA) for r in rank.values())
    for size in range(1, budget + 1):
        strong: list[tuple[int, ...]] = []
        weak: list[tuple[int, ...]] = []
        for combo in itertools.combinations(suspects, size):
            rest = {index: data[index] for index in data if index not in combo}
            if len(rest) > codec.k:
                if consistent(codec, rest):
                    strong.append(combo)
            elif len(rest) == codec.k:
                weak.append(combo)
        if strong:
            if len(strong) > 1:
                verdict.problem = f"fragments {strong[0]} or {strong[1]} could be the stale ones"
                return
            _accept(verdict, strong[0], rank, unwritten)
            verdict.checked = True
            return
        if weak:
            order = sorted(weak, key=lambda c: sorted(rank[i] for i in c))
            first = sorted(rank[i] for i in order[0])
            if len(order) > 1 and sorted(rank[i] for i in order[1]) == first:
                verdict.problem = (f"fragments {order[0]} or {order[1]} could be the stale "
                                   "ones (no spare fragment to tell)")
                return
            _accept(verdict, order[0], rank, unwritten)
            return
    verdict.problem = ("the row does not agree with its parity and no fragment is behind "
                       "it" if not suspects else "more fragments behind the row than its "
                       "parity can cover")


def _accept(verdict: Verdict, culprits: tuple[int, ...], rank: dict[int, int],
            unwritten: dict[int, list[bool]]) -> None:
    for index in culprits:
        verdict.bad[index] = _reason(index, rank[index], unwritten)
        del verdict.trusted[index]


def _row_seqs(verdict: Verdict, seqs: dict[int, list[int]], unwritten: dict[int, list[bool]]
              ) -> None:
    """Per block, the newest write among the trusted fragments, and whether any holds one:
    what a rebuilt fragment's entries carry."""
    trusted = [index for index in verdict.trusted if index in seqs]
    blocks = len(seqs[trusted[0]]) if trusted else 0
    verdict.seqs = [max(seqs[index][b] for index in trusted) for b in range(blocks)]
    verdict.unwritten = [all(unwritten[index][b] for index in trusted) for b in range(blocks)]


def needs_judging(index: int, k: int, entries: Mapping[int, bytes]) -> bool:
    """Cheap, from checksum entries only: is fragment `index` (verified) possibly behind
    its row? `entries`: fragment index -> entries of the same blocks, of `index` and of
    the row's other fragments at hand. True when it says "never written" where another
    fragment holds a write, or when a parity fragment carries a newer write than it: the
    write it lost, or one of another data column (which the entries alone cannot tell
    apart; the row's judgment can, and the read that asked stamps the column with the
    row's write number once it is proved current, so the next read of it is cheap)."""
    mine = entries[index]
    if any_unwritten(mine):
        flags = unwritten_flags(mine)
        for other, theirs in entries.items():
            if other != index and any(
                    f and not t for f, t in zip(flags, unwritten_flags(theirs), strict=True)):
                return True
    if index >= k:
        return False
    if len(mine) == ENTRY_SIZE:  # the usual 4 KiB read: one word each, no lists
        own = int.from_bytes(mine[8:16], "little")
        return any(int.from_bytes(e[8:16], "little") > own
                   for i, e in entries.items() if i >= k)
    my_seqs = entry_seqs(mine)
    return any(any(map(operator.gt, entry_seqs(e), my_seqs))
               for i, e in entries.items() if i >= k)


def row_looks_behind(k: int, raw: Raw) -> bool:
    """Does some fragment of a row (all verifying) look behind it: a parity fragment
    older than the row, or a data fragment saying "never written" where the row holds a
    write? (A data fragment older than parity is not: the row's newest write touched
    other columns.) What a read with a fragment out must refuse, so a resync must not
    leave it."""
    seqs = {index: entry_seqs(e) for index, (_, e) in raw.items()}
    unwritten = {index: unwritten_flags(e) for index, (_, e) in raw.items()}
    ranks = _suspicion(k, seqs, unwritten).values()
    return any(r in (PARITY_BEHIND, UNWRITTEN_DATA) for r in ranks)


def one_write(raw: Raw, indexes: Iterable[int]) -> bool:
    """Do fragments `indexes` carry the same write number in every block? Then one write
    (or a repair that stamped them) left them all, and parity holds what it assumed of
    the others: a rebuild from them gives a version some write put there. Otherwise, in a
    dirty region, parity may assume a newer version of a data column than the one that
    landed, and a rebuild from the two gives bytes no write ever held."""
    columns = [entry_seqs(raw[index][1]) for index in indexes]
    return all(len(set(block)) == 1 for block in zip(*columns, strict=True))


def torn_contents(codec: ErasureCodec, raw: Raw) -> dict[int, bytes]:
    """A dirty row the judgment cannot settle, every fragment present: a torn write, whose
    data fragments are each a legal version of their blocks. They are taken as they are,
    but for blocks failing their checksum: those are rebuilt from the other fragments where
    the rebuilt block verifies against the entry (the write's data, whose entry landed),
    else kept as they are (the data landed, its entry did not). Parity is recomputed from
    the result. Index -> contents, every fragment."""
    k = codec.k
    data = {index: bytearray(raw[index][0]) for index in range(k)}
    sound = {index: bytes(d) for index, (d, e) in raw.items() if not bad_blocks(d, e)}
    for index in range(k):
        failing = bad_blocks(*raw[index])
        others = {i: d for i, d in sound.items() if i != index}
        if not failing or len(others) < k:
            continue
        rebuilt = codec.reconstruct(dict(sorted(others.items())[:k]), [index])[index]
        entries = raw[index][1]
        still = set(bad_blocks(rebuilt, entries))
        for block in failing:
            if block not in still:
                lo, hi = block * CSUM_BLOCK, (block + 1) * CSUM_BLOCK
                data[index][lo:hi] = rebuilt[lo:hi]
    columns = [bytes(data[index]) for index in range(k)]
    full = dict(enumerate(columns))
    full.update(enumerate(codec.encode(columns), start=k))
    return full
