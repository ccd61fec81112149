"""How a request is cut into column pieces (`split`) and laid back into its buffer
(`segments`), against a byte-by-byte model of the layout."""

from hypothesis import given
from hypothesis import strategies as st

from blockspace.geometry.layouts import LayoutSpec, coalesce, segments, split

SPECS = [
    LayoutSpec("simple", 1, interleave=4096),
    LayoutSpec("simple", 4, interleave=8192),
    LayoutSpec("mirror", 1, copies=2, interleave=4096),
    LayoutSpec("mirror", 2, copies=2, interleave=4096),
    LayoutSpec("parity", 3, parity=1, interleave=4096),
]


def where(spec: LayoutSpec, position: int) -> tuple[int, int]:
    """(data column, offset in that column's extent) of slab byte `position`."""
    row, within = divmod(position, spec.interleave * spec.columns)
    column, unit_offset = divmod(within, spec.interleave)
    return column, row * spec.interleave + unit_offset


@given(spec=st.sampled_from(SPECS), offset=st.integers(0, 200_000),
       length=st.integers(1, 120_000))
def test_every_request_byte_lands_once_where_the_layout_puts_it(
    spec: LayoutSpec, offset: int, length: int
) -> None:
    seen = [0] * length
    for piece in split(spec, offset, length):
        for buf, at, count in segments(spec, piece):
            assert count > 0
            for i in range(0, count, 97):  # a sample of each segment's bytes, both ends too
                for j in (i, count - 1):
                    assert where(spec, offset + buf + j) == (piece.column,
                                                              piece.column_offset + at + j)
            for j in range(count):
                seen[buf + j] += 1
        assert sum(n for _, _, n in segments(spec, piece)) == piece.length
    assert seen == [1] * length


@given(spec=st.sampled_from(SPECS), offset=st.integers(0, 200_000),
       length=st.integers(1, 120_000))
def test_striped_layouts_make_one_piece_per_column_and_parity_one_per_row_and_column(
    spec: LayoutSpec, offset: int, length: int
) -> None:
    pieces = split(spec, offset, length)
    assert [p.buf_offset for p in pieces] == sorted({p.buf_offset for p in pieces})
    assert pieces[0].buf_offset == 0
    if spec.kind == "parity":
        assert all(piece.rows == 1 for piece in pieces)
        assert len({(p.row, p.column) for p in pieces}) == len(pieces)
    else:
        assert len({piece.column for piece in pieces}) == len(pieces)
        assert len(pieces) <= spec.columns


def test_a_large_simple_request_is_one_piece_per_column() -> None:
    spec = LayoutSpec("simple", 4, interleave=65536)
    pieces = split(spec, 0, 1 << 20)  # four rows
    assert [(p.column, p.column_offset, p.length, p.rows) for p in pieces] == [
        (column, 0, 256 << 10, 4) for column in range(4)
    ]
    assert segments(spec, pieces[1])[:2] == [(65536, 0, 65536), (65536 * 5, 65536, 65536)]


def test_coalesce_joins_writes_that_follow_each_other_in_one_extent_only() -> None:
    writes = [
        (2, 8192, b"c" * 4096),
        (0, 0, b"a" * 4096),
        (2, 4096, b"b" * 4096),
        (0, 8192, b"x" * 4096),  # a gap after the first write to position 0
        (1, 4096, b"y" * 4096),
        (2, 12288, memoryview(b"d" * 4096)),
    ]
    assert coalesce(writes) == [
        (0, 0, b"a" * 4096),
        (0, 8192, b"x" * 4096),
        (1, 4096, b"y" * 4096),
        (2, 4096, b"b" * 4096 + b"c" * 4096 + b"d" * 4096),
    ]
