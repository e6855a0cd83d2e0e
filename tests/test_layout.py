"""Block-sparse layouts against the block reduction of the dense oracle, both token orders."""

import importlib
from unittest import mock

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import patterngen as pg
from patterngen.layout import HeadsLayout, Layout, PatternLayouts, aligned_tiles, layout
from strategies import cases

# the module, not ``pg.layout`` (the package exports the function under the same name)
layout_module = importlib.import_module("patterngen.layout")


def block_reduce(mask: np.ndarray, bq: int, bk: int) -> np.ndarray:
    """0 empty / 1 partial / 2 full for every tile of a dense mask (ragged tiles: true area)."""
    n = mask.shape[0]
    rows = np.add.reduceat(mask.astype(np.int64), np.arange(0, n, bq), axis=0)
    counts = np.add.reduceat(rows, np.arange(0, n, bk), axis=1)
    hq = np.minimum(bq, n - np.arange(0, n, bq))
    hk = np.minimum(bk, n - np.arange(0, n, bk))
    area = hq[:, None] * hk[None, :]
    return np.where(counts == area, 2, np.where(counts > 0, 1, 0)).astype(np.int8)


def expected(pattern, grid, lay):
    """Dense oracle, permuted into the layout order, block-reduced per pattern."""
    dense = pg.materialize(pattern, grid)
    dense = dense if dense.ndim == 3 else dense[None]
    perm = lay.permutation
    bq, bk = lay.block
    return np.stack([block_reduce(m[np.ix_(perm, perm)], bq, bk) for m in dense]), dense


def check(pattern, grid, **kw):
    lay = layout(pattern, grid, **kw)
    want, dense = expected(pattern, grid, lay)
    got = lay.to_dense()
    got = got if got.ndim == 3 else got[None]
    np.testing.assert_array_equal(got, want)
    assert lay.attended_pairs == dense.sum()
    bq, bk = lay.block
    n = dense.shape[-1]
    hq = np.minimum(bq, n - np.arange(0, n, bq))
    hk = np.minimum(bk, n - np.arange(0, n, bk))
    assert lay.executed_pairs == int(((want > 0) * (hq[:, None] * hk[None, :])).sum())
    return lay


def dividing_tiles(shape):
    return st.tuples(*[st.sampled_from([t for t in range(1, n + 1) if n % t == 0])
                       for n in shape])


@given(case=cases(max_tokens=300), data=st.data())
def test_random_patterns_match_the_dense_block_reduction(case, data):
    pattern, grid = case
    block = (data.draw(st.integers(1, 40), label="bq"), data.draw(st.integers(1, 40), label="bk"))
    if data.draw(st.booleans(), label="tiled"):
        check(pattern, grid, block=block, order="tiled", tile=data.draw(dividing_tiles(grid)))
    else:
        check(pattern, grid, block=block)


@given(case=cases(max_tokens=300), block=st.integers(1, 40))
def test_long_axis_counting_paths_match_the_table(case, block):
    # axes longer than TABLE_MAX_AXIS are counted by binary search (monotone bounds) or query by
    # query (dilation, global queries); force those paths on small grids
    pattern, grid = case
    with mock.patch.object(layout_module, "TABLE_MAX_AXIS", 0):
        check(pattern, grid, block=(block, block + 3))


