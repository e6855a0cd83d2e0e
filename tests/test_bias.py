"""Relative position bias and softcap: reach, the dense oracle, sdpa, flex, errors, converters.

Every backend result is compared with :func:`patterngen.dense_attention` in float64, which adds
the table by offset on a tokens x tokens grid and refuses a table that does not cover an
attended pair, so a wrong reach cannot pass unnoticed.
"""

import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from patterngen import bias
from patterngen.spec import as_ir
from strategies import cases

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
LONG = pytest.mark.skipif(os.environ.get("PATTERNGEN_LONG") != "1",
                          reason="torch.compile on CPU takes tens of seconds; PATTERNGEN_LONG=1")

NAMED = [
    (pg.window((5, 3), dilation=(2, 1)), (11, 9), dict(block=16)),      # dilation, clamped
    (pg.window(4, border="pad"), (7, 10), dict(block=(8, 16))),           # even, padded
    (pg.block(4, offset=2), (10, 9), {}),                                  # shifted blocks
    (pg.block(3), (6, 9), dict(block=9, order="tiled", tile=(3, 3))),    # mask-free windows
    (pg.criss_cross(), (6, 7), dict(block=8)),
    (pg.window(6, causal=True), 40, dict(block=16)),                      # causal 1-D window
    (pg.window(3) | pg.global_tokens([(0, 0)]), (8, 9), dict(block=(8, 24))),  # union
    (pg.heads(pg.window(3), pg.axis(0), pg.block(2)), (6, 8), dict(block=16)),  # per head
    (pg.window((3, 3, 3)), (4, 5, 6), dict(order="tiled", tile=(2, 5, 3), block=30)),
]
IDS = [repr(c[0]) for c in NAMED]


def enumerated_reach(pattern, grid):
    """Per axis, the largest |key - query| over the materialised pairs."""
    shape = (grid,) if isinstance(grid, int) else tuple(grid)
    mask = pg.materialize(pattern, grid)
    mask = mask.any(0) if mask.ndim == 3 else mask
    coords = np.unravel_index(np.arange(mask.shape[0]), shape)
    if not mask.any():
        return (0,) * len(shape)
    return tuple(int(np.abs(c[None, :] - c[:, None])[mask].max()) for c in coords)


@settings(max_examples=60)
@given(case=cases(max_tokens=300))
def test_reach_equals_enumeration(case):
    pattern, grid = case
    assert bias.reach(as_ir(pattern, grid)) == enumerated_reach(pattern, grid)


def test_reach_of_named_patterns():
    assert pg.compile(pg.block(7, offset=3), (56, 56), backend="sdpa").reach == (6, 6)
    assert bias.reach(as_ir(pg.window(7), (56, 56))) == (6, 6)
    assert bias.reach(as_ir(pg.window(7, dilation=2), (30, 30))) == (12, 12)
    assert bias.reach(as_ir(pg.criss_cross(), (5, 9))) == (4, 8)
    # a million-token window: computed per axis, never tokens x tokens
    assert bias.reach(as_ir(pg.window(257), 1 << 20)) == (256,)


def inputs(grid, heads, reach, shared, dtype=torch.float64, seed=0):
    n = int(np.prod(grid))
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, heads, n, 8, generator=g, dtype=torch.float64) for _ in range(3))
    rows = 1 if shared else heads
    table = torch.randn(rows, *(2 * r + 1 for r in reach), generator=g, dtype=torch.float64)
    return [t.to(dtype).requires_grad_() for t in (q, k, v, table)]


def oracle(pattern, grid, q, k, v, table, softcap):
    return pg.dense_attention(q, k, v, pg.materialize(pattern, grid), softcap=softcap,
                              rel_bias=table, grid=grid)


