"""Symbolic cost against brute-force enumeration, and the published formulas.

Every count is lowered on a *symbolic* grid, then substituted, and compared exactly with
``materialize(...).sum()`` on the numeric grid (the xformers flop-formula test, made exact).
"""

import functools

import numpy as np
import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from strategies import cases, grids, primitives

AXES = ("a0", "a1", "a2")


def check_against_enumeration(pattern, grid, head_dim=3, heads=2, batch=2):
    names = AXES[: len(grid)]
    symbolic = pg.cost(pattern, grid=names, head_dim="d", heads="h", batch="b")
    mask = pg.materialize(pattern, grid)
    try:
        rep = symbolic.subs(dict(zip(names, grid)), d=head_dim, h=heads, b=batch)
    except pg.PatternError as e:
        # a stated assumption fails (an axis shorter than a Swin offset): the numeric grid
        # still counts exactly, and the refusal must name a real assumption
        assert "break an assumption" in str(e)
        rep = pg.cost(pattern, grid=grid, head_dim=head_dim, heads=heads, batch=batch)
    per_query = mask.sum(-1)
    assert rep.pairs == mask.sum()
    assert rep.keys_min == per_query.min()
    assert rep.keys_max == per_query.max()
    assert rep.keys_mean == sympy.Rational(int(mask.sum()), mask.shape[-1])
    assert rep.flops == 4 * head_dim * heads * batch * mask.sum()
    assert rep.bytes == 4 * batch * heads * mask.shape[-1] * head_dim * 4
    assert rep.dense_pairs == mask.shape[-1] ** 2
    # the numeric grid gives the same numbers directly
    direct = pg.cost(pattern, grid=grid, head_dim=head_dim, heads=heads, batch=batch)
    assert (direct.pairs, direct.keys_min, direct.keys_max) == (rep.pairs, rep.keys_min,
                                                                rep.keys_max)
    return symbolic


@given(cases(max_tokens=300))
def test_symbolic_pairs_equal_enumeration(case):
    pattern, grid = case
    check_against_enumeration(pattern, grid)


@given(st.integers(1, 40), st.integers(1, 9), st.integers(1, 4),
       st.sampled_from(["clamp", "pad"]), st.booleans())
