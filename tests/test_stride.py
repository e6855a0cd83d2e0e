"""Stride (NATTEN's generalised neighbourhoods): semantics pinned to NATTEN's own code, every
consumer of the IR, the backends against the dense oracle, and bad input.

NATTEN's rule is read from SHI-Labs/NATTEN at commit 8c8729f496a47804e04f4b57b818edd6797d0926:
``src/natten/backends/flex.py`` lines 333-407 (``get_na_flex_mask.single_dim_tiling_mask``,
the FlexAttention ``mask_mod``), which agrees with the CUDA kernels' window bounds in
``csrc/include/natten/cuda/fna/na_utils.cuh`` lines 1209-1313, and the validity rule from
``src/natten/utils/checks.py`` lines 486-509 (``check_args_against_input``).
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from patterngen import ir
from oracle import check_against_oracle, reference
from strategies import primitives


def natten_mask(shape, kernel, stride, dilation, causal):
    """NATTEN's (query, key) mask, transcribed line by line from ``single_dim_tiling_mask``.

    Per axis, in coordinates within the query's dilation group (``x // d``, sub-axis length
    ``x // d + padding``): the stride group leader is ``(q // s) * s + s // 2`` (causal:
    ``+ s - 1``), capped at the sub-axis' last position. Non-causal keys lie within
    ``k // 2`` left and ``k // 2 + (k % 2 - 1)`` right of the leader clamped into
    ``[left, m - 1 - right]``; causal keys satisfy ``key <= query`` and ``leader - key < k``.
    Written independently of patterngen's IR, for tests only.
    """
    coords = np.indices(shape).reshape(len(shape), -1)
    out = np.ones((coords.shape[1], coords.shape[1]), dtype=bool)
    for a, (x, k, s, d, c) in enumerate(zip(shape, kernel, stride, dilation, causal)):
        q, kv = coords[a][:, None], coords[a][None, :]
        q_di, kv_di = q // d, kv // d
        q_dg, kv_dg = q % d, kv % d
        padding = 1 - ((q_dg + (d - (x % d))) // d)
        corrected = (x // d) + padding
        left, right = k // 2, k // 2 + (k % 2 - 1)
        if c:
            leader = np.minimum((q_di // s) * s + s - 1, corrected - 1)
            mask = (q_di - kv_di >= 0) & (leader - kv_di < k) & (q_dg == kv_dg)
        else:
            leader = np.minimum((q_di // s) * s + (s // 2), corrected - 1)
            centre = np.clip(leader, left, corrected - 1 - right)
            w0, w1 = centre - kv_di, kv_di - centre
            mask = (((0 <= w0) & (w0 <= left)) | ((0 <= w1) & (w1 <= right))) & (q_dg == kv_dg)
        out &= mask
    return out


@st.composite
def natten_args(draw, max_ndim=3):
    """A valid NATTEN configuration: k * d <= n and 1 <= stride <= k on every axis."""
    ndim = draw(st.integers(1, max_ndim))
    limit = {1: 40, 2: 12, 3: 6}[ndim]
    shape, kernel, stride, dilation, causal = [], [], [], [], []
    for _ in range(ndim):
        n = draw(st.integers(1, limit))
        d = draw(st.integers(1, max(1, min(3, n // 2))))
        k = draw(st.integers(1, n // d))
        shape.append(n)
        dilation.append(d)
        kernel.append(k)
        stride.append(draw(st.one_of(st.just(k), st.integers(1, k))))  # often blocked
        causal.append(draw(st.booleans()))
    return tuple(shape), tuple(kernel), tuple(stride), tuple(dilation), tuple(causal)


@settings(max_examples=150, deadline=None)
@given(natten_args())
def test_strided_window_is_natten(args):
    shape, kernel, stride, dilation, causal = args
    pattern = pg.window(kernel, dilation=dilation, causal=causal, stride=stride)
    want = natten_mask(shape, kernel, stride, dilation, causal)
    np.testing.assert_array_equal(pg.materialize(pattern, shape), want)
    # every query lies inside its own neighbourhood (Rel.of relies on it), and the
    # progression path (key_counts) agrees with the dense one
    assert want.diagonal().all()
    lowered = pg.lower(pattern, shape)
    assert np.array_equal(lowered.key_counts(), want.sum(1))
    if not any(causal):  # NATTEN's promise: prod(kernel) keys for every query, any stride
        assert (want.sum(1) == np.prod(kernel)).all()


@pytest.mark.parametrize("n, k, s", [(11, 5, 3), (10, 4, 4), (9, 4, 2), (13, 6, 4)])
def test_partial_last_group_and_even_strides(n, k, s):
    # the last group, shorter than s, follows the axis' last position; even strides lead from
    # the right one of the two centre queries
    for causal in (False, True):
        got = pg.materialize(pg.window(k, stride=s, causal=causal), n)
        np.testing.assert_array_equal(got, natten_mask((n,), (k,), (s,), (1,), (causal,)))
        if not causal:  # a group shares one key set
            for g0 in range(0, n, s):
                assert (got[g0:g0 + s] == got[g0]).all()


def test_strided_pad_truncates_the_leaders_window():
    # pad is patterngen's extension: the leader's window cut at the borders, never shifted
    n, k, s = 12, 5, 3
    got = pg.materialize(pg.window(k, stride=s, border="pad"), n)
    for q in range(n):
        leader = min((q // s) * s + s // 2, n - 1)
        want = [leader - k // 2 <= p <= leader + k - 1 - k // 2 for p in range(n)]
        np.testing.assert_array_equal(got[q], want)
        assert got[q, q]


def test_every_strided_window_contains_its_query():
    # Rel.of collapses Eq & atom to Eq for a reflexive atom: every mode at every valid stride
    for mode in ir.WINDOW_MODES:
        for n, k, d in [(7, 7, 1), (11, 4, 2), (23, 5, 3), (30, 6, 5)]:
            for s in range(1, k + 1):
                w = ir.Window(k, d, mode, s)
                i = np.arange(n)
                assert ir.Rel.of(w).contains(i, i, n, ir.NUMPY_OPS).all(), (w, n)
                assert w.reflexive and ir.Rel.of(ir.Eq(), w) == ir.Rel.of(ir.Eq())


@pytest.mark.parametrize("grid, causal", [((16,), False), ((8, 24), True), ((4, 8, 16), False)])
def test_stride_equal_to_size_on_a_divisible_axis_is_a_block(grid, causal):
    size = tuple(min(8, n) for n in grid)
    pattern = pg.window(size, stride=size, causal=causal)
    lowered = pg.lower(pattern, grid)
    (term,) = lowered.terms
    for rel, k in zip(term.rels, size):
        assert ir.Block(k) in rel.atoms and (ir.Le() in rel.atoms) == causal
    want = natten_mask(grid, size, size, (1,) * len(grid), (causal,) * len(grid))
    np.testing.assert_array_equal(pg.materialize(pattern, grid), want)
    if not causal:  # the same IR as Swin's windows, so every backend's aligned path applies
        assert lowered == pg.lower(pg.block(size), grid)


def test_repr_parse_and_per_axis_arguments():
    p = pg.window((3, 8, 8), stride=(1, 8, 8))
    assert repr(p) == "window((3, 8, 8), stride=(1, 8, 8))"
    assert pg.parse(repr(p)) == p
    q = pg.window(7, dilation=2, causal=(True, False), stride=2)
    assert pg.parse(repr(q)) == q
    assert pg.window(7, stride=(2, 2)) != pg.window(7)
    assert "stride=2" in repr(pg.lower(pg.window(7, stride=2), (16, 16)))


def test_symbolic_stride_cost_is_closed_and_exact():
    rep = pg.cost(pg.window("k", stride="s"), grid=("H", "W"), head_dim="d")
    H, W, k, s = (pg.symbol(x) for x in "HWks")
    assert rep.closed_form and rep.pairs == H * W * k ** 2
    assert set(map(str, rep.assumptions)) >= {"s <= k", "H >= k", "W >= k"}
    for h, w, kk, ss in [(9, 7, 3, 2), (10, 12, 4, 4), (5, 11, 5, 3)]:
        mask = pg.materialize(pg.window(kk, stride=ss), (h, w))
        num = rep.subs(H=h, W=w, k=kk, s=ss, d=8)
        assert num.pairs == mask.sum() and num.flops == 32 * mask.sum()
    with pytest.raises(pg.PatternError, match="break an assumption"):
        rep.subs(H=9, W=9, k=3, s=4)


@pytest.mark.parametrize("kwargs, message", [
    (dict(size=3, stride=0), r"Invalid size stride=0; expected an integer >= 1"),
    (dict(size=3, stride=-2), r"Invalid size stride=-2"),
    (dict(size=3, stride=4), r"Invalid stride=4: stride cannot be larger than the window size "
                             r"\(size=3\); expected 1 <= stride <= size, as in NATTEN"),
    (dict(size=(7, 3), stride=(2, 5)), r"Invalid stride=5 on axis 1: .*\(size=3\)"),
    (dict(size=(7, 3), stride=(2, 2, 2)), r"Invalid stride=\(2, 2, 2\): 3 entries for "
                                          r"size=\(7, 3\) with 2; expected a scalar or 2"),
    (dict(size=3, stride=2.0), r"Invalid size stride=2.0 of type float"),
])
def test_bad_strides_are_refused(kwargs, message):
    with pytest.raises(pg.PatternError, match=message):
        pg.window(**kwargs)


def test_bad_strides_at_lowering():
    with pytest.raises(pg.PatternError, match=r"Invalid stride=\(2, 2, 2\): 3 entries for a "
                                              r"grid of rank 2"):
        pg.lower(pg.window(7, stride=(2, 2, 2)), (16, 16))
    with pytest.raises(pg.PatternError, match=r"Invalid stride=8 on axis 0: .*\(size=4\)"):
        pg.lower(pg.window((4, 9), stride=8), (16, 16))
    # a symbolic size, substituted later, is checked by the IR verifier
    lowered = pg.lower(pg.window("k", stride=4), ("H",))
    with pytest.raises(pg.PatternError, match=r"Invalid stride=4: .*\(size=3\)"):
        ir.verify(lowered.subs({pg.symbol("k"): 3, pg.symbol("H"): 9}))


def test_receptive_field_follows_the_dense_masks():
    grid, pattern = (13, 11), pg.window((5, 3), stride=(3, 2), dilation=(2, 1))
    mask = pg.materialize(pattern, grid).astype(np.int64)
    reach = np.eye(mask.shape[0], dtype=np.int64)
    for layers in (1, 2, 3):
        reach = np.minimum(mask @ reach + reach, 1)  # residual: each layer keeps its input
        rf = pg.receptive_field([pattern] * layers, grid=grid, query=(6, 5))
        np.testing.assert_array_equal(rf.mask.reshape(-1), reach[6 * 11 + 5] > 0)


# --------------------------------------------------------------------------------------------
# backends against the dense oracle (float64); a few structures, grids varied at runtime


STRUCTURES = [  # (spec, grids, numba): numba folds sizes and strides (seconds to compile a
    # structure) but takes the grid at runtime, so only a few structures are compiled
    (pg.window((4, 3), stride=(3, 2), dilation=(1, 2), causal=(True, False)),
     [(9, 10), (11, 7)], True),
    ((pg.window(5, stride=3) & pg.causal()) | pg.global_tokens([0]), [(8, 9)], True),
    (pg.window((2, 4, 3), stride=(2, 3, 2), dilation=(1, 1, 2), causal=(False, True, False)),
     [(3, 9, 10), (2, 11, 7)], False),
    (pg.window((2, 3, 3), stride=(1, 3, 2), border="pad"), [(3, 7, 8)], False),
    (pg.window(6, stride=4), [(17,), (30,)], False),
    (pg.window(4, stride=4) | pg.axis(0), [(6, 13)], False),
]


def _qkv(grid, seed, heads=2, dim=4):
    gen = torch.Generator().manual_seed(seed)
    n = int(np.prod(grid))
    return [torch.randn(2, heads, n, dim, generator=gen, dtype=torch.float64)
            .requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("backend, index", [
    *(("numba", i) for i, s in enumerate(STRUCTURES) if s[2]),
    *(("sdpa", i) for i in range(len(STRUCTURES))),
    ("auto", len(STRUCTURES) - 1)])  # the planner picks numba on CPU: one more compile only
def test_backends_match_the_oracle(backend, index):
    """numba, sdpa and the term-wise planner (auto): forward and q/k/v gradients."""
    pattern, grids, _ = STRUCTURES[index]
    for seed, grid in enumerate(grids):
        check_against_oracle(backend, pattern, grid, *_qkv(grid, seed))


@settings(max_examples=15, deadline=None)
@given(st.data())
def test_random_strided_unions_on_sdpa(data):
    """Strided windows (any rank, dilation, causal axes, even sizes) with a random other term."""
    shape, kernel, stride, dilation, causal = data.draw(natten_args(max_ndim=2))
    pattern = pg.window(kernel, dilation=dilation, causal=causal, stride=stride,
                        border=data.draw(st.sampled_from(["clamp", "pad"])))
    other = data.draw(st.sampled_from(["alone", "|", "&"]))
    if other != "alone":
        extra = data.draw(primitives(shape))
        pattern = pattern | extra if other == "|" else pattern & extra
    block = data.draw(st.sampled_from([None, 8, (4, 8)]))
    check_against_oracle("sdpa", pattern, shape, *_qkv(shape, 0, heads=1, dim=3), block=block)


@pytest.mark.parametrize("index", range(len(STRUCTURES)))
def test_flex_mask_and_cpu_forward(index):
    from torch.nn.attention import flex_attention as flex

    pattern, grids, _ = STRUCTURES[index]
    grid = grids[0]
    attn = pg.compile(pattern, grid, backend="flex", block=16, compile=False)
    perm = attn.layout.permutation
    want = pg.materialize(pattern, grid)[np.ix_(perm, perm)]
    idx = torch.arange(attn.layout.tokens)
    got = attn.mask_mod(torch.tensor(0), torch.tensor(0), idx[:, None], idx[None, :])
    np.testing.assert_array_equal(got.numpy(), want)
    n = attn.layout.tokens
    ref_mask = flex.create_block_mask(attn.mask_mod, 1, 1, n, n, device="cpu",
                                      BLOCK_SIZE=attn.layout.block)
    assert torch.equal(attn.block_mask.to_dense(), ref_mask.to_dense())
    q, k, v = (t.detach().float() for t in _qkv(grid, 1))
    with torch.no_grad():
        out = attn(q, k, v)
    torch.testing.assert_close(out, reference(pattern, grid, q, k, v), atol=2e-6, rtol=0)


def test_command_line_reads_strides(capsys):
    from patterngen import cli

    assert cli.main(["cost", "window(k, stride=s)", "--grid", "H,W", "--subs", "H=9", "W=8",
                     "k=3", "s=2"]) == 0
    out = capsys.readouterr().out
    assert "H*W*k**2" in out and "s <= k" in out
    assert f"attended pairs (per head)               {9 * 8 * 9}\n" in out
    assert cli.main(["cost", "window(8, stride=8)", "--grid", "64", "--block", "8"]) == 0
    assert "waste (executed / attended, row-major)  1.000" in capsys.readouterr().out
    assert cli.main(["show", "window(3, stride=4)", "--grid", "8"]) == 2
    err = capsys.readouterr().err
    assert "Invalid stride=4: stride cannot be larger than the window size (size=3)" in err
