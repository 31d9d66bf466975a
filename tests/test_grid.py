"""Grid-mode planning without MPI: grid choice, shares -> counts, block ranges, flat layouts."""

import itertools

import numpy as np
import pytest

from cmatrix.core.gridplan import (
    ALIGN,
    Grid,
    assemble,
    choose_grid,
    elementwise_segment,
    grid_shares,
    is_active,
    layout,
    matmul_blocks,
    matmul_segment,
    pack,
    split_2d,
    stored,
    views,
)
from cmatrix.errors import InputError


@pytest.mark.parametrize("size, expected", [
    (1, (1, 1)), (2, (1, 2)), (3, (1, 3)), (4, (2, 2)), (5, (1, 5)), (6, (2, 3)),
    (8, (2, 4)), (9, (3, 3)), (12, (3, 4)), (16, (4, 4)), (18, (3, 6)),
])
def test_default_grid_is_the_most_square_with_p_at_most_q(size, expected):
    g = choose_grid(size)
    assert (g.p, g.q) == expected
    assert g.size == size


@pytest.mark.parametrize("size, grid", [(4, (2, 2)), (4, (1, 4)), (4, (4, 1)), (6, (3, 2)), (1, (1, 1))])
def test_explicit_grid_is_taken(size, grid):
    g = choose_grid(size, grid)
    assert (g.p, g.q) == grid
    assert [g.coords(r) for r in range(size)] == [divmod(r, grid[1]) for r in range(size)]
    assert [g.rank(*g.coords(r)) for r in range(size)] == list(range(size))


@pytest.mark.parametrize("size, grid, match", [
    (4, (3, 2), r"3 x 2 = 6 but the cluster has 4 ranks"),
    (4, (1, 3), r"1 x 3 = 3 but the cluster has 4 ranks"),
    (4, (0, 4), "positive integers"),
    (4, (2.0, 2), "positive integers"),
    (4, (True, 4), "positive integers"),
    (4, 4, r"expected \(p, q\)"),
    (4, (1, 2, 2), r"expected \(p, q\)"),
])
def test_bad_grids_are_refused(size, grid, match):
    with pytest.raises(InputError, match=match) as info:
        choose_grid(size, grid)
    assert "grid" in str(info.value)


def test_grid_shares_sum_rows_and_columns():
    rows, cols = grid_shares([0.1, 0.2, 0.3, 0.4], Grid(2, 2))
    np.testing.assert_allclose(rows, [0.3, 0.7])
    np.testing.assert_allclose(cols, [0.4, 0.6])
    rows, cols = grid_shares([0.1, 0.2, 0.3, 0.4], Grid(1, 4))
    np.testing.assert_allclose(rows, [1.0])
    np.testing.assert_allclose(cols, [0.1, 0.2, 0.3, 0.4])


@pytest.mark.parametrize("weights, match", [
    ([0.5, 0.5], "one share per rank"),
    ([0.5, 0.5, 0.5, -0.5], ">= 0"),
    ([0.3, 0.3, 0.3, 0.3], "sum to 1"),
    ([float("nan"), 0.5, 0.25, 0.25], "finite"),
])
def test_bad_weights_are_refused(weights, match):
    with pytest.raises(InputError, match=match):
        split_2d(8, 8, weights, Grid(2, 2))


def test_product_form_shares_are_matched_exactly():
    r, c = np.array([0.25, 0.75]), np.array([0.5, 0.5])
    weights = np.outer(r, c).ravel()
    split = split_2d(40, 60, weights, Grid(2, 2))
    assert split.row_counts == (10, 30) and split.col_counts == (30, 30)
    for rank, w in enumerate(weights):
        rows, cols = split.block_shape(rank)
        assert rows * cols == w * 40 * 60


def test_uneven_and_zero_shares():
    # Rank 3 has share 0 but its grid row and column do not: it still gets a block
    # (shares that are not of product form are approximated).
    split = split_2d(10, 7, [0.5, 0.3, 0.2, 0.0], Grid(2, 2))
    assert split.row_counts == (8, 2) and split.col_counts == (5, 2)
    # A whole grid row with share 0 gets no rows; its ranks are inactive.
    split = split_2d(10, 7, [0.0, 0.0, 0.6, 0.4], Grid(2, 2))
    assert split.row_counts == (0, 10) and split.col_counts == (4, 3)
    assert [is_active(split, r) for r in range(4)] == [False, False, True, True]
    # A whole grid column with share 0 gets no columns.
    split = split_2d(5, 9, [0.0, 0.25, 0.0, 0.75], Grid(2, 2))
    assert split.row_counts == (1, 4) and split.col_counts == (0, 9)
    assert [is_active(split, r) for r in range(4)] == [False, True, False, True]
    # More ranks than rows: some grid columns get nothing.
    split = split_2d(1, 2, [0.25] * 4, Grid(1, 4))
    assert split.row_counts == (1,) and split.col_counts == (1, 1, 0, 0)


