"""Relative position bias and softcap: reach, the dense oracle, sdpa, flex, numba, errors,
converters.

Every backend result is compared with :func:`patterngen.dense_attention` in float64, which adds
the table by offset on a tokens x tokens grid and refuses a table that does not cover an
attended pair, so a wrong reach cannot pass unnoticed.
"""

import os
import random
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from patterngen import bias
from patterngen.parse import as_ir
from oracle import reference
from strategies import cases, random_spec

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
LONG = pytest.mark.skipif(os.environ.get("PATTERNGEN_LONG") != "1",
                          reason="torch.compile on CPU takes tens of seconds; PATTERNGEN_LONG=1")
COMPILES = pytest.mark.skipif(os.environ.get("PATTERNGEN_LONG") != "1",
                              reason="one more numba module to compile; PATTERNGEN_LONG=1")

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
    return reference(pattern, grid, q, k, v, softcap=softcap, rel_bias=table)


def check(backend, pattern, grid, softcap=None, shared=False, heads=3, dtype=torch.float64,
          atol=1e-10, **options):
    """``backend``'s output and gradients of q, k, v and the table against the float64 oracle
    (run on the inputs rounded to ``dtype``); returns the compiled attention."""
    attn = pg.compile(pattern, grid, backend=backend, softcap=softcap, **options)
    q, k, v, table = inputs(grid, heads, attn.reach, shared, dtype=dtype)
    out = attn(q, k, v, rel_bias=table)
    assert out.dtype == dtype
    wide = [t.detach().double().requires_grad_() for t in (q, k, v, table)]
    ref = oracle(pattern, grid, *wide, softcap)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out, (q, k, v, table), grad.to(dtype), allow_unused=True)
    want = torch.autograd.grad(ref, wide, grad)
    for name, a, b in zip(("q", "k", "v", "table"), got, want):
        assert a is None or a.dtype == dtype, name
        torch.testing.assert_close(torch.zeros_like(b) if a is None else a.double(), b,
                                   atol=atol, rtol=0, msg=lambda m, name=name: f"d{name}: {m}")
    return attn


def check_sdpa(pattern, grid, softcap=None, shared=False, heads=3, **options):
    check("sdpa", pattern, grid, softcap, shared, heads, **options)


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
    options = dict(options, block=options.get("block", 32))
    attn = pg.compile(pattern, grid, backend="flex", softcap=softcap, compile=False, **options)
    q, k, v, table = (t.detach() for t in inputs(grid, 3, attn.reach, softcap is None))
    with torch.no_grad():
        out = attn(*(t.float() for t in (q, k, v)), rel_bias=table.float())
    ref = oracle(pattern, grid, q, k, v, table, softcap)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0)


@LONG
def test_flex_compiled_cpu_forward_with_bias_and_softcap():
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
    attn = pg.compile(pg.window(3), (8, 8), backend="flex", compile=False)
    q = torch.randn(1, 2, 64, 8)
    with pytest.raises(pg.PatternError, match="no CPU backward"):
        attn(q, q, q, rel_bias=torch.zeros(2, 5, 5, requires_grad=True))


def test_flex_score_mod_is_the_oracle_s_bias():
    pattern, grid = pg.window(3), (6, 7)
    attn = pg.compile(pattern, grid, backend="flex", order="tiled", tile=(3, 7), block=21)
    table = torch.randn(2, 5, 5, dtype=torch.float64)
    mod = attn.score_mod(table, "cpu")
    perm = torch.as_tensor(attn.layout.permutation)
    i = torch.arange(42)
    mask = pg.materialize(pattern, grid)
    dense = pg.reference.dense_bias(table, grid, torch.as_tensor(mask))[:, perm][:, :, perm]
    keep = torch.as_tensor(mask)[perm][:, perm]
    for h in range(2):
        got = mod(torch.zeros(42, 42, dtype=torch.float64), 0, h, i[:, None], i[None, :])
        torch.testing.assert_close(got[keep], dense[h][keep], atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["sdpa", "flex", "numba"])
