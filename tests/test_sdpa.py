"""The ``sdpa`` backend against the dense oracle: forward, gradients, dtypes, paths, errors."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from oracle import check_against_oracle, reference
from patterngen.backends.inputs import select_rows
from patterngen.backends.sdpa import SdpaBackend, permute
from strategies import cases

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def qkv(pattern_grid, batch=2, heads=3, dim=8, dtype=torch.float64, device="cpu", seed=0):
    n = int(np.prod(pattern_grid))
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, dim, generator=g, dtype=torch.float64)
            .to(dtype=dtype, device=device).requires_grad_() for _ in range(3)]


def check(pattern, grid, dtype=torch.float64, atol=1e-10, heads=3, **options):
    q, k, v = qkv(grid, heads=heads, dtype=dtype)
    return check_against_oracle("sdpa", pattern, grid, q, k, v, atol=atol, **options)


@settings(max_examples=30)
@given(case=cases(max_tokens=200), block=st.sampled_from([None, 7, (16, 8), 32]),
       tiled=st.booleans())
def test_random_patterns_forward_and_gradients(case, block, tiled):
    pattern, grid = case
    options = dict(block=block, order="auto" if tiled else "row-major")
    check(pattern, grid, **options)


@pytest.mark.parametrize("pattern, grid, options", [
    (pg.window(5), 97, dict(block=(16, 8))),
    (pg.window(7), (15, 23), {}),
    (pg.window((7, 5), dilation=(2, 3), border="pad"), (15, 23), dict(block=32)),
    (pg.window(16, causal=True), 300, dict(block=64)),
    (pg.causal(), (5, 7, 9), dict(block=(13, 11))),
    (pg.block(3, offset=1), (9, 9), dict(block=9, order="tiled", tile=(3, 3))),
    (pg.criss_cross() | pg.global_tokens([0, (3, 4)]), (9, 11), dict(block=10)),
    (pg.window((3, 3, 3), dilation=(1, 2, 1)), (5, 6, 7), {}),
    (pg.heads(pg.window(3), pg.axis(1)), (7, 9), dict(block=8)),
    (pg.heads(pg.window(3), pg.causal()), (6, 6), dict(block=8, order="tiled", tile=(2, 3))),
], ids=lambda v: repr(v) if isinstance(v, pg.Pattern) else None)
def test_named_cases_forward_and_gradients(pattern, grid, options):
    check(pattern, grid, **options)


def swin_attention(q, k, v, grid, window):
    """Swin's window partition + SDPA + reverse, the implementation the backend must equal."""
    b, h, _, d = q.shape
    (hh, ww), m = grid, window

    def part(x):
        x = x.view(b, h, hh // m, m, ww // m, m, d).permute(0, 2, 4, 1, 3, 5, 6)
        return x.reshape(b * (hh // m) * (ww // m), h, m * m, d)

    out = torch.nn.functional.scaled_dot_product_attention(part(q), part(k), part(v))
    out = out.view(b, hh // m, ww // m, h, m, m, d).permute(0, 3, 1, 4, 2, 5, 6)
    return out.reshape(b, h, hh * ww, d)


def test_swin_windows_take_the_mask_free_path_and_equal_swin():
    attn = check(pg.block(7), (56, 56), heads=1)
    assert attn.layout.order == "tiled" and attn.layout.tile == (7, 7)
    assert all(g.mask is None for g in attn.groups[0])
    q, k, v = qkv((56, 56), heads=2, dtype=torch.float32)
    torch.testing.assert_close(attn(q, k, v), swin_attention(q, k, v, (56, 56), 7))


def test_area_attention_takes_the_mask_free_path():
    attn = check(pg.area(4), (16, 8))
    assert all(g.mask is None for g in attn.groups[0])


def count_sdpa_calls(monkeypatch):
    calls = []
    fused = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("attn_mask") is None)
        return fused(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    return calls


@settings(max_examples=40, deadline=None)
@given(case=cases(max_tokens=200), block=st.sampled_from([1, 1, None, 7, (16, 8)]),
       tiled=st.booleans(), chunk=st.sampled_from([None, 1, 1 << 12]))
def test_random_patterns_forward_without_autograd(case, block, tiled, chunk):
    # without autograd, small mask-free groups (every group at block 1) skip the fused kernel,
    # and gathered groups run in chunks (chunk 1: one query block each, masks per block or
    # shared, rows without keys, the output rows back into token order; 4 KiB: a few blocks
    # each, gathered into one reused buffer); bands stay views
    from patterngen.backends.sdpa import calls as sdpa_calls

    pattern, grid = case
    attn = pg.compile(pattern, grid, backend="sdpa", block=block,
                      order="auto" if tiled else "row-major")
    q, k, v = (t.detach() for t in qkv(grid))
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        if chunk is not None:
            patch.setattr(sdpa_calls, "CHUNK_BYTES", chunk)
        out = attn(q, k, v)
    ref = pg.dense_attention(q, k, v, pg.materialize(pattern, grid))
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)


def test_chunks_gathered_into_one_reused_buffer_never_alias_an_output(monkeypatch):
    # without autograd a gathered group's chunks are written into one buffer per thread,
    # reused by the next chunk, group, pattern and call: no output may keep a view of it
    from patterngen.backends.sdpa import calls as sdpa_calls

    cases = [(pg.window(5), (24, 24)), (pg.criss_cross(), (12, 12))]
    attns = [pg.compile(p, grid, backend="sdpa", block=16, order="row-major")
             for p, grid in cases]
    # two of the largest query block's keys and values (batch 2, 2 heads, float64) a chunk
    widest = max(grp.kv_blocks.shape[1] for attn in attns for grp in attn.groups[0])
    monkeypatch.setattr(sdpa_calls, "CHUNK_BYTES", 2 * 2 * 2 * widest * 16 * 16 * 8)
    calls = count_sdpa_calls(monkeypatch)
    ins = [qkv(grid, heads=2, dim=16, seed=i) for i, (_, grid) in enumerate(cases)]
    with torch.inference_mode():  # the buffer may be made here and written outside
        first = attns[1](*ins[1])
    with torch.no_grad():
        outs = [(attn(*x), x) for attn, x in zip(attns, ins)]
        again = attns[0](*outs[0][1])
    torch.testing.assert_close(first, outs[1][0], atol=0, rtol=0)
    assert len(calls) > sum(len(groups) for attn in attns for groups in attn.groups)
    for (out, x), (pattern, grid) in zip(outs, cases):
        ref = pg.dense_attention(*(t.detach() for t in x), pg.materialize(pattern, grid))
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(again, outs[0][0], atol=0, rtol=0)


@pytest.mark.parametrize("pattern, grid, options", [
    (pg.block(7), (56, 56), {}),  # Swin: one key block per query block, a slice
    (pg.window(3, border="pad"), 32, dict(block=1)),  # two groups, one an unfold band
    (pg.block(4), (8, 8), dict(block=(16, 8), order="tiled", tile=(4, 4))),  # gathered
    (pg.full(), 64, dict(block=16)),  # gathered, 64 keys per query
], ids=["swin", "band", "tiled-gather", "gather"])
def test_small_mask_free_blocks_skip_the_fused_kernel_only_without_autograd(
        pattern, grid, options, monkeypatch):
    attn = pg.compile(pattern, grid, backend="sdpa", **options)
    calls = count_sdpa_calls(monkeypatch)
    q, k, v = qkv(grid, heads=2)
    ref = pg.dense_attention(q, k, v, pg.materialize(pattern, grid))
    with torch.no_grad():
        torch.testing.assert_close(attn(q, k, v), ref, atol=1e-10, rtol=0)
    with torch.inference_mode():
        torch.testing.assert_close(attn(q, k, v), ref, atol=1e-10, rtol=0)
    assert calls == []
    check(pattern, grid, heads=2, **options)  # with autograd: the fused kernel, and gradients
    assert calls and all(calls)


def test_large_or_masked_or_half_precision_groups_keep_the_fused_kernel(monkeypatch):
    calls = count_sdpa_calls(monkeypatch)
    with torch.no_grad():
        attn = pg.compile(pg.full(), 256, backend="sdpa", block=64)  # 256 keys per query
        attn(*qkv(256, dtype=torch.float32))
        assert calls == [True]
        attn = pg.compile(pg.window(3), (8, 8), backend="sdpa", block=16)
        attn(*qkv((8, 8), dtype=torch.float32))
        assert not all(calls)
        calls.clear()
        attn = pg.compile(pg.block(7), (14, 14), backend="sdpa")
        attn(*qkv((14, 14), dtype=torch.bfloat16))
        assert calls == [True]


def test_translation_invariant_masks_are_stored_once():
    attn = check(pg.window(32, causal=True), 512, block=64)
    shared = [g for g in attn.groups[0] if g.mask is not None and len(g.q_blocks) > 1]
    assert shared and all(g.mask.shape[0] == 1 for g in shared)


def test_queries_without_keys_output_zeros_with_finite_gradients():
    pattern, grid = pg.global_tokens([3]) & pg.window(3), 20
    attn = check(pattern, grid, block=(8, 8))
    q, k, v = qkv(grid)
    out = attn(q, k, v)
    empty = pg.materialize(pattern, grid).sum(1) == 0
    assert empty.any() and (out[:, :, torch.as_tensor(empty)] == 0).all()
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_a_pattern_without_pairs_outputs_zeros_with_gradients():
    from patterngen.ir import make_ir

    attn = pg.compile(make_ir(pg.as_grid((4, 5)), [], "nothing"), backend="sdpa")
    q, k, v = qkv((4, 5))
    out = attn(q, k, v)
    assert (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()


@pytest.mark.parametrize("dtype, atol", [(torch.float32, 2e-6), (torch.bfloat16, 3e-2),
                                         (torch.float16, 4e-3)])
def test_low_precision_dtypes_match_the_float32_oracle(dtype, atol):
    pattern, grid = pg.window(5) | pg.global_tokens([0]), (12, 10)
    attn = pg.compile(pattern, grid, backend="sdpa", block=16, dtype=str(dtype)[6:])
    q, k, v = qkv(grid, dtype=dtype)
    out = attn(q, k, v)
    ref = pg.dense_attention(*(t.float() for t in (q, k, v)), pg.materialize(pattern, grid))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)
    out.float().sum().backward()
    assert q.grad.dtype == dtype and torch.isfinite(q.grad.float()).all()


def test_gradcheck_float64():
    attn = pg.compile(pg.window(3) | pg.causal(), (3, 4), backend="sdpa", block=5)
    q, k, v = qkv((3, 4), batch=1, heads=2, dim=3)
    assert torch.autograd.gradcheck(lambda a, b, c: attn(a, b, c), (q, k, v))


def test_gridded_inputs_and_scale():
    attn = pg.compile(pg.window(3), (6, 7), backend="sdpa", scale=0.3)
    q, k, v = (t.detach().view(2, 3, 6, 7, 8) for t in qkv((6, 7)))
    out = attn(q, k, v)
    ref = pg.dense_attention(*(t.reshape(2, 3, 42, 8) for t in (q, k, v)),
                             pg.materialize(pg.window(3), (6, 7)), scale=0.3)
    assert out.shape == q.shape
    torch.testing.assert_close(out.reshape(2, 3, 42, 8), ref)


def test_masks_handed_out():
    attn = pg.compile(pg.window(5), (12, 12), backend="sdpa", block=32)
    (form,) = attn.block_sparse()
    assert form["layout"] is attn.layout and len(form["permutation"]) == 144
    assert sum(len(g.q_blocks) for g in form["groups"]) == attn.layout.q_blocks


def test_bad_inputs_are_refused_with_the_value_and_rule():
    attn = pg.compile(pg.window(3), (4, 4), backend="sdpa")
    q = torch.randn(1, 1, 16, 4, device="meta")
    with pytest.raises(pg.PatternError, match=r"sdpa: q is on device='meta'; the sdpa backend "
                                              r"runs on \('cpu', 'cuda'\)"):
        attn(q, q, q)
    q = torch.zeros(1, 1, 16, 4, dtype=torch.int32)
    with pytest.raises(pg.PatternError, match=r"sdpa: q has dtype=int32; expected one of"):
        attn(q, q, q)
    q = torch.zeros(1, 1, 15, 4)
    with pytest.raises(pg.PatternError, match=r"expected \(batch, heads, 4, 4, head_dim\)"):
        attn(q, q, q)


@pytest.mark.parametrize("options, match", [
    (dict(block=0), r"Invalid block=0; block sizes must be positive integers"),
    (dict(order="spiral"), r"Unknown order='spiral'"),
    (dict(order="tiled", tile=(3, 4)), r"tile\[0\]=3 does not divide grid\[0\]=8"),
])
def test_bad_options_are_refused(options, match):
    with pytest.raises(pg.PatternError, match=match):
        pg.compile(pg.window(3), (8, 8), backend="sdpa", **options)


def test_registered_and_capabilities():
    assert SdpaBackend.not_supported_reasons(pg.lower(pg.window(3), 8), "cuda", "bfloat16") == []
    reasons = SdpaBackend.not_supported_reasons(pg.lower(pg.window(3), "n"), "xpu", "int8")
    assert len(reasons) == 3


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_forward_and_backward(dtype):
    pattern, grid = pg.window(7) | pg.global_tokens([0]), (24, 24)
    attn = pg.compile(pattern, grid, backend="sdpa", device="cuda", dtype=str(dtype)[6:])
    q, k, v = qkv(grid, dtype=dtype, device="cuda")
    out = attn(q, k, v)
    ref = pg.dense_attention(*(t.float() for t in (q, k, v)), pg.materialize(pattern, grid))
    torch.testing.assert_close(out.float(), ref, atol=3e-2 if dtype != torch.float32 else 1e-4,
                               rtol=0)
    out.float().sum().backward()
    assert torch.isfinite(q.grad.float()).all()


@CUDA
def test_cuda_swin_mask_free():
    attn = pg.compile(pg.block(7), (56, 56), backend="sdpa", device="cuda", dtype="bfloat16")
    q, k, v = qkv((56, 56), heads=2, dtype=torch.bfloat16, device="cuda")
    torch.testing.assert_close(attn(q, k, v), swin_attention(q, k, v, (56, 56), 7))


@pytest.mark.parametrize("options, call", [
    ({}, {}),
    (dict(softcap=3.0), {}),
    ({}, dict(rel_bias=True)),
    ({}, dict(extra=2)),
    ({}, dict(kv_heads=1)),
], ids=["plain", "softcap", "bias", "extra-keys", "grouped-kv"])
def test_chunked_groups_keep_bias_softcap_extra_keys_and_kv_heads(options, call,
                                                                  monkeypatch):
    from patterngen.backends.sdpa import calls as sdpa_calls

    pattern, grid, d = pg.window(3) | pg.axis(0), (9, 10), 8
    attn = pg.compile(pattern, grid, backend="sdpa", block=16, order="row-major", **options)
    q, k, v = (t.detach() for t in qkv(grid, heads=2, dim=d))
    if call.get("kv_heads"):
        k, v = k[:, :1], v[:, :1]
    kwargs, ref_kwargs = {}, dict(options)
    if call.get("rel_bias"):
        table = torch.randn(2, *(2 * r + 1 for r in attn.reach), dtype=q.dtype)
        kwargs["rel_bias"] = ref_kwargs["rel_bias"] = table
    if call.get("extra"):
        ak, av = (torch.randn(2, 2, call["extra"], d, dtype=q.dtype) for _ in "kv")
        kwargs.update(additional_keys=ak, additional_values=av)
        ref_kwargs.update(additional_keys=ak, additional_values=av)
    with torch.no_grad():
        whole = attn(q, k, v, **kwargs)
        monkeypatch.setattr(sdpa_calls, "CHUNK_BYTES", 1)
        calls = count_sdpa_calls(monkeypatch)
        chunked = attn(q, k, v, **kwargs)
        _, lse = attn.forward_lse(q, k, v, d ** -0.5, kwargs.get("rel_bias"))
    assert len(calls) > sum(len(groups) for groups in attn.groups) or options
    torch.testing.assert_close(chunked, whole, atol=1e-12, rtol=0)
    torch.testing.assert_close(chunked, reference(pattern, grid, q, k, v, **ref_kwargs),
                               atol=1e-10, rtol=0)
    scores = (q @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2)) * d ** -0.5
    if "softcap" in options or kwargs.get("rel_bias") is not None:
        return  # the log-sum-exp of the plain scores alone is checked below
    seen = torch.as_tensor(pg.materialize(pattern, grid))
    want = torch.logsumexp(scores.masked_fill(~seen, float("-inf")), -1)
    torch.testing.assert_close(lse, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_rows_gathered_along_any_dim_are_the_same(monkeypatch, threads, layout):
    # select_rows gathers a contiguous input by one index into all its rows (dim 0, which
    # torch runs on every thread) with several threads, and along the rows with one or on
    # strided rows: the same values, written into a buffer too, and the same gradient
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    gen = torch.Generator().manual_seed(0)
    wide = 8 if layout == "contiguous" else 11
    x = torch.randn(6, 50, wide, generator=gen, dtype=torch.float64)[..., :8].requires_grad_()
    index = torch.randint(0, 50, (70,), generator=gen)  # rows repeated and left out
    dims, real = [], torch.Tensor.index_select
    monkeypatch.setattr(torch.Tensor, "index_select",
                        lambda t, dim, i: dims.append(dim) or real(t, dim, i))
    got = select_rows(x, index)
    monkeypatch.setattr(torch.Tensor, "index_select", real)
    assert dims == [0 if threads > 1 and layout == "contiguous" else 1]
    want = x.detach()[:, index]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    out = torch.empty(6 * 70 * 8, dtype=torch.float64)
    select_rows(x.detach(), index, out=out)
    torch.testing.assert_close(out.view(6, 70, 8), want, rtol=0, atol=0)
    dout = torch.randn(6, 70, 8, generator=gen, dtype=torch.float64)
    added = torch.zeros(6, 50, 8, dtype=torch.float64).index_add_(1, index, dout)
    torch.testing.assert_close(torch.autograd.grad(got, x, dout)[0], added)
    # the sdpa backend's gather of (batch, heads, tokens, d) rows, into a buffer too
    x4 = x.detach().view(2, 3, 50, 8) if layout == "contiguous" else x.detach()[None]
    torch.testing.assert_close(permute.gather(x4, index), x4[:, :, index], rtol=0, atol=0)
    permute.gather(x4, index, out)
    torch.testing.assert_close(out.view(x4.shape[:2] + (70, 8)), x4[:, :, index], rtol=0,
                               atol=0)
