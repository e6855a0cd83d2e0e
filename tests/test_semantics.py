"""Semantics pinned by independent constructions: each family built the way its paper or
library builds it, compared with ``materialize`` of the declared pattern."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import patterngen as pg
from patterngen import ir
from strategies import cases, patterns


def pairs_mask(grid, allowed):
    """Dense mask from a predicate on (query coords, key coords), one pair at a time."""
    coords = list(np.ndindex(*grid))
    return np.array([[bool(allowed(q, p)) for p in coords] for q in coords])


def natten_keys_1d(i, p, n, k, d):
    """NATTEN neighbourhood on one axis, written as NATTEN/attention-gym do: the window centre
    is clamped to stay k//2 (and k - 1 - k//2) from the edges of the query's dilation group."""
    if i % d != p % d:
        return False
    g = i % d
    m = len(range(g, n, d))
    j, jp = i // d, p // d
    left, right = k // 2, k - 1 - k // 2
    centre = min(max(j, left), m - 1 - right)
    return -left <= jp - centre <= right


@given(st.data())
def test_window_clamp_is_natten(data):
    ndim = data.draw(st.integers(1, 2))
    grid = tuple(data.draw(st.integers(1, 12)) for _ in range(ndim))
    dil = tuple(data.draw(st.integers(1, max(1, n // 2))) for n in grid)
    size = tuple(data.draw(st.integers(1, n // d)) for n, d in zip(grid, dil))
    expected = pairs_mask(grid, lambda q, p: all(
        natten_keys_1d(q[a], p[a], grid[a], size[a], dil[a]) for a in range(ndim)))
    got = pg.materialize(pg.window(size, dilation=dil), grid)
    assert np.array_equal(got, expected)
    # NATTEN's promise: exactly prod(size) keys for every query
    assert np.all(got.sum(1) == np.prod(size))


@given(st.integers(1, 20), st.integers(1, 20), st.integers(1, 4), st.booleans())
def test_window_pad_and_causal_rules(n, k, d, causal):
    d = min(d, n)
    k = min(k, n // d)
    left, right = k // 2, k - 1 - k // 2

    def allowed(q, p):
        off, rem = divmod(p[0] - q[0], d)
        if rem:
            return False
        return -(k - 1) <= off <= 0 if causal else -left <= off <= right

    pattern = pg.window(k, dilation=d, border="pad", causal=causal)
    assert np.array_equal(pg.materialize(pattern, n), pairs_mask((n,), allowed))


def swin_shifted_mask(h, w, m, s):
    """Swin SW-MSA: roll by -s, partition into m x m windows, mask pairs of different regions
    (the img_mask construction of the Swin reference code), mapped back to original order."""
    region = np.zeros((h, w), dtype=int)
    cnt = 0
    for hs in (slice(0, -m), slice(-m, -s), slice(-s, None)):
        for ws in (slice(0, -m), slice(-m, -s), slice(-s, None)):
            region[hs, ws] = cnt
            cnt += 1
    coords = list(np.ndindex(h, w))

    def shifted(c):  # position of original token c after torch.roll(x, (-s, -s))
        return ((c[0] - s) % h, (c[1] - s) % w)

    def key(c):
        r, cc = shifted(c)
        return (r // m, cc // m, region[r, cc])

    return np.array([[key(q) == key(p) for p in coords] for q in coords])


@pytest.mark.parametrize("h,w,m,s", [(8, 8, 4, 2), (12, 8, 4, 2), (14, 14, 7, 3), (9, 6, 3, 1)])
def test_block_offset_is_swin_shifted_windows(h, w, m, s):
    assert np.array_equal(pg.materialize(pg.block(m, offset=s), (h, w)),
                          swin_shifted_mask(h, w, m, s))


def test_block_is_swin_window_partition():
    h, w, m = 8, 12, 4
    expected = pairs_mask((h, w), lambda q, p: (q[0] // m, q[1] // m) == (p[0] // m, p[1] // m))
    assert np.array_equal(pg.materialize(pg.block(m), (h, w)), expected)


@pytest.mark.parametrize("grid,areas", [((8, 6), 4), ((8, 6), 2), ((9, 5), 3), ((16,), 4)])
def test_area_is_yolov12_reshape(grid, areas):
    """YOLOv12 A2: the row-major token list reshaped to (areas, N / areas)."""
    tokens = int(np.prod(grid))
    chunk = np.arange(tokens).reshape(areas, tokens // areas)
    area_of = np.empty(tokens, dtype=int)
    for a, ids in enumerate(chunk):
        area_of[ids] = a
    expected = area_of[:, None] == area_of[None, :]
    assert np.array_equal(pg.materialize(pg.area(areas), grid), expected)


def test_area_axis1_splits_columns():
    expected = pairs_mask((4, 6), lambda q, p: q[1] // 3 == p[1] // 3)
    assert np.array_equal(pg.materialize(pg.area(2, axis=1), (4, 6)), expected)


@pytest.mark.parametrize("grid", [(5, 7), (3, 4, 5)])
def test_axis_is_stripe_width_1_and_cswin_stripes(grid):
    for a in range(len(grid)):
        assert np.array_equal(pg.materialize(pg.axis(a), grid),
                              pg.materialize(pg.stripe(a, width=1), grid))
        same_line = pairs_mask(grid, lambda q, p, a=a: all(
            q[b] == p[b] for b in range(len(grid)) if b != a))
        assert np.array_equal(pg.materialize(pg.axis(a), grid), same_line)
    stripes = pairs_mask(grid, lambda q, p: all(
        q[b] // 2 == p[b] // 2 for b in range(1, len(grid))))
    assert np.array_equal(pg.materialize(pg.stripe(0, width=2), grid), stripes)


@pytest.mark.parametrize("grid", [(6, 9), (1, 5), (7, 1)])
def test_criss_cross_sees_h_plus_w_minus_1(grid):
    mask = pg.materialize(pg.criss_cross(), grid)
    h, w = grid
    assert np.all(mask.sum(1) == h + w - 1)
    assert pg.lower(pg.criss_cross(), grid).pairs() == (h + w - 1) * h * w


@pytest.mark.parametrize("grid", [(7,), (3, 4), (2, 3, 4)])
def test_causal_is_row_major_order(grid):
    tokens = int(np.prod(grid))
    assert np.array_equal(pg.materialize(pg.causal(), grid), np.tri(tokens, dtype=bool))
    # lexicographic causal lowers to disjoint terms, one per axis
    lowered = pg.lower(pg.causal(), grid)
    assert len(lowered.terms) == len(grid)
    assert all(s == 1 for s, _ in lowered.pieces())


@pytest.mark.parametrize("grid,tokens,coords", [
    ((10,), [0, 1, 2, 7], [(0,), (1,), (2,), (7,)]),
    ((4, 5), [0, 13], [(0, 0), (2, 3)]),
    ((4, 5), [(1, 1)], [(1, 1)]),
])
def test_global_tokens_see_and_are_seen(grid, tokens, coords):
    mask = pg.materialize(pg.window(1) | pg.global_tokens(tokens), grid)
    flat = [int(np.ravel_multi_index(c, grid)) for c in coords]
    expected = np.eye(mask.shape[0], dtype=bool)
    expected[flat, :] = True
    expected[:, flat] = True
    assert np.array_equal(mask, expected)


@given(st.data())
def test_union_and_intersection_are_boolean_algebra(data):
    a, grid = data.draw(cases(max_tokens=120))
    b = data.draw(patterns(grid))  # drawn for a's grid: every pair of draws is checked
    ma, mb = pg.materialize(a, grid), pg.materialize(b, grid)
    assert np.array_equal(pg.materialize(a | b, grid), ma | mb)
    assert np.array_equal(pg.materialize(a & b, grid), ma & mb)


@given(st.integers(1, 30), st.lists(st.tuples(
    st.sampled_from(["window", "block", "lt", "le", "key", "query"]),
    st.integers(1, 6), st.integers(1, 4), st.sampled_from(["clamp", "pad", "causal"])),
    min_size=1, max_size=3))
def test_relation_progressions_match_membership(n, specs):
    """Meets of atoms (dilations with different steps included) keep one exact progression."""
    atoms = []
    for kind, a, b, mode in specs:
        if kind == "window":
            d = min(b, n)
            atoms.append(ir.Window(max(1, min(a, n // d)), d, mode))
        elif kind == "block":
            atoms.append(ir.Block(a, b % a))
        elif kind == "lt":
            atoms.append(ir.Lt())
        elif kind == "le":
            atoms.append(ir.Le())
        elif kind == "key":
            atoms.append(ir.KeyIn(min(a, n) - 1, min(a + b, n)))
        else:
            atoms.append(ir.QueryIn(min(a, n) - 1, min(a + b, n)))
    rel = ir.Rel.of(*atoms)
    i = np.arange(n)
    member = np.ones((n, n), dtype=bool)
    for atom in atoms:
        member &= ir.Rel.of(atom).contains(i[:, None], i[None, :], n, ir.NUMPY_OPS)
    assert np.array_equal(rel.contains(i[:, None], i[None, :], n, ir.NUMPY_OPS), member)
    assert np.array_equal(rel.counts(n), member.sum(1))


def test_pattern_algebra_is_hashable_and_normalised():
    assert pg.window(7) == pg.window((7))
    assert hash(pg.window(7) | pg.axis(0)) == hash(pg.window(7) | pg.axis(0))
    # nested unions flatten; the IR drops duplicate terms
    assert repr((pg.axis(0) | pg.axis(1)) | pg.axis(0)) == "(axis(0) | axis(1) | axis(0))"
    assert len(pg.lower(pg.axis(0) | pg.axis(1) | pg.axis(0), (4, 4)).terms) == 2
    # criss-cross: the centre is in both terms, so Eq & Eq appears once with sign -1
    pieces = pg.lower(pg.criss_cross(), (4, 4)).pieces()
    assert [s for s, _ in pieces] == [1, -1, 1]