def test_bad_tables_and_softcaps_are_named(backend):
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


# numba compiles one module per pattern structure, dtype, lanes and bias/softcap variant
# (seconds each), so its cases are chosen rather than drawn by hypothesis. lanes=0 runs a
# query at a time; lanes=4 runs tiles whose lanes share a term's keys (blocks, axes, the row
# of criss-cross) or run it lane by lane (narrow windows, criss-cross's column).
# A softcap is a compile-time variant (a module each, seconds from an empty cache: this is the
# suite's longest file), so each case runs one softcap by default, alternating, and the other
# with PATTERNGEN_LONG=1; a table shared by the heads or one per head is a runtime choice of
# the same kernels, so every case that runs checks both.
NUMBA_LANES = [(c, 0) for c in NAMED] + [(NAMED[i], 4) for i in (2, 4, 5, 6, 0, 7)]
NUMBA_SOFTCAPS = [None, 1.5]
#: the last lanes=4 cases (dilated windows, per head: 5 and 18 s from an empty cache) only long
NUMBA_CASES = [
    pytest.param(case, lanes, softcap, id=f"{case[0]!r}-lanes{lanes}-softcap{softcap}",
                 marks=[] if (i + v) % 2 == 0 and i < len(NUMBA_LANES) - 2 else [COMPILES])
    for i, (case, lanes) in enumerate(NUMBA_LANES) for v, softcap in enumerate(NUMBA_SOFTCAPS)]


@pytest.mark.parametrize("case, lanes, softcap", NUMBA_CASES)
def test_numba_equals_the_oracle(case, lanes, softcap):
    pattern, grid, _ = case
    for shared in (True, False):
        check("numba", pattern, grid, softcap, shared, lanes=lanes)


@pytest.mark.parametrize("seed", [*range(2), *(pytest.param(s, marks=COMPILES)
                                                for s in range(2, 6))])
def test_numba_random_patterns(seed):
    rng = random.Random(f"bias-{seed}")
    ndim = rng.randint(1, 3)
    grid = tuple(rng.randint(7, {1: 30, 2: 10, 3: 7}[ndim]) for _ in range(ndim))
    pattern = random_spec(rng, ndim)
    if seed % 3 == 2:
        pattern = pg.heads(pattern, random_spec(rng, ndim))
    check("numba", pattern, grid, rng.choice([None, 0.8]), rng.random() < 0.5,
          lanes=rng.choice([0, 2, 4]))


@pytest.mark.parametrize("pattern, grid", [(pg.window(7), (12, 13)),
                                           (pg.window((3, 3, 3)), (4, 5, 6))])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_numba_float32_with_bias(pattern, grid, softcap):
    check("numba", pattern, grid, softcap, dtype=torch.float32, atol=1e-4)


def test_numba_bfloat16_with_bias_and_softcap():
    attn = check("numba", pg.window(5), (9, 9), 2.0, heads=2, dtype=torch.bfloat16, atol=0.15)
    assert attn.softcap == 2.0


def test_numba_softcap_without_a_table():
    pattern, grid = pg.criss_cross(), (6, 7)
    attn = pg.compile(pattern, grid, backend="numba", softcap=0.5, lanes=4)
    q, k, v, _ = inputs(grid, 2, attn.reach, True)
    ref = oracle(pattern, grid, q, k, v, None, 0.5)
    out = attn(q, k, v)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    grad = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad),
                    torch.autograd.grad(ref, (q, k, v), grad)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)


def test_numba_table_gradient_sums_one_copy_per_call(monkeypatch):
    # the thread pool instead of torch's team, 1 to 3 threads: each call of the kernel takes
    # its own copy of the table's gradient; every copy is summed
    from patterngen.backends.numba import launch

    monkeypatch.setattr(launch, "team", lambda: None)
    for threads in (1, 2, 3):
        monkeypatch.setattr(launch, "_numba_threads", lambda threads=threads: threads)
        check("numba", pg.window(3) | pg.axis(1), (7, 9), 1.5, shared=True, heads=1)


