"""Keys on another grid, block-sparse: layouts of query blocks against key blocks counted
exactly (against a brute-force sweep of the rule's mask), and the sdpa and flex backends
against the float64 oracle (outputs and the gradients of q, k, v)."""

import os
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from patterngen.calibrate import Rates
from patterngen.errors import PatternError
from patterngen.layout import choose_layout
from patterngen.tilechoice import cross_tiles
from oracle import assert_gradients_equal
from strategies import random_spec
from test_cross import (BACKEND_CASES, check_backend, cross_cases, key_grid_version,
                        oracle_with_queries, random_grid_pair, random_qkv)

LONG = os.environ.get("PATTERNGEN_LONG") == "1"


def brute_tiles(lay, mask):
    """``(q_blocks, kv_blocks)`` 0 empty / 1 partial / 2 full, from the whole mask."""
    bq, bk = lay.block
    m = mask[lay.permutation][:, lay.key_permutation]
    out = np.zeros((lay.q_blocks, lay.kv_blocks), dtype=np.int8)
    for i in range(lay.q_blocks):
        for j in range(lay.kv_blocks):
            tile = m[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
            out[i, j] = 2 if tile.all() else int(tile.any())
    return out


@settings(max_examples=200 if LONG else 25, deadline=None)
@given(cross_cases(max_tokens=60), st.integers(1, 9), st.integers(1, 9), st.booleans())
def test_layout_counts_tiles_exactly(case, bq, bk, tiled):
    pattern, q_shape, k_shape = case
    mask = pg.materialize(pattern, q_shape, key_grid=k_shape)
    options = dict(block=(bq, bk))
    pairs = cross_tiles(q_shape, k_shape)
    if tiled and pairs and q_shape != k_shape:  # equal grids are self-attention
        tile, key_tile = pairs[bq % len(pairs)]
        options.update(order="tiled", tile=tile, key_tile=key_tile)
    lay = pg.layout(pattern, q_shape, key_grid=k_shape, **options)
    np.testing.assert_array_equal(lay.to_dense(), brute_tiles(lay, mask))
    assert lay.attended_pairs == mask.sum()
    rows, cols, _ = lay.tiles()
    masks = lay.masks(rows, cols)
    assert masks.sum() == mask.sum()
    assert (lay.q_blocks, lay.kv_blocks) == (-(-mask.shape[0] // bq), -(-mask.shape[1] // bk))


def test_upsampling_tiles_line_the_grids_up():
    """4x upsampling: a 4x4 query tile sits over one key, so its 16 queries share their 25
    keys and every tile of that layout is full (no mask, no waste); sdpa's default is the
    band of 4 query rows over one key row (256 queries: fewer, larger problems)."""
    assert cross_tiles((64, 64), (16, 16))[:2] == [((4, 4), (1, 1)), ((4, 64), (1, 16))]
    assert cross_tiles((8, 12), (16, 24))[0] == ((1, 1), (2, 2))
    assert cross_tiles((10, 7), (6, 9)) == []
    assert cross_tiles((10, 7), (5, 9)) == [((2, 7), (1, 9))]  # a band: axis 1 whole
    lowered = pg.lower(pg.window(5), (64, 64), key_grid=(16, 16))
    exact = pg.layout(lowered, block=(16, 1), order="tiled", tile=(4, 4), key_tile=(1, 1))
    assert exact.num_partial == 0 and exact.executed_pairs == exact.attended_pairs == 4096 * 25
    assert "over keys on 16x16 (tiled 1x1)" in exact.summary()
    lay = choose_layout(lowered)
    assert (lay.block, lay.tile, lay.key_tile) == ((256, 16), (4, 64), (1, 16))
    assert (lay.permutation == np.arange(4096)).all()  # whole rows: row-major, no copy


def test_layout_of_a_large_grid_pair_counts_without_the_pair_matrix():
    """A million queries over 65536 keys (an n_q x n_k mask would be 64 GiB): counted per
    axis, exactly (a clamped 5x5 window: 25 keys for every query)."""
    lay = pg.layout(pg.window(5), (1024, 1024), key_grid=(256, 256), block=(4096, 256))
    assert lay.attended_pairs == 25 * 1024 * 1024
    assert lay.q_blocks == lay.kv_blocks == 256
    assert lay.num_full + lay.num_partial == 256 * 5  # 4 query rows over 5 key rows


def test_layout_key_tile_needs_a_key_grid():
    with pytest.raises(PatternError, match=r"layout: key_tile=\(2, 2\) without keys on another "
                                           r"grid"):
        pg.layout(pg.window(3), (8, 8), block=4, order="tiled", tile=(2, 2), key_tile=(2, 2))
    with pytest.raises(PatternError, match=r"tile\[0\]=3 does not divide grid\[0\]=4"):
        pg.layout(pg.window(3), (8, 8), key_grid=(4, 4), block=4, order="tiled",
                  key_tile=(3, 1))


# ---------------------------------------------------------------------------------------------
# sdpa


@pytest.mark.parametrize("block", [None, (4, 4), (5, 3)])
@pytest.mark.parametrize("pattern, q_shape, k_shape, heads, kv_heads", BACKEND_CASES)
def test_sdpa_forward_and_backward_equal_the_oracle(pattern, q_shape, k_shape, heads,
                                                    kv_heads, block):
    attn = pg.compile(pattern, q_shape, key_grid=k_shape, backend="sdpa", block=block)
    check_backend(attn, pattern, q_shape, k_shape, random_qkv(q_shape, k_shape, heads,
                                                               kv_heads))
    assert attn.executed_pairs == (attn.layout.executed_pairs,)


def test_sdpa_and_flex_run_a_pattern_per_head_over_a_key_grid():
    pattern = pg.heads(pg.window(3), pg.axis(1) | pg.window(3, border="pad"))
    q_shape, k_shape = (12, 8), (6, 8)
    mask = torch.as_tensor(pg.materialize(pattern, q_shape, key_grid=k_shape))
    assert mask.shape == (2, 96, 48)
    inputs = random_qkv(q_shape, k_shape, 4, 2)
    want = pg.dense_attention(*(t.reshape(2, t.shape[1], -1, 8) for t in inputs), mask)
    attn = pg.compile(pattern, q_shape, key_grid=k_shape, backend="sdpa", block=(8, 4))
    out = attn(*inputs)
    torch.testing.assert_close(out.reshape(want.shape), want)
    assert_gradients_equal(out, want, inputs, torch.Generator().manual_seed(1))
    flex = pg.compile(pattern, q_shape, key_grid=k_shape, backend="flex", compile=False,
                      block=(8, 4))
    with torch.no_grad():
        out = flex(*(t.float() for t in inputs))
    torch.testing.assert_close(out.double().reshape(want.shape), want, atol=2e-5, rtol=2e-5)


def test_sdpa_bias_table_is_indexed_by_key_minus_the_centre():
    pattern, q_shape, k_shape = pg.window(3), (16, 16), (4, 4)
    for block in (None, (8, 8)):  # every tile full / masked tiles
        attn = pg.compile(pattern, q_shape, key_grid=k_shape, backend="sdpa", softcap=3.0,
                          block=block)
        table = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
        check_backend(attn, pattern, q_shape, k_shape, random_qkv(q_shape, k_shape, 2, 2)
                      + [table], rel_bias=table)


def test_sdpa_bfloat16_and_extra_keys():
    pattern, q_shape, k_shape = BACKEND_CASES[1][:3]
    attn = pg.compile(pattern, q_shape, key_grid=k_shape, backend="sdpa", block=(4, 4))
    q, k, v = (t.detach() for t in random_qkv(q_shape, k_shape, 4, 2))
    out = attn(q.bfloat16(), k.bfloat16(), v.bfloat16())
    mask = torch.as_tensor(oracle_with_queries(pattern, q_shape, k_shape))
    want = pg.dense_attention(*(t.reshape(2, t.shape[1], -1, 8) for t in (q, k, v)), mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double().reshape(want.shape), want, atol=3e-2, rtol=3e-2)
    g = torch.Generator().manual_seed(2)
    extra = [torch.randn(2, 2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
             for _ in range(2)]
    check_backend(attn, pattern, q_shape, k_shape, random_qkv(q_shape, k_shape, 4, 2) + extra,
                  additional_keys=extra[0], additional_values=extra[1])


def test_sdpa_k_and_v_must_have_the_key_grid():
    attn = pg.compile(pg.window(3), (8, 8), key_grid=(4, 4), backend="sdpa")
    q = torch.randn(1, 2, 8, 8, 4)
    with pytest.raises(PatternError, match=r"sdpa: k has shape \(1, 2, 8, 8, 4\); the key grid "
                                           r"is 4x4 \(16 tokens\)"):
        attn(q, q, q)


def test_auto_prices_sdpa_for_a_key_grid():
    pattern, q_shape, k_shape = BACKEND_CASES[0][:3]
    plan = pg.plan(pattern, q_shape, key_grid=k_shape, rates=Rates.default())
    assert isinstance(plan.options["sdpa"], float)  # priced, not refused
    plan = pg.plan(pattern, q_shape, key_grid=k_shape, executors=["sdpa"],
                   rates=Rates.default())
    assert plan.strategy == "sdpa" and "over keys on 4x4" in str(plan)


def test_sdpa_prices_k_and_v_on_the_key_grid():
    """Zero-filled gradients, the scan for non-finite keys and the reorder copies count q and
    the output on the query grid, k and v on the key grid (here 16 times smaller)."""
    from patterngen.backends import executors
    from patterngen.call import Call

    call = Call(batch=2, heads=4, head_dim=8, backward=True)
    per = call.head_dim * call.itemsize
    ops = executors()["sdpa"].work(pg.lower(pg.window(5), (32, 32), key_grid=(8, 8)), call)
    fills = [op.count for op in ops if op.kind == "fill"]
    assert fills and all(n == 2 * (32 * 32 + 2 * 8 * 8) * 2 * 4 * per for n in fills)


def random_case(seed):
    """A random spec (valid on axes of 7 and more) on a random grid pair, often one whose
    sizes divide (so the tiles that line the grids up are tried)."""
    rng = random.Random(seed)
    ndim, q_shape, k_shape = random_grid_pair(rng)
    if seed % 3 == 0:
        q_shape = [rng.choice([2, 4]) * n for n in k_shape] if ndim < 3 else k_shape
    elif seed % 3 == 1:
        k_shape = [2 * n for n in q_shape]
    pattern = key_grid_version(random_spec(rng, ndim), k_shape)
    return rng, pattern, tuple(q_shape), tuple(k_shape)


@pytest.mark.parametrize("seed", range(30 if LONG else 4))
def test_random_sweep_sdpa_with_a_key_grid(seed):
    rng, pattern, q_shape, k_shape = random_case(seed)
    block = rng.choice([None, (rng.randint(1, 16), rng.randint(1, 16))])
    attn = pg.compile(pattern, q_shape, key_grid=k_shape, backend="sdpa", block=block)
    inputs = random_qkv(q_shape, k_shape, 2, rng.choice([1, 2]), seed=seed)
    check_backend(attn, pattern, q_shape, k_shape, inputs)


# ---------------------------------------------------------------------------------------------
# flex (CPU: forward only, eager except one compiled case; the CUDA test runs where there is one)

FLEX_OPTIONS = [dict(block=(16, 16), order="auto"), dict(block=(5, 3))]


@pytest.mark.parametrize("options", FLEX_OPTIONS)
@pytest.mark.parametrize("pattern, q_shape, k_shape, heads, kv_heads", BACKEND_CASES)
def test_flex_mask_mod_and_block_mask_follow_the_rule(pattern, q_shape, k_shape, heads,
                                                      kv_heads, options):
    from torch.nn.attention import flex_attention

    attn = pg.compile(pattern, q_shape, key_grid=k_shape, backend="flex", compile=False,
                      **options)
    lay = attn.layout
    want = oracle_with_queries(pattern, q_shape, k_shape)[lay.permutation][:, lay.key_permutation]
    qi, ki = torch.arange(lay.tokens)[:, None], torch.arange(lay.key_tokens)[None, :]
    np.testing.assert_array_equal(attn.mask_mod(0, 0, qi, ki).numpy(), want)
    ours = attn.block_mask
    ref = flex_attention.create_block_mask(attn.mask_mod, 1, 1, lay.tokens, lay.key_tokens,
                                           device="cpu", BLOCK_SIZE=lay.block)
    assert torch.equal(ours.to_dense(), ref.to_dense())
    assert ours.seq_lengths == (lay.tokens, lay.key_tokens)


def flex_check(attn, pattern, q_shape, k_shape, heads, kv_heads, atol=2e-5, **call):
    """Forward of ``attn`` in float32 against the float64 oracle (no gradients on CPU)."""
    q, k, v = (t.detach() for t in random_qkv(q_shape, k_shape, heads, kv_heads))
    with torch.no_grad():
        out = attn(q.float(), k.float(), v.float(),
                   **{n: t.float() for n, t in call.items()})
    mask = torch.as_tensor(oracle_with_queries(pattern, q_shape, k_shape))
    want = pg.dense_attention(*(t.reshape(2, t.shape[1], -1, 8) for t in (q, k, v)), mask,
                              softcap=attn.softcap, grid=q_shape, key_grid=k_shape, **call)
    torch.testing.assert_close(out.double().reshape(want.shape), want, atol=atol, rtol=atol)


@pytest.mark.parametrize("pattern, q_shape, k_shape, heads, kv_heads", BACKEND_CASES)
def test_flex_eager_forward_equals_the_oracle(pattern, q_shape, k_shape, heads, kv_heads):
    attn = pg.compile(pattern, q_shape, key_grid=k_shape, backend="flex", compile=False,
                      block=(4, 4))
    flex_check(attn, pattern, q_shape, k_shape, heads, kv_heads)


def test_flex_bias_softcap_and_extra_keys():
    pattern, q_shape, k_shape = pg.window(3), (16, 16), (4, 4)
    attn = pg.compile(pattern, q_shape, key_grid=k_shape, backend="flex", compile=False,
                      block=(16, 4), order="tiled", softcap=3.0)
    assert attn.layout.key_tile == (1, 1)  # keys permuted in their own order
    table = torch.randn(2, 5, 5, dtype=torch.float64)
    flex_check(attn, pattern, q_shape, k_shape, 2, 2, rel_bias=table)
    extra = [torch.randn(2, 2, 3, 8, dtype=torch.float64) for _ in range(2)]
    flex_check(attn, pattern, q_shape, k_shape, 2, 2, additional_keys=extra[0],
               additional_values=extra[1])


def test_flex_compiled_cpu_forward_equals_the_oracle():
    pattern, q_shape, k_shape, heads, kv_heads = BACKEND_CASES[0]
    attn = pg.compile(pattern, q_shape, key_grid=k_shape, backend="flex", block=(16, 16))
    flex_check(attn, pattern, q_shape, k_shape, heads, kv_heads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_flex_cuda_forward_and_backward_with_a_key_grid():
    pattern, q_shape, k_shape = pg.window(5) | pg.global_tokens(keys=[0]), (64, 64), (16, 16)
    attn = pg.compile(pattern, q_shape, key_grid=k_shape, backend="flex", device="cuda",
                      block=64, order="auto")
    q, k, v = (t.float().cuda().requires_grad_()
               for t in (t.detach() for t in random_qkv(q_shape, k_shape, 2, 2)))
    out = attn(q, k, v)
    mask = torch.as_tensor(oracle_with_queries(pattern, q_shape, k_shape), device="cuda")
    want = pg.dense_attention(*(t.reshape(2, 2, -1, 8) for t in (q, k, v)), mask)
    torch.testing.assert_close(out.reshape(want.shape), want, atol=1e-4, rtol=0)
    for a, b in zip(torch.autograd.grad(out.sum(), (q, k, v)),
                    torch.autograd.grad(want.sum(), (q, k, v))):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=0)