def test_window_formulas_with_symbolic_parameters(n, k, d, border, causal):
    d = min(d, n)
    k = min(k, n // d)
    rep = pg.cost(pg.window("k", dilation="d", border=border, causal=causal), grid=("n",))
    assert rep.closed_form
    got = rep.subs(n=n, k=k, d=d)
    mask = pg.materialize(pg.window(k, dilation=d, border=border, causal=causal), n)
    assert got.pairs == mask.sum()
    assert (got.keys_min, got.keys_max) == (mask.sum(1).min(), mask.sum(1).max())


@functools.lru_cache(maxsize=None)
def _symbolic_strided_report(border, causal):
    pattern = pg.window("k", dilation="d", border=border, causal=causal, stride="s")
    return pg.cost(pattern, grid=("n",))


@settings(max_examples=60)
@given(st.integers(1, 40), st.integers(1, 9), st.integers(1, 4), st.integers(1, 9),
       st.sampled_from(["clamp", "pad"]), st.booleans())
def test_strided_window_formulas_with_symbolic_parameters(n, k, d, s, border, causal):
    d = min(d, n)
    k = min(k, n // d)
    s = min(s, k)
    rep = _symbolic_strided_report(border, causal)
    # NATTEN's clamped window keeps k keys for every query at any stride; causal and truncated
    # ones sum in closed form per stride group
    assert rep.closed_form
    got = rep.subs(n=n, k=k, d=d, s=s)
    mask = pg.materialize(pg.window(k, dilation=d, border=border, causal=causal, stride=s), n)
    assert got.pairs == mask.sum()
    assert (got.keys_min, got.keys_max) == (mask.sum(1).min(), mask.sum(1).max())


@st.composite
def strided_cases(draw):
    """A strided window on a 1-3-D grid, alone or with a random other term."""
    shape = draw(grids(max_tokens=300))
    size = tuple(draw(st.integers(1, n)) for n in shape)
    window = pg.window(size, stride=tuple(draw(st.integers(1, k)) for k in size),
                       causal=tuple(draw(st.booleans()) for _ in shape),
                       border=draw(st.sampled_from(["clamp", "pad"])))
    how = draw(st.sampled_from(["alone", "|", "&"]))
    if how == "alone":
        return window, shape
    other = draw(primitives(shape))
    return (window | other if how == "|" else window & other), shape


@given(strided_cases())
def test_strided_pairs_equal_enumeration(case):
    pattern, grid = case
    check_against_enumeration(pattern, grid)


@given(st.integers(1, 14), st.integers(1, 14), st.integers(1, 8), st.integers(0, 7))
def test_block_formula_with_symbolic_size_and_offset(h, w, m, s):
    s = s % m
    rep = pg.cost(pg.block("M", offset="s"), grid=("H", "W"))
    if s > min(h, w):  # outside the stated assumption H >= s, W >= s: refused, not wrong
        with pytest.raises(pg.PatternError, match="break an assumption"):
            rep.subs(H=h, W=w, M=m, s=s)
        return
    got = rep.subs(H=h, W=w, M=m, s=s)
    mask = pg.materialize(pg.block(m, offset=s), (h, w))
    assert got.pairs == mask.sum()
    assert (got.keys_min, got.keys_max) == (mask.sum(1).min(), mask.sum(1).max())


def test_window_pairs_closed_form_and_assumptions():
    rep = pg.cost(pg.window(7), grid=("H", "W"), head_dim="d", heads="h")
    H, W, d, h = (pg.symbol(s) for s in "HWdh")
    assert rep.pairs == 49 * H * W
    assert rep.flops == 4 * d * h * 49 * H * W
    assert set(rep.assumptions) == {sympy.Ge(H, 7), sympy.Ge(W, 7)}
    assert rep.subs(H=14, W=14, d=32, h=4).flops == 4 * 32 * 4 * 49 * 196
    # the odd padded window of DESIGN.md: n*k - (k**2 - 1)/4 per axis
    n, k = pg.symbol("n"), pg.symbol("k")
    pad = pg.cost(pg.window(7, border="pad"), grid=("n",)).pairs
    assert sympy.simplify(pad - (n * k - (k ** 2 - 1) / 4).subs(k, 7)) == 0


def test_broken_assumption_is_an_error_not_a_number():
    rep = pg.cost(pg.window(7), grid=("H", "W"))
    with pytest.raises(pg.PatternError, match="break an assumption"):
        rep.subs(H=5, W=14)


def test_fallback_is_exact_and_says_so():
    pattern = pg.window(5) | pg.global_tokens([0])  # KeyIn & Window has no registered form
    rep = pg.cost(pattern, grid=("n",))
    assert not rep.closed_form
    assert any("no closed form for KeyIn(0, 1) & Window(5, clamp)" in n for n in rep.notes)
    for n in (5, 9, 17):
        mask = pg.materialize(pattern, n)
        got = rep.subs(n=n)
        assert got.pairs == mask.sum() and got.keys_max == mask.sum(1).max()


def test_window_and_causal_has_a_closed_form():
    rep = pg.cost(pg.window(7) & pg.causal(), grid=("H", "W"))
    assert rep.closed_form and rep.pairs == 25 * pg.symbol("H") * pg.symbol("W")
    assert rep.subs(H=9, W=11).pairs == int(pg.materialize(pg.window(7) & pg.causal(),
                                                           (9, 11)).sum())


def test_heads_cost_is_the_mean_over_heads():
    pattern = pg.heads(pg.axis(0), pg.window(3), pg.criss_cross())
    masks = pg.materialize(pattern, (6, 7))
    for heads in (1, 2, 3, 5, 7):
        rep = pg.cost(pattern, grid=(6, 7), heads=heads, head_dim=4)
        total = sum(int(masks[h % 3].sum()) for h in range(heads))
        assert rep.pairs * heads == total
        assert rep.flops == 4 * 4 * total
    symbolic = pg.cost(pattern, grid=(6, 7), heads="h").subs(h=5)
    assert symbolic.pairs * 5 == sum(int(masks[h % 3].sum()) for h in range(5))
    assert rep.pairs_per_pattern == tuple(int(m.sum()) for m in masks)
    assert symbolic.pairs_per_pattern == rep.pairs_per_pattern == rep.pairs_per_head


def test_cost_report_fields_are_keyword_only():
    rep = pg.cost(pg.window(3), grid=(6, 7))
    fields = {f: getattr(rep, f) for f in ("label", "grid", "head_dim", "heads", "batch",
                                           "dtype_bytes", "pairs", "pairs_per_pattern",
                                           "keys_min", "keys_max", "assumptions", "notes")}
    assert pg.CostReport(**fields) == rep
    with pytest.raises(TypeError, match="positional"):
        pg.CostReport(*fields.values())


# --- published formulas, from the same functions --------------------------------------------


def test_swin_window_attention_term():
    """Swin: Omega(W-MSA) = 4hwC^2 + 2 M^2 hwC; the second term is QK^T + PV in MACs, C the
    channels of all heads (here head_dim=C, heads=1)."""
    rep = pg.cost(pg.block("M"), grid=("H", "W"), head_dim="C")
    for h, w, m, c in [(56, 56, 7, 96), (28, 14, 7, 192), (12, 8, 4, 32)]:
        assert rep.subs(H=h, W=w, M=m, C=c).macs == 2 * m ** 2 * h * w * c


def test_area_attention_costs_a_quarter():
    """YOLOv12: area attention with l=4 costs n^2 h d / 2 (MACs) against 2 n^2 h d."""
    rep = pg.cost(pg.area(4), grid=("H", "W"), head_dim="d", heads="h")
    n = pg.symbol("H") * pg.symbol("W")
    d, h = pg.symbol("d"), pg.symbol("h")
    assert sympy.simplify(rep.macs - n ** 2 * h * d / 2) == 0
    dense = pg.cost(pg.full(), grid=("H", "W"), head_dim="d", heads="h")
    assert sympy.simplify(dense.macs / rep.macs) == 4


def test_criss_cross_pairs():
    """CCNet: each position attends H + W - 1 positions."""
    rep = pg.cost(pg.criss_cross(), grid=("H", "W"))
    H, W = pg.symbol("H"), pg.symbol("W")
    assert sympy.expand(rep.pairs - (H + W - 1) * H * W) == 0
    assert rep.keys_min == rep.keys_max == H + W - 1


def test_nat_neighbourhood_macs():
    """NAT: neighbourhood attention costs 2 H W C k^2 MACs (QK^T and AV) for a k x k window."""
    rep = pg.cost(pg.window("k"), grid=("H", "W"), head_dim="C")
    H, W, C, k = (pg.symbol(s) for s in ("H", "W", "C", "k"))
    assert sympy.expand(rep.macs - 2 * H * W * C * k ** 2) == 0


def test_report_prints_a_table():
    text = repr(pg.cost(pg.block("M"), grid=("H", "W"), head_dim="C"))
    assert text.splitlines()[0] == "Cost of block(M) on grid HxW (head_dim=C, heads=1, batch=1)"
    for row in ("attended pairs", "FLOPs (QK^T + PV", "bytes (Q,K,V,O once", "density",
                "speedup vs dense"):
        assert row in text
    assert "assuming H >= 7, W >= 7" in repr(pg.cost(pg.window(7), grid=("H", "W")))


def test_dtype_bytes():
    assert pg.cost(pg.window(3), grid=(8,), dtype="bfloat16").bytes == 4 * 8 * 2
    with pytest.raises(pg.PatternError, match=r"Unknown dtype='int8'"):
        pg.cost(pg.window(3), grid=(8,), dtype="int8")


def test_large_grid_counts_without_dense_mask():
    lowered = pg.lower(pg.window(4096, causal=True) | pg.global_tokens([0, 1, 2]), 1 << 20)
    n, k = 1 << 20, 4096
    expected_window = n * k - k * (k - 1) // 2
    # global keys 0..2 add the pairs the window misses; global queries see everything
    assert lowered.pairs() == pg.cost(lowered).pairs
    assert lowered.pairs() > expected_window
    assert np.all(lowered.key_counts()[:3] == n)


def test_block_layout_adds_executed_pairs_for_each_order():
    from patterngen.layout import layout

    rep = pg.cost(pg.window(7), grid=(64, 64), head_dim=32, block=(128, 128))
    row_major = layout(pg.window(7), (64, 64), block=(128, 128), order="row-major")
    tiled = layout(pg.window(7), (64, 64), block=(128, 128), order="tiled")
    assert rep.executed_by_order == {"row-major": row_major.executed_pairs,
                                     "tiled": tiled.executed_pairs}
    assert rep.executed_pairs == min(row_major.executed_pairs, tiled.executed_pairs)
    # waste counted from the dense mask: every 128x128 tile it touches, in either order
    mask = pg.materialize(pg.window(7), (64, 64))
    touched = min(mask[perm][:, perm].reshape(32, 128, 32, 128).any(axis=(1, 3)).sum()
                  for perm in (row_major.permutation, tiled.permutation))
    assert rep.waste == sympy.Rational(int(touched) * 128 * 128, int(mask.sum()))
    assert "executed pairs (row-major, blocks 128x128)" in repr(rep)
    # Swin windows laid out tile by tile run without waste
    assert pg.cost(pg.block(7), grid=(56, 56), block=(49, 49)).waste == 1
    # a fixed order reports that order only
    fixed = pg.cost(pg.window(7), grid=(64, 64), block=64, order="row-major")
    assert list(fixed.executed_by_order) == ["row-major"] and fixed.order == "row-major"


def test_block_layout_of_heads_is_a_mean_like_pairs():
    pattern = pg.heads(pg.axis(0), pg.block(7))
    rep = pg.cost(pattern, grid=(28, 28), heads=3, block=64, order="row-major")
    from patterngen.layout import layout

    per = [layout(p, (28, 28), block=64).executed_pairs for p in (pg.axis(0), pg.block(7))]
    assert rep.executed_pairs * 3 == 2 * per[0] + per[1]


def test_block_layout_needs_numbers():
    with pytest.raises(pg.PatternError, match="layout needs a numeric grid"):
        pg.cost(pg.window(7), grid=("H", "W"), block=64)
