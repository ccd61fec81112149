"""The judgment of a parity row (volume/row_judge.py), pure: which fragment is behind."""

import random

from blockspace.geometry.erasure import ErasureCodec
from blockspace.ondisk.checksums import UNWRITTEN, entries_for
from blockspace.volume.row_judge import judge_row, needs_judging

UNIT = 8192


def row(codec: ErasureCodec, data: list[bytes], seq: int) -> dict[int, tuple[bytes, bytes]]:
    fragments = data + codec.encode(data)
    return {i: (f, entries_for(f, seq)) for i, f in enumerate(fragments)}


def zeroed() -> tuple[bytes, bytes]:
    return bytes(UNIT), UNWRITTEN * (UNIT // 4096)


def test_a_zeroed_data_column_is_located_with_single_parity() -> None:
    codec = ErasureCodec(2, 1)
    raw = row(codec, [random.randbytes(UNIT), random.randbytes(UNIT)], seq=5)
    raw[1] = zeroed()
    verdict = judge_row(codec, raw, 3)
    assert verdict.ok
    assert verdict.bad == {1: "unwritten"}
    assert verdict.seqs == [5, 5]


def test_a_zeroed_parity_fragment_is_located_and_a_truly_unwritten_row_is_fine() -> None:
    codec = ErasureCodec(2, 1)
    raw = row(codec, [random.randbytes(UNIT), random.randbytes(UNIT)], seq=5)
    raw[2] = zeroed()
    assert judge_row(codec, raw, 3).bad == {2: "unwritten"}
    empty = {i: zeroed() for i in range(3)}
    verdict = judge_row(codec, empty, 3)
    assert verdict.ok
    assert verdict.bad == {}
    assert verdict.unwritten == [True, True]


def test_a_stale_column_is_located_by_its_write_number() -> None:
    codec = ErasureCodec(2, 2)
    old = [random.randbytes(UNIT), random.randbytes(UNIT)]
    new = [random.randbytes(UNIT), old[1]]
    raw = row(codec, new, seq=9)
    raw[1] = (old[1], entries_for(old[1], 3))  # column 1 legitimately older (not rewritten)
    raw[0] = (old[0], entries_for(old[0], 3))  # column 0 lost write 9
    verdict = judge_row(codec, raw, 4)
    assert verdict.ok
    assert verdict.bad == {0: "stale"}


def test_single_parity_reports_rather_than_guesses_between_two_older_columns() -> None:
    codec = ErasureCodec(2, 1)
    old = [random.randbytes(UNIT), random.randbytes(UNIT)]
    raw = row(codec, [random.randbytes(UNIT), old[1]], seq=9)
    raw[0] = (old[0], entries_for(old[0], 3))
    raw[1] = (old[1], entries_for(old[1], 3))
    verdict = judge_row(codec, raw, 3)
    assert not verdict.ok
    assert "could be the stale" in verdict.problem


def test_needs_judging_is_false_for_the_usual_read() -> None:
    codec = ErasureCodec(2, 1)
    raw = row(codec, [random.randbytes(UNIT), random.randbytes(UNIT)], seq=5)
    entries = {i: e for i, (_, e) in raw.items()}
    assert not needs_judging(0, 2, entries)
    entries[0] = UNWRITTEN * 2
    assert needs_judging(0, 2, entries)
    entries[0] = entries_for(raw[0][0], 4)
    assert needs_judging(0, 2, entries)  # parity carries write 5, column 0 only 4


def test_a_row_it_cannot_settle_serves_only_what_nothing_contradicts() -> None:
    codec = ErasureCodec(2, 1)
    data = [random.randbytes(UNIT), random.randbytes(UNIT)]
    raw = row(codec, data, seq=5)
    parity = raw[2][0]
    raw[0] = (data[0], entries_for(data[0], 9))  # a newer write of column 0 ...
    raw[2] = (parity, entries_for(parity, 5))  # ... that its parity missed (torn)
    del raw[1]  # and column 1's disk is out: no spare fragment
    verdict = judge_row(codec, raw, 3)
    assert not verdict.ok
    assert verdict.as_it_is(0)  # verifies, claims nothing against its row
    assert not verdict.as_it_is(2)  # parity behind the row: never a source of anything
    assert not verdict.as_it_is(1)  # out: would be rebuilt from the parity in doubt
    raw[1] = (bytes(UNIT), UNWRITTEN * (UNIT // 4096))  # back, saying "never written"
    assert not judge_row(codec, raw, 3).as_it_is(1)
    assert not judge_row(codec, raw, 3).as_it_is(0)  # a spare: the row can tell, so it must