def check_sdpa(pattern, grid, softcap=None, shared=False, heads=3, **options):
    attn = pg.compile(pattern, grid, backend="sdpa", softcap=softcap, **options)
    q, k, v, table = inputs(grid, heads, attn.reach, shared)
    out = attn(q, k, v, rel_bias=table)
    ref = oracle(pattern, grid, q, k, v, table, softcap)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    grad = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, table), grad, allow_unused=True)
    want = torch.autograd.grad(ref, (q, k, v, table), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(torch.zeros_like(b) if a is None else a, b, atol=1e-10,
                                   rtol=0)


@pytest.mark.parametrize("pattern, grid, options", NAMED, ids=IDS)
@pytest.mark.parametrize("softcap, shared", [(None, True), (None, False), (1.5, False)])
def test_sdpa_equals_the_oracle(pattern, grid, options, softcap, shared):
    check_sdpa(pattern, grid, softcap, shared, **options)


@settings(max_examples=25)
@given(case=cases(max_tokens=150), block=st.sampled_from([None, 7, (16, 8)]),
       tiled=st.booleans(), softcap=st.sampled_from([None, 0.7]), shared=st.booleans())
def test_sdpa_random_patterns(case, block, tiled, softcap, shared):
    pattern, grid = case
    check_sdpa(pattern, grid, softcap, shared, block=block,
               order="auto" if tiled else "row-major")


def test_sdpa_inference_paths_add_the_bias():
    # the mask-free matmul path (no autograd) and the masked SDPA path, without gradients
    for pattern, options in ((pg.block(4), {}), (pg.window(3), dict(block=16))):
        attn = pg.compile(pattern, (8, 8), backend="sdpa", **options)
        q, k, v, table = (t.detach() for t in inputs((8, 8), 3, attn.reach, False))
        with torch.no_grad():
            out = attn(q, k, v, rel_bias=table)
            plain = attn(q, k, v)
        ref = oracle(pattern, (8, 8), q, k, v, table, None)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
        assert (out - plain).abs().max() > 1e-3  # the bias changes the output


def test_sdpa_half_precision_with_bias_and_softcap():
    pattern, grid = pg.window(5), (9, 9)
    attn = pg.compile(pattern, grid, backend="sdpa", softcap=2.0, block=32)
    q, k, v, table = (t.detach() for t in inputs(grid, 2, attn.reach, False))
    half = [t.to(torch.bfloat16) for t in (q, k, v, table)]
    out = attn(*half[:3], rel_bias=half[3])
    ref = oracle(pattern, grid, q, k, v, table, 2.0)
    torch.testing.assert_close(out.double(), ref, atol=3e-2, rtol=0)


@pytest.mark.parametrize("pattern, grid, options", NAMED[:3] + NAMED[7:], ids=IDS[:3] + IDS[7:])
@pytest.mark.parametrize("softcap", [None, 1.5])
def test_flex_forward_on_cpu_equals_the_oracle(pattern, grid, options, softcap):
    pytest.importorskip("torch.nn.attention.flex_attention")
    options = dict(options, block=options.get("block", 32))
    attn = pg.compile(pattern, grid, backend="flex", softcap=softcap, compile=False, **options)
    q, k, v, table = (t.detach() for t in inputs(grid, 3, attn.reach, softcap is None))
    with torch.no_grad():
        out = attn(*(t.float() for t in (q, k, v)), rel_bias=table.float())
    ref = oracle(pattern, grid, q, k, v, table, softcap)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)


@LONG
def test_flex_compiled_cpu_forward_with_bias_and_softcap():
    pytest.importorskip("torch.nn.attention.flex_attention")
    pattern, grid = pg.heads(pg.window(3), pg.block(4, offset=2)), (8, 12)
    attn = pg.compile(pattern, grid, backend="flex", softcap=2.0, block=32, order="tiled",
                      tile=(4, 4))
    q, k, v, table = (t.detach() for t in inputs(grid, 2, attn.reach, False))
    with torch.no_grad():
        out = attn(*(t.float() for t in (q, k, v)), rel_bias=table.float())
    ref = oracle(pattern, grid, q, k, v, table, 2.0)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)


@CUDA
@pytest.mark.parametrize("softcap", [None, 1.5])
def test_flex_cuda_forward_and_backward_with_the_table_gradient(softcap):
    pattern, grid = pg.heads(pg.window((5, 3), dilation=(2, 1)), pg.criss_cross()), (11, 13)
    attn = pg.compile(pattern, grid, backend="flex", device="cuda", softcap=softcap, block=64)
    q, k, v, table = inputs(grid, 4, attn.reach, False)
    cuda = [t.detach().float().cuda().requires_grad_() for t in (q, k, v, table)]
    out = attn(*cuda[:3], rel_bias=cuda[3])
    ref = oracle(pattern, grid, q, k, v, table, softcap)
    torch.testing.assert_close(out.double().cpu(), ref, atol=1e-4, rtol=0)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, cuda, grad.float().cuda())
    want = torch.autograd.grad(ref, (q, k, v, table), grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double().cpu(), b, atol=1e-3, rtol=1e-3)


def test_flex_refuses_a_table_that_needs_gradients_on_cpu():
    pytest.importorskip("torch.nn.attention.flex_attention")
    attn = pg.compile(pg.window(3), (8, 8), backend="flex", compile=False)
    q = torch.randn(1, 2, 64, 8)
    with pytest.raises(pg.PatternError, match="no CPU backward"):
        attn(q, q, q, rel_bias=torch.zeros(2, 5, 5, requires_grad=True))