@pytest.mark.parametrize("pattern, grid, block, kw", [
    (pg.window(5), 97, (8, 5), {}),
    (pg.window(7), (45, 67), (16, 16), {}),
    (pg.window((7, 5), dilation=(2, 3), border="pad"), (45, 67), (32, 17), {}),
    (pg.window(4, causal=True, border="pad"), 97, (4, 4), {}),
    (pg.causal(), (5, 7, 9), (13, 11), {}),
    (pg.causal() & pg.window(5), (12, 20), (16, 16), dict(order="tiled", tile=(4, 5))),
    (pg.criss_cross() | pg.global_tokens([0, (3, 4)]), (9, 11), (10, 10), {}),
    (pg.block(7, offset=3), (56, 56), (49, 49), dict(order="tiled", tile=(7, 7))),
    (pg.window((3, 3, 3), dilation=(1, 2, 1)), (5, 6, 7), (13, 11), {}),
    (pg.window((3, 5, 5)), (4, 8, 12), (32, 32), dict(order="tiled", tile=(2, 4, 4))),
    (pg.heads(pg.window(3), pg.axis(1), pg.causal()), (7, 9), (8, 8), {}),
    (pg.global_tokens([3]) & pg.window(3), 20, (3, 7), {}),
    (pg.full(), 10, (3, 3), {}),
    (pg.area(4), (16, 8), (32, 32), {}),
    (pg.window(5, stride=3), 97, (8, 5), {}),
    (pg.window((6, 5), stride=(4, 2), dilation=(1, 2), causal=(True, False)), (23, 19),
     (16, 12), {}),
    (pg.window((3, 4), stride=(3, 4), border="pad") | pg.axis(0), (12, 16), (12, 12),
     dict(order="tiled", tile=(3, 4))),
], ids=lambda v: repr(v) if isinstance(v, pg.Pattern) else None)
def test_named_cases_match_the_dense_block_reduction(pattern, grid, block, kw):
    check(pattern, grid, block=block, **kw)


def test_swin_windows_in_a_tiled_order_are_all_full_and_block_diagonal():
    lay = layout(pg.block(7), (56, 56), block=(49, 49), order="tiled", tile=(7, 7))
    assert lay.num_partial == 0 and lay.num_full == 64 and lay.waste == 1.0
    assert all(list(f) == [i] for i, f in enumerate(lay.full))
    assert aligned_tiles(pg.lower(pg.block(7), (56, 56)).patterns, (56, 56)) == [(7, 7)]


def test_permutation_keeps_each_tile_contiguous():
    lay = layout(pg.window(3), (4, 6), block=6, order="tiled", tile=(2, 3))
    assert lay.permutation.tolist() == [0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11,
                                        12, 13, 14, 18, 19, 20, 15, 16, 17, 21, 22, 23]
    assert layout(pg.window(3), (4, 6)).permutation.tolist() == list(range(24))


def test_reconstruction_loop_of_the_docstring():
    lay = layout(pg.window(5) | pg.global_tokens([0]), (12, 10), block=(16, 8))
    dense = np.zeros((lay.q_blocks, lay.kv_blocks), dtype=np.int8)
    for i in range(lay.q_blocks):
        dense[i, lay.partial[i]] = 1
        dense[i, lay.full[i]] = 2
    np.testing.assert_array_equal(dense, lay.to_dense())


def test_masks_are_the_dense_tiles():
    pattern, grid = pg.window(5, dilation=2) | pg.causal(), (10, 11)
    lay = layout(pattern, grid, block=(16, 12), order="tiled", tile=(5, 11))
    dense = pg.materialize(pattern, grid)[np.ix_(lay.permutation, lay.permutation)]
    rows, cols, _ = lay.tiles()
    got = lay.masks(rows, cols)
    n = dense.shape[0]
    padded = np.zeros((lay.q_blocks * 16, lay.kv_blocks * 12), dtype=bool)
    padded[:n, :n] = dense
    for r, c, m in zip(rows, cols, got):
        np.testing.assert_array_equal(m, padded[r * 16:(r + 1) * 16, c * 12:(c + 1) * 12])


def test_ragged_tiles_count_as_partial_only_when_padded():
    lay = layout(pg.full(), 10, block=4)
    assert lay.num_full == 9 and lay.num_partial == 0
    rows, cols, is_full = lay.tiles(pad_ragged=True)
    assert is_full.sum() == 4 and (~is_full).sum() == 5


def test_auto_order_picks_the_fewest_executed_pairs():
    grid, block = (64, 128), (64, 64)
    auto = layout(pg.window(7), grid, block=block, order="auto")
    row = layout(pg.window(7), grid, block=block)
    tiled = layout(pg.window(7), grid, block=block, order="tiled", tile=(8, 8))
    assert auto.executed_pairs <= min(row.executed_pairs, tiled.executed_pairs)
    assert auto.order == "tiled"
    check(pg.window(7), grid, block=block, order="auto")