def test_numba_plain_kernels_are_unchanged_by_the_variants():
    attn = pg.compile(pg.window(3), (8, 8), backend="numba")
    plain = attn.source_for("float32")
    assert not re.search(r"\bbt\b|\breach0\b|softcap", plain)
    variant = attn.source_for("float32", rel_bias=True, softcap=True)
    assert "with a relative position bias table and a softcap" in variant
    assert "bt, offs, 0, softcap, slopes, dbt)" in variant


def test_numba_ops_pass_opcheck_with_a_table():
    attn = pg.compile(pg.criss_cross() | pg.window(3), (6, 6), backend="numba", lanes=4)
    # float64 only: float32 is checked on the plain operator (test_ops), one compile less
    q, k, v, table = inputs((6, 6), 2, attn.reach, False, dtype=torch.float64)
    torch.library.opcheck(torch.ops.patterngen.numba_fwd.default,
                          (q, k, v, attn.op_key, 0.3, table, 0.7))
    q, k, v, table = (t.detach() for t in (q, k, v, table))
    out, lse = torch.ops.patterngen.numba_fwd(q, k, v, attn.op_key, 0.3, table, 0.7)
    torch.library.opcheck(torch.ops.patterngen.numba_bwd.default,
                          (q, k, v, out, lse, torch.randn_like(out), attn.op_key, 0.3, table,
                           0.7))


def test_numba_reads_a_larger_table_around_its_centre():
    # the planner runs part of a pattern (its gather terms) with the whole pattern's table
    pattern, grid = pg.window(3), (8, 8)
    attn = pg.compile(pattern, grid, backend="numba")
    q, k, v, big = inputs(grid, 2, (3, 3), False)
    inner = big[:, 1:6, 1:6]
    ref = oracle(pattern, grid, q, k, v, inner, None)
    grad = torch.randn_like(ref)
    want = torch.autograd.grad(ref, (q, k, v, inner), grad)
    arrays = [t.detach().numpy() for t in (q, k, v, big)]
    out, lse = attn.forward_numpy(*arrays[:3], attn.shape, 8 ** -0.5, arrays[3])
    np.testing.assert_allclose(out, ref.detach().numpy(), atol=1e-10)
    got = attn.backward_numpy(*arrays[:3], out, grad.numpy(), lse, attn.shape, 8 ** -0.5,
                              arrays[3])
    for a, b in zip(got[:3], want[:3]):
        np.testing.assert_allclose(a, b.numpy(), atol=1e-10)
    np.testing.assert_allclose(got[3][:, 1:6, 1:6], want[3].numpy(), atol=1e-10)
    rim = got[3].copy()
    rim[:, 1:6, 1:6] = 0
    assert got[3].shape == big.shape and not rim.any()


def test_numba_layer_with_rel_pos_bias_trains_as_the_sdpa_one():
    from patterngen import nn

    pattern, grid = pg.window(3) | pg.axis(0), (5, 6)
    torch.manual_seed(0)
    layers = {b: nn.LocalSelfAttention(8, 2, pattern, grid=grid, backend=b,
                                       rel_pos_bias=True).double() for b in ("numba", "sdpa")}
    layers["numba"].load_state_dict(layers["sdpa"].state_dict())
    x = torch.randn(2, 5, 6, 8, dtype=torch.float64)
    target = torch.randn_like(x)
    grads = {}
    for name, layer in layers.items():
        loss = (layer(x) - target).pow(2).mean()
        grads[name] = torch.autograd.grad(loss, list(layer.parameters()))
    for a, b in zip(grads["numba"], grads["sdpa"]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    names = [name for name, _ in layers["numba"].named_parameters()]
    assert grads["numba"][names.index("rel_pos_bias_table")].abs().sum() > 0


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
    ours = pg.reference.dense_bias(bias.from_swin(swin, (wh, ww)), (wh, ww),
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