@pytest.mark.parametrize("rows, cols", [(1, 1), (1, 13), (7, 1), (31, 29), (64, 96)])
@pytest.mark.parametrize("weights, grid", [
    ([1.0], (1, 1)), ([0.7, 0.3], (1, 2)), ([0.7, 0.3], (2, 1)), ([0.0, 0.25, 0.75], (1, 3)),
    ([0.4, 0.3, 0.2, 0.1], (2, 2)), ([0.5, 0.3, 0.2, 0.0], (1, 4)), ([0.1] * 6 + [0.4, 0.0], (2, 4)),
])
def test_blocks_cover_the_matrix_exactly_once(rows, cols, weights, grid):
    split = split_2d(rows, cols, weights, Grid(*grid))
    assert split.shape == (rows, cols)
    cover = np.zeros((rows, cols), dtype=np.int64)
    for rank in range(len(weights)):
        r, c = split.block(rank)
        cover[r, c] += 1
        assert (r.stop - r.start, c.stop - c.start) == split.block_shape(rank)
    assert np.all(cover == 1)


@pytest.mark.parametrize("inner", [False, True])
@pytest.mark.parametrize("ta, tb", list(itertools.product((False, True), repeat=2)))
def test_matmul_blocks_multiply_to_the_product(inner, ta, tb):
    """Summing the block products the way the ranks do gives op(a) @ op(b)."""
    m, k, n = 7, 5, 6
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((k, m) if ta else (m, k)), rng.standard_normal((n, k) if tb else (k, n))
    op_a, op_b = (a.T if ta else a), (b.T if tb else b)
    g = Grid(2, 2)
    weights = [0.4, 0.3, 0.3, 0.0]
    split = split_2d(m, k if inner else n, weights, g)
    c = np.zeros((m, n))
    for rank in range(g.size):
        blocks = matmul_segment(split, inner, (m, k, n), (ta, tb), ("float32", "float16"), rank)
        if not blocks:
            continue
        (ra, ca), (rb, cb) = matmul_blocks(split, inner, m, k, n, rank)
        xa, xb = a[stored(ra, ca, ta)], b[stored(rb, cb, tb)]
        assert [blk[1] for blk in blocks] == [xa.shape, xb.shape]
        assert [blk[0] for blk in blocks] == ["float32", "float16"]
        y = (xa.T if ta else xa) @ (xb.T if tb else xb)
        if inner:
            c[ra] += y
        else:
            c[ra, cb] += y
    np.testing.assert_allclose(c, op_a @ op_b, atol=1e-12)


def test_layout_aligns_every_block():
    blocks = [("float16", (3, 1)), ("float32", (2, 2)), ("bfloat16", (1, 1))]
    offsets, total = layout(blocks)
    assert offsets == [0, 8, 24] and total == 32
    assert all(o % ALIGN == 0 for o in offsets)
    assert layout([]) == ([], 0)
    assert layout([("float32", (0, 5))]) == ([0], 0)


def test_pack_and_views_round_trip_and_assemble():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((9, 7)).astype(np.float32)
    y = rng.standard_normal((9, 7)).astype(np.float16)
    g = Grid(2, 2)
    split = split_2d(9, 7, [0.1, 0.2, 0.3, 0.4], g)
    segments = [elementwise_segment(split, ("float32", "float16"), r) for r in range(4)]

    def fill(rank, blocks):
        rows, cols = split.block(rank)
        blocks[0][...] = x[rows, cols]
        blocks[1][...] = y[rows, cols]

    buf, sizes = pack(segments, fill)
    assert buf.dtype == np.uint8 and len(buf) == sum(sizes)
    start, flat = 0, []
    for rank, size in enumerate(sizes):
        xa, ya = views(buf[start : start + size], segments[rank])
        rows, cols = split.block(rank)
        assert xa.dtype == np.float32 and ya.dtype == np.float16
        np.testing.assert_array_equal(xa, x[rows, cols])
        np.testing.assert_array_equal(ya, y[rows, cols])
        flat.append(xa.reshape(-1))
        start += size
    np.testing.assert_array_equal(assemble(np.concatenate(flat), split, "float32"), x)