def test_pattern_layouts_add_up_over_patterns():
    lay = layout(pg.heads(pg.window(3), pg.axis(0)), (8, 8), block=16, order="tiled", tile=(4, 4))
    assert isinstance(lay, PatternLayouts) and len(lay.patterns) == 2
    first, second = (layout(p, (8, 8), block=16, order="tiled", tile=(4, 4))
                     for p in (pg.window(3), pg.axis(0)))
    assert [p.executed_pairs for p in lay.patterns] == [first.executed_pairs,
                                                        second.executed_pairs]
    assert lay.executed_pairs == first.executed_pairs + second.executed_pairs
    assert lay.attended_pairs == first.attended_pairs + second.attended_pairs
    assert (lay.to_dense() == np.stack([first.to_dense(), second.to_dense()])).all()
    assert (lay.block, lay.tile, lay.order, lay.q_blocks) == ((16, 16), (4, 4), "tiled", 4)
    assert (lay.permutation == first.permutation).all() and len(lay.full) == 2
    # the former names give the same objects
    assert HeadsLayout is PatternLayouts and lay.heads is lay.patterns
    with pytest.raises(AttributeError):
        lay.masks  # per pattern only: no hidden fallback to the first pattern


def test_a_single_layout_lists_itself_as_its_patterns():
    lay = layout(pg.window(3), (8, 8), block=16)
    assert lay.patterns == (lay,)


@pytest.mark.parametrize("patterns", [1, 2, 3, 5])
def test_heads_of_inverts_pattern_of_head(patterns):
    heads = 11
    for p in range(patterns):
        assert list(pg.ir.heads_of(p, patterns, heads)) == [
            h for h in range(heads) if pg.ir.pattern_of_head(h, patterns) == p]
    lowered = pg.lower(pg.heads(pg.window(3), pg.axis(0)), (4, 4))
    assert lowered.patterns == lowered.heads == lowered.per_head and len(lowered.patterns) == 2


def test_picture_and_summary():
    text = str(layout(pg.window(9), 16, block=4))
    assert text.splitlines()[0] == (
        "window(9) on 16, block=(4, 4), order=row-major: 4x4 blocks, 6 full, 6 partial "
        "(block density 75.00%); executed 192 pairs for 144 attended (waste 1.33x)")
    assert text.splitlines()[1:] == ["████░░  ", "░░██░░  ", "  ░░██░░", "  ░░████"]
    big = str(layout(pg.window(7), (64, 64), block=16))
    assert len(big.splitlines()) == 33 and all(len(r) <= 64 for r in big.splitlines()[1:])


def test_one_million_token_window_spot_checked_against_tile_masks():
    n = 1 << 20
    lay = layout(pg.window(4096), n, block=(128, 128))
    assert isinstance(lay, Layout)
    assert lay.attended_pairs == 4096 * n
    rng = np.random.default_rng(0)
    rows, cols, is_full = lay.tiles()
    pick = rng.choice(len(rows), 64, replace=False)
    masks = lay.masks(rows[pick], cols[pick])
    assert (masks.all((1, 2)) == is_full[pick]).all() and masks.any((1, 2)).all()
    # the tile just left of each sampled row's band is empty, and its mask is too
    lo = np.array([min(f.min(initial=n), p.min(initial=n))
                   for f, p in zip(lay.full, lay.partial)])
    r = rows[pick][lo[rows[pick]] > 0]
    assert len(r) and not lay.masks(r, lo[r] - 1).any()


@pytest.mark.parametrize("kw, match", [
    (dict(block=0), r"Invalid block=0; block sizes must be positive integers"),
    (dict(block=(128, -1)), r"Invalid block=\(128, -1\); block sizes must be positive"),
    (dict(block=(1.5, 2)), r"Invalid block=\(1.5, 2\)"),
    (dict(order="zigzag"), r"Unknown order='zigzag'; expected one of \('row-major', 'tiled'"),
    (dict(order="tiled", tile=(5, 5)),
     r"Invalid tile=\(5, 5\) for grid 56x56: tile\[0\]=5 does not divide grid\[0\]=56"),
    (dict(order="tiled", tile=(7, 7, 7)), r"Invalid tile=\(7, 7, 7\) for grid 56x56; expected 2"),
    (dict(order="tiled", tile=(0, 7)), r"Invalid tile=\(0, 7\)"),
])
def test_bad_arguments_name_value_rule_and_expectation(kw, match):
    with pytest.raises(pg.PatternError, match=match):
        layout(pg.window(7), (56, 56), **kw)