def test_flex_score_mod_is_the_oracle_s_bias():
    pytest.importorskip("torch.nn.attention.flex_attention")
    pattern, grid = pg.window(3), (6, 7)
    attn = pg.compile(pattern, grid, backend="flex", order="tiled", tile=(3, 7), block=21)
    table = torch.randn(2, 5, 5, dtype=torch.float64)
    mod = attn.score_mod(table, "cpu")
    perm = torch.as_tensor(attn.layout.permutation)
    i = torch.arange(42)
    mask = pg.materialize(pattern, grid)
    dense = pg.reference._dense_bias(table, grid, torch.as_tensor(mask))[:, perm][:, :, perm]
    keep = torch.as_tensor(mask)[perm][:, perm]
    for h in range(2):
        got = mod(torch.zeros(42, 42, dtype=torch.float64), 0, h, i[:, None], i[None, :])
        torch.testing.assert_close(got[keep], dense[h][keep], atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_bad_tables_and_softcaps_are_named(backend):
    pytest.importorskip("torch.nn.attention.flex_attention")
    options = dict(compile=False) if backend == "flex" else {}
    attn = pg.compile(pg.window(3), (8, 8), backend=backend, **options)
    q = torch.randn(1, 2, 8, 8, 16)
    expected = r"rel_bias.*\(2 or 1, 5, 5\)"
    for table in (torch.zeros(2, 25), torch.zeros(2, 5, 7), torch.zeros(3, 5, 5),
                  torch.zeros(2, 5, 5, 1)):
        with pytest.raises(pg.PatternError, match=expected):
            attn(q, q, q, rel_bias=table)
    with pytest.raises(pg.PatternError, match="rel_bias has dtype"):
        attn(q, q, q, rel_bias=torch.zeros(2, 5, 5, dtype=torch.float64))
    with pytest.raises(pg.PatternError, match="rel_bias must be a torch.Tensor"):
        attn(q, q, q, rel_bias=np.zeros((2, 5, 5)))
    with pytest.raises(pg.PatternError, match="rel_bias is on device='meta'"):
        attn(q, q, q, rel_bias=torch.zeros(2, 5, 5, device="meta"))
    for softcap in (0, -1.0, float("inf"), True, "2"):
        with pytest.raises(pg.PatternError, match="softcap"):
            pg.compile(pg.window(3), (8, 8), backend=backend, softcap=softcap, **options)


def test_numba_refuses_bias_and_softcap_by_name():
    pytest.importorskip("numba")
    attn = pg.compile(pg.window(3), (6, 6), backend="numba", softcap=None)  # None: accepted
    q = torch.randn(1, 2, 36, 8)
    with pytest.raises(pg.PatternError, match="rel_bias= is not supported by the numba"):
        attn(q, q, q, rel_bias=torch.zeros(2, 5, 5))
    with pytest.raises(pg.PatternError, match="softcap= is not supported by the numba"):
        pg.compile(pg.window(3), (6, 6), backend="numba", softcap=30.0)
    torch.testing.assert_close(attn(q, q, q, rel_bias=None), attn(q, q, q))


def test_oracle_refuses_a_table_too_small_for_the_pattern():
    q = torch.randn(1, 1, 10, 4, dtype=torch.float64)
    with pytest.raises(pg.PatternError, match="offsets up to 1 on axis 0"):
        pg.dense_attention(q, q, q, pg.materialize(pg.window(5), 10),
                           rel_bias=torch.zeros(1, 3, dtype=torch.float64), grid=10)


def timm_index(wh, ww):
    """timm's get_relative_position_index, written as timm writes it (query minus key)."""
    coords = torch.stack(torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij"))
    flat = torch.flatten(coords, 1)
    rel = (flat[:, :, None] - flat[:, None, :]).permute(1, 2, 0).contiguous()
    rel[:, :, 0] += wh - 1
    rel[:, :, 1] += ww - 1
    rel[:, :, 0] *= 2 * ww - 1
    return rel.sum(-1)


def test_from_swin_reproduces_timm_s_bias_inside_a_window():
    wh, ww, heads = 4, 3, 2
    swin = torch.randn((2 * wh - 1) * (2 * ww - 1), heads)
    timm_bias = swin[timm_index(wh, ww).view(-1)].view(wh * ww, wh * ww, heads).permute(2, 0, 1)
    ours = pg.reference._dense_bias(bias.from_swin(swin, (wh, ww)), (wh, ww),
                                    torch.ones(wh * ww, wh * ww, dtype=torch.bool))
    torch.testing.assert_close(ours, timm_bias, atol=0, rtol=0)
    cropped = bias.from_swin(swin, (wh, ww), reach_=(1, 2))
    assert cropped.shape == (heads, 3, 5)
    torch.testing.assert_close(cropped, bias.from_swin(swin, (wh, ww))[:, 2:5, 0:5])
    with pytest.raises(pg.PatternError, match=r"Swin table for window=\(4, 4\)"):
        bias.from_swin(swin, 4)


def test_alibi_is_a_one_dimensional_table():
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float64)
    pattern, n = pg.window(4, causal=True), 12
    attn = pg.compile(pattern, n, backend="sdpa")
    table = bias.alibi(slopes, attn.reach[0])
    q, k, v = (torch.randn(1, 2, n, 4, dtype=torch.float64) for _ in range(3))
    scores = (q @ k.transpose(-1, -2)) / 2
    i = torch.arange(n)
    scores = scores - slopes[:, None, None] * (i[:, None] - i[None, :])  # Press et al.
    mask = torch.as_tensor(pg.materialize(pattern, n))
    want = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ v
    torch.testing.assert_close(attn(q, k, v, rel_bias=table), want, atol=1e-12, rtol=0)