def test_symbolic_grid_is_refused():
    with pytest.raises(pg.PatternError, match=r"layout needs a numeric grid, got grid=H"):
        layout(pg.window(7), ("H", 8))


def test_layout_lists_exactly_the_non_empty_tiles_of_a_large_grid():
    # 256x256, too large for the dense oracle: with tile (8, 16) and blocks of 128 each block is
    # one tile, so the non-empty (query, key) blocks are a product of per-axis counts of the
    # key tiles that the clamped 7-window of a query tile's lines reaches
    n, k, tile = 256, 7, (8, 16)
    lay = layout(pg.window(k), (n, n), block=(128, 128), order="tiled", tile=tile)

    def touched(t):
        start = np.clip(np.arange(n) - k // 2, 0, n - k).reshape(n // t, t)
        return int(sum(hi // t - lo // t + 1
                       for lo, hi in zip(start.min(1), start.max(1) + k - 1)))

    assert lay.num_full + lay.num_partial == touched(tile[0]) * touched(tile[1])
    assert lay.executed_pairs == (lay.num_full + lay.num_partial) * 128 * 128
    assert lay.attended_pairs == pg.lower(pg.window(k), (n, n)).pairs()


@given(data=st.data())
def test_random_strided_windows_match_the_dense_block_reduction(data):
    grid = tuple(data.draw(st.integers(2, 14), label="n") for _ in range(2))
    size = tuple(data.draw(st.integers(1, n), label="k") for n in grid)
    stride = tuple(data.draw(st.integers(1, k), label="s") for k in size)
    pattern = pg.window(size, stride=stride, causal=data.draw(st.booleans(), label="causal"),
                        border=data.draw(st.sampled_from(["clamp", "pad"]), label="border"))
    block = (data.draw(st.integers(1, 20), label="bq"), data.draw(st.integers(1, 20), label="bk"))
    check(pattern, grid, block=block, order="tiled", tile=data.draw(dividing_tiles(grid)))
    with mock.patch.object(layout_module, "TABLE_MAX_AXIS", 0):  # the long-axis paths too
        check(pattern, grid, block=block)


@pytest.mark.parametrize("pattern, grid, block, tile", [
    (pg.window(8, stride=8), (64,), 8, None),                   # blocked attention, 1-D
    (pg.window((8, 8), stride=8), (32, 40), 8, (8, 8)),         # blocked, a block per tile row
    (pg.window((24, 24), stride=8), (64, 64), 64, (8, 8)),      # sliding tiles: 3x3 tiles each
    (pg.window((2, 24, 24), stride=(1, 8, 8)), (3, 32, 32), 64, None),
])
def test_stride_aligned_with_the_tile_gives_only_full_blocks(pattern, grid, block, tile):
    """NATTEN's stride makes a group's keys whole tiles: no partial block, no mask, no waste."""
    order = "row-major" if len(grid) == 1 else "tiled"
    lay = check(pattern, grid, block=block, order=order, tile=tile)
    assert lay.num_partial == 0 and lay.num_full > 0
    assert lay.executed_pairs == lay.attended_pairs
    rep = pg.cost(pattern, grid=grid, block=block)  # "auto" finds the order on its own
    assert rep.executed_pairs == rep.pairs and rep.waste == 1
    # the same window without stride needs partial blocks in every order
    plain = pg.window(pattern.size)
    assert pg.cost(plain, grid=grid, block=block).waste > 1


@given(st.sampled_from([1, 2, 3, 4]), st.integers(0, 2), st.integers(0, 3), st.booleans())
def test_sliding_tiles_of_odd_multiples_of_the_stride_are_all_full(s, r, extra, two_d):
    """k = (2r + 1) * s on an axis of whole groups: the leader sits r*s + s//2 into its window,
    so every group's keys are 2r + 1 whole tiles (sliding-tile attention)."""
    k = (2 * r + 1) * s
    n = k + extra * s
    grid, size = ((n, n), (k, k)) if two_d else ((n,), (k,))
    tile = (s,) * len(grid)
    order = dict(order="tiled", tile=tile) if two_d else {}
    lay = check(pg.window(size, stride=s), grid, block=s ** len(grid), **order)
    assert lay.num_partial == 0

