"""Queries on one grid, keys on another: every layer against the rule's oracle.

The rule: per axis the query at ``x`` sits over ``c(x) = floor((x + 0.5) * n_k / n_q)``
(torch's ``interpolate(mode="nearest-exact")``) and sees exactly the keys the same pattern
gives the query ``c(x)`` on the key grid. The oracle is therefore row ``c(x)`` of the
self-attention mask on the key grid, and ``c`` is read from torch itself.
"""

import dataclasses
import itertools
import os
import random

import numba
import numpy as np
import pytest
import sympy
import torch
from hypothesis import given
from hypothesis import strategies as st

import patterngen as pg
from patterngen import spec as pgspec
from patterngen.calibrate import Rates
from patterngen.errors import PatternError
from patterngen.parse import parse
from oracle import assert_gradients_equal
from strategies import grids, patterns, random_spec


def centres(n_q, n_k):
    """``c(x)`` for every query coordinate, from torch's nearest-exact interpolation."""
    keys = torch.arange(n_k, dtype=torch.float64).reshape(1, 1, n_k)
    return torch.nn.functional.interpolate(keys, size=n_q, mode="nearest-exact")[0, 0].long()


def centre_rows(q_shape, k_shape):
    """The flat key-grid token each query token sits over, row-major."""
    per_axis = [centres(n, m).numpy() for n, m in zip(q_shape, k_shape)]
    grids_ = np.meshgrid(*per_axis, indexing="ij")
    return np.ravel_multi_index([g.ravel() for g in grids_], k_shape)


def oracle(pattern, q_shape, k_shape):
    """Row ``c(x)`` of the self-attention mask on the key grid, for every query ``x``."""
    return pg.materialize(pattern, k_shape)[centre_rows(q_shape, k_shape)]


def key_grid_version(pattern, k_shape):
    """The same pattern made valid on the key grid: global tokens as key tokens, blocks no
    larger than the key grid."""
    if isinstance(pattern, (pgspec.Union, pgspec.Intersection)):
        return type(pattern)(tuple(key_grid_version(p, k_shape) for p in pattern.parts))
    if isinstance(pattern, pgspec.GlobalTokens):
        return pg.global_tokens(keys=list(pattern.tokens))
    if isinstance(pattern, pgspec.Block):
        sizes = pattern.size if isinstance(pattern.size, tuple) else (pattern.size,) * len(
            k_shape)
        offsets = pattern.offset if isinstance(pattern.offset, tuple) else (
            pattern.offset,) * len(k_shape)
        sizes = tuple(min(m, n) for m, n in zip(sizes, k_shape))
        return pg.block(sizes, offset=tuple(s % m for s, m in zip(offsets, sizes)))
    return pattern


@st.composite
def cross_cases(draw, max_tokens=120):
    """``(pattern, query shape, key shape)``: ratios up, down and not integers."""
    k_shape = draw(grids(max_tokens))
    limit = {1: 40, 2: 12, 3: 6}[len(k_shape)]
    q_shape = tuple(draw(st.integers(1, limit)) for _ in k_shape)
    return key_grid_version(draw(patterns(k_shape)), k_shape), q_shape, k_shape


def test_centre_is_nearest_exact():
    for n_q, n_k in itertools.product(range(1, 20), range(1, 20)):
        x = np.arange(n_q)
        np.testing.assert_array_equal(pg.ir.center(x, n_q, n_k), centres(n_q, n_k).numpy())


@given(cross_cases())
def test_materialize_is_the_key_grid_row_of_each_query(case):
    pattern, q_shape, k_shape = case
    mask = pg.materialize(pattern, q_shape, key_grid=k_shape)
    np.testing.assert_array_equal(mask, oracle(pattern, q_shape, k_shape))
    lowered = pg.lower(pattern, q_shape, key_grid=k_shape)
    np.testing.assert_array_equal(lowered.key_counts(), mask.sum(1))
    assert lowered.pairs() == mask.sum()


@pytest.mark.parametrize("pattern", [
    pg.window(3), pg.window(2, border="pad"), pg.window(3, dilation=2),
    pg.window(3, causal=True), pg.window(4, stride=2), pg.block(3, offset=1), pg.area(2),
    pg.axis(0), pg.stripe(1, width=2), pg.criss_cross(), pg.causal(),
    pg.window(3) | pg.axis(1), pg.window(5) & pg.block(4),
])
@pytest.mark.parametrize("q_shape, k_shape", [
    ((12, 8), (6, 8)), ((4, 6), (8, 12)), ((10, 7), (6, 9)), ((7, 7), (7, 6))])
def test_every_primitive_follows_the_rule(pattern, q_shape, k_shape):
    np.testing.assert_array_equal(pg.materialize(pattern, q_shape, key_grid=k_shape),
                                  oracle(pattern, q_shape, k_shape))


@pytest.mark.parametrize("q_shape, k_shape", [((9,), (4,)), ((5, 3, 4), (2, 3, 8))])
def test_one_and_three_axes(q_shape, k_shape):
    pattern = pg.window(2, border="pad") | pg.block(2)
    np.testing.assert_array_equal(pg.materialize(pattern, q_shape, key_grid=k_shape),
                                  oracle(pattern, q_shape, k_shape))


def test_key_grid_equal_to_grid_is_self_attention():
    pattern = pg.window(3) | pg.global_tokens([0, 5])
    assert pg.lower(pattern, (6, 6), key_grid=(6, 6)) == pg.lower(pattern, (6, 6))
    assert pg.lower(pattern, (6, 6), key_grid=(6, 6)).key_grid is None


def test_global_tokens_name_keys_and_queries_on_their_own_grids():
    pattern = pg.window(3) | pg.global_tokens(keys=[(1, 2)], queries=[(0, 0), 7])
    q_shape, k_shape = (3, 5), (4, 4)
    mask = pg.materialize(pattern, q_shape, key_grid=k_shape)
    want = oracle(pg.window(3), q_shape, k_shape)
    want[:, 1 * 4 + 2] = True  # key token (1, 2) of the 4x4 key grid
    want[[0, 7]] = True  # query tokens (0, 0) and 7 = (1, 2) of the 3x5 query grid
    np.testing.assert_array_equal(mask, want)
    assert pg.lower(pattern, q_shape, key_grid=k_shape).pairs() == want.sum()


def test_global_tokens_roles_on_one_grid():
    both = pg.materialize(pg.global_tokens([3]), 6)
    apart = pg.materialize(pg.global_tokens(keys=[3]) | pg.global_tokens(queries=[3]), 6)
    np.testing.assert_array_equal(both, apart)
    assert parse(repr(pg.global_tokens(keys=[1], queries=[(0, 2)]))) == \
        pg.global_tokens(keys=[1], queries=[(0, 2)])


def test_show_draws_the_key_grid_with_the_centre():
    text = pg.show(pg.window(3), grid=(8, 8), key_grid=(4, 4), query=(5, 2))
    assert text.splitlines() == [
        "window(3) on grid 8x8, keys on 4x4, query (5, 2) over key (2, 1): 9 keys; "
        "pattern density 56.2%",
        ". . . .",
        "# # # .",
        "# C # .",
        "# # # .",
    ]
    # 4x downsampled keys, a block tile: query (1,) sits over key 0 of 3, tile [0, 2)
    assert pg.show(pg.block(2), grid=12, key_grid=3, query=1).splitlines()[1] == "C # ."
    # the centre is marked even where the query does not see it (global query tokens only)
    assert pg.show(pg.global_tokens(keys=[2]), grid=4, key_grid=8, query=1).splitlines()[
        1] == ". . # C . . . ."


def test_ir_repr_and_verify():
    lowered = pg.lower(pg.window(3), (8, 8), key_grid=(4, 4))
    assert "over keys on 4x4" in repr(lowered)
    bad = dataclasses.replace(lowered, key_grid=pg.grid.as_grid((4, 4, 4)))
    with pytest.raises(PatternError, match=r"key grid 4x4x4 \(rank 3\)"):
        pg.ir.verify(bad)


# ---------------------------------------------------------------------------------------------
# bad input


def test_key_grid_of_another_rank():
    with pytest.raises(PatternError, match=r"key_grid=4x4x4 has rank 3 and grid=8x8 rank 2"):
        pg.lower(pg.window(3), (8, 8), key_grid=(4, 4, 4))
    with pytest.raises(PatternError, match=r"key_grid=16 has rank 1"):
        pg.materialize(pg.window(3), (8, 8), key_grid=16)


def test_block_larger_than_the_key_grid():
    with pytest.raises(PatternError, match=r"block\(size=8\) tiles the key grid, in key units: "
                                           r"no tile of 8 exists on key_grid\[0\]=4 "
                                           r"\(queries on grid\[0\]=32\)"):
        pg.lower(pg.block(8), (32, 32), key_grid=(4, 4))


def test_area_whose_chunks_do_not_exist_on_the_key_grid():
    with pytest.raises(PatternError, match=r"area\(areas=4\).*grid\[1\]=6.*key grid 6x6"):
        pg.lower(pg.area(4, axis=1), (12, 12), key_grid=(6, 6))


def test_window_larger_than_the_key_grid():
    with pytest.raises(PatternError, match=r"window\(size=5, dilation=1\) counts keys of the key "
                                           r"grid: it does not fit key_grid\[0\]=4 \(queries on "
                                           r"grid\[0\]=16\); expected size \* dilation <= 4"):
        pg.lower(pg.window(5), (16, 16), key_grid=(4, 4))


def test_global_tokens_without_roles_on_two_grids():
    with pytest.raises(PatternError, match=r"global_tokens\(\[0\]\) names tokens of one grid.*"
                                           r"expected global_tokens\(keys=\[...\], queries="):
        pg.lower(pg.global_tokens([0]), (8, 8), key_grid=(4, 4))
    with pytest.raises(PatternError,
                       match=r"Global token index 20 is out of range for grid \(4, 4\); "
                             r"expected 0 <= index < 16"):
        pg.lower(pg.global_tokens(keys=[20]), (8, 8), key_grid=(4, 4))
    with pytest.raises(PatternError, match=r"also given keys= or queries="):
        pg.global_tokens([0], keys=[1])


# ---------------------------------------------------------------------------------------------
# exact cost


SYMBOLIC = [
    (pg.window(5), ("H", "W"), ("h", "w")),
    (pg.window(4, border="pad"), ("H", "W"), ("h", "w")),
    (pg.window(3, causal=True), ("N",), ("n",)),
    (pg.window(3, dilation=2, border="pad"), ("N",), ("n",)),
    (pg.block(3, offset=1), ("H", "W"), ("h", "w")),
    (pg.block((2, 4)) | pg.axis(1), ("H", "W"), ("h", "w")),
    (pg.window(3, border="pad") | pg.global_tokens(keys=[(0, 1)], queries=[(1, 0)]),
     ("H", "W"), ("h", "w")),
    (pg.window(3) & pg.causal(), ("T", "H", "W"), ("t", "h", "w")),
]


@pytest.mark.parametrize("pattern, grid, key_grid", SYMBOLIC)
def test_symbolic_cost_equals_enumeration(pattern, grid, key_grid):
    report = pg.cost(pattern, grid=grid, key_grid=key_grid, head_dim="d", heads=2, kv_heads=1)
    rng = np.random.default_rng(len(repr(pattern)))
    limit = {1: 40, 2: 11, 3: 6}[len(grid)]
    for _ in range(6):  # ratios up, down and not integers
        q_shape = tuple(int(v) for v in rng.integers(6, limit + 1, len(grid)))
        k_shape = tuple(int(v) for v in rng.integers(6, limit + 1, len(grid)))
        sizes = dict(zip(grid + key_grid, q_shape + k_shape), d=8)
        got = report.subs(**sizes)
        mask = oracle_with_queries(pattern, q_shape, k_shape)
        assert got.pairs == mask.sum(), sizes
        assert (got.keys_min, got.keys_max) == (mask.sum(1).min(), mask.sum(1).max()), sizes
        tq, tk = mask.shape
        assert got.flops == 4 * 8 * 2 * mask.sum()
        assert got.bytes == 2 * 8 * 4 * (2 * tq + 1 * tk)  # Q, O on the queries; K, V on keys
        assert got.dense_pairs == tq * tk


def oracle_with_queries(pattern, q_shape, k_shape):
    """:func:`oracle`, with the query-grid tokens of ``global_tokens(queries=...)`` set."""
    parts = pattern.parts if isinstance(pattern, pgspec.Union) else (pattern,)
    rows = [p for p in parts if isinstance(p, pgspec.GlobalTokens) and p.queries]
    rest = [p for p in parts if p not in rows]
    for p in rows:
        if p.keys:
            rest.append(pg.global_tokens(keys=list(p.keys)))
    mask = oracle(pgspec.Union(tuple(rest)) if len(rest) > 1 else rest[0], q_shape, k_shape)
    for p in rows:
        for t in p.queries:
            flat = np.ravel_multi_index(t, q_shape) if isinstance(t, tuple) else t
            mask[flat] = True
    return mask


def test_closed_forms_are_differences_of_ceilings():
    report = pg.cost(pg.window(5, border="pad"), grid=("H", "W"), key_grid=("h", "w"))
    assert report.closed_form and "ceiling" in str(report.pairs)
    assert pg.cost(pg.window(5), grid=("H", "W"), key_grid=("h", "w"),
                   head_dim="d").flops == 100 * pg.grid.symbol("H") * pg.grid.symbol(
        "W") * pg.grid.symbol("d")
    assert "over keys on hxw" in str(report)


@given(cross_cases())
def test_numeric_cost_equals_enumeration(case):
    pattern, q_shape, k_shape = case
    mask = oracle(pattern, q_shape, k_shape)
    report = pg.cost(pattern, grid=q_shape, key_grid=k_shape)
    assert report.pairs == mask.sum()
    assert report.keys_min == mask.sum(1).min() and report.keys_max == mask.sum(1).max()


def test_cost_block_counts_the_cross_layouts_tiles():
    rep = pg.cost(pg.window(3), grid=(8, 8), key_grid=(4, 4), block=(16, 4))
    for name in ("row-major", "tiled"):
        lay = pg.layout(pg.window(3), (8, 8), key_grid=(4, 4), block=(16, 4), order=name)
        assert rep.executed_by_order[lay.order] == lay.executed_pairs
    # the row-major tiles counted from the materialised mask: 4 query blocks x 4 key blocks
    mask = pg.materialize(pg.window(3), (8, 8), key_grid=(4, 4))
    live = mask.reshape(4, 16, 4, 4).any(axis=(1, 3)).sum()
    assert rep.executed_by_order["row-major"] == live * 16 * 4
    assert rep.executed_pairs == min(rep.executed_by_order.values())
    assert rep.waste == sympy.Rational(int(rep.executed_pairs), int(mask.sum()))


def test_cost_refuses_ranks_with_a_key_grid():
    with pytest.raises(PatternError, match=r"ranks= is not supported with keys on another grid "
                                           r"\(key_grid=4x4\); got ranks=2"):
        pg.cost(pg.window(3), grid=(8, 8), key_grid=(4, 4), ranks=2)


# ---------------------------------------------------------------------------------------------
# backends against the float64 oracle


BACKEND_CASES = [  # (pattern, query grid, key grid, q heads, kv heads)
    (pg.window(3), (16, 16), (4, 4), 2, 2),  # 4x upsampling
    (pg.window(3, border="pad") | pg.axis(1), (7, 5), (6, 9), 4, 2),  # up and down, not integer
    (pg.window(4, dilation=2, causal=True), (11,), (25,), 2, 1),  # keys larger than queries
    (pg.block(2, offset=1) | pg.global_tokens(keys=[3], queries=[(0, 1, 2)]), (3, 4, 5),
     (2, 6, 3), 2, 2),
]


def random_qkv(q_shape, k_shape, heads, kv_heads, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, heads, *q_shape, dim, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, kv_heads, *k_shape, dim, generator=g, dtype=torch.float64)
            for _ in range(2))
    return [t.requires_grad_() for t in (q, k, v)]


def check_backend(attn, pattern, q_shape, k_shape, inputs, atol=1e-10, **call):
    """Output and every gradient of ``attn`` against the dense oracle on the rule's mask."""
    q, k, v = inputs[:3]
    out = attn(q, k, v, **call)
    assert out.shape == q.shape
    flat = [t.reshape(2, t.shape[1], -1, t.shape[-1]) for t in (q, k, v)]
    mask = torch.as_tensor(oracle_with_queries(pattern, q_shape, k_shape))
    extra = {name: call[name] for name in ("additional_keys", "additional_values")
             if name in call}
    want = pg.dense_attention(*flat, mask, softcap=getattr(attn, "softcap", None),
                              rel_bias=call.get("rel_bias"), grid=q_shape, key_grid=k_shape,
                              **extra)
    torch.testing.assert_close(out.reshape(want.shape), want, atol=atol, rtol=atol)
    assert_gradients_equal(out, want, inputs, torch.Generator().manual_seed(1),
                           names="q k v".split() + [n for n in call if call[n] is not None])


@pytest.mark.parametrize("pattern, q_shape, k_shape, heads, kv_heads", BACKEND_CASES)
def test_numba_forward_and_backward_equal_the_oracle(pattern, q_shape, k_shape, heads,
                                                     kv_heads):
    attn = pg.compile(pattern, q_shape, key_grid=k_shape, backend="numba")
    inputs = random_qkv(q_shape, k_shape, heads, kv_heads)
    check_backend(attn, pattern, q_shape, k_shape, inputs)


def test_numba_bias_table_is_indexed_by_key_minus_the_centre():
    pattern, q_shape, k_shape = pg.window(3), (16, 16), (4, 4)
    attn = pg.compile(pattern, q_shape, key_grid=k_shape, backend="numba", softcap=3.0)
    assert attn.reach == (2, 2)  # clamped at the borders: key - c(x) reaches 2
    table = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    inputs = random_qkv(q_shape, k_shape, 2, 2)
    check_backend(attn, pattern, q_shape, k_shape, inputs + [table], rel_bias=table)


def test_numba_bfloat16_and_extra_keys():
    pattern, q_shape, k_shape = BACKEND_CASES[1][:3]
    attn = pg.compile(pattern, q_shape, key_grid=k_shape, backend="numba")
    q, k, v = (t.detach() for t in random_qkv(q_shape, k_shape, 4, 2))
    out = attn(q.bfloat16(), k.bfloat16(), v.bfloat16())
    want = pg.dense_attention(*(t.reshape(2, t.shape[1], -1, 8) for t in (q, k, v)),
                              torch.as_tensor(oracle(pattern, q_shape, k_shape)))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double().reshape(want.shape), want, atol=3e-2, rtol=3e-2)
    g = torch.Generator().manual_seed(2)
    extra = [torch.randn(2, 2, 3, 8, generator=g, dtype=torch.float64, requires_grad=True)
             for _ in range(2)]
    inputs = random_qkv(q_shape, k_shape, 4, 2)
    check_backend(attn, pattern, q_shape, k_shape, inputs + extra,
                  additional_keys=extra[0], additional_values=extra[1])


def test_auto_runs_a_key_grid_on_numba_and_says_so():
    pattern, q_shape, k_shape, heads, kv_heads = BACKEND_CASES[0]
    attn = pg.compile(pattern, q_shape, key_grid=k_shape, rates=Rates.default(),
                      dtype="float64", backward=True)
    check_backend(attn, pattern, q_shape, k_shape, random_qkv(q_shape, k_shape, heads,
                                                               kv_heads))
    text = str(attn.plan)
    assert "over keys on 4x4 (all terms gathered)" in text


def test_distributed_refuses_a_key_grid():
    import patterngen.distributed as dist

    with pytest.raises(PatternError, match=r"patterngen.distributed.compile: keys on another "
                                           r"grid \(key_grid=4x4"):
        dist.compile(pg.window(3), grid=(8, 8), key_grid=(4, 4))


def test_k_and_v_must_have_the_key_grid():
    attn = pg.compile(pg.window(3), (8, 8), key_grid=(4, 4), backend="numba")
    q = torch.randn(1, 2, 8, 8, 4)
    with pytest.raises(PatternError, match=r"numba: k has shape \(1, 2, 8, 8, 4\); the key grid "
                                           r"is 4x4 \(16 tokens\), so expected \(batch, heads, "
                                           r"4, 4, head_dim\) or \(batch, heads, 16, head_dim\)"):
        attn(q, q, q)
    k = torch.randn(1, 2, 16, 4)
    with pytest.raises(PatternError, match=r"numba: q has shape \(1, 2, 16, 4\); the query grid "
                                           r"is 8x8 \(64 tokens\)"):
        attn(k, k, k)
    assert attn(q, k, k).shape == q.shape


@pytest.mark.parametrize("case, lanes", [(0, 0), (1, 4)])  # case 0 alone takes 8 lanes
def test_numba_tiles_of_queries_with_a_key_grid(case, lanes):
    """Lanes share each loaded key among consecutive queries (4x upsampling: four queries
    over one key coordinate); one query at a time gives the same result."""
    pattern, q_shape, k_shape, heads, kv_heads = BACKEND_CASES[case]
    attn = pg.compile(pattern, q_shape, key_grid=k_shape, backend="numba", lanes=lanes)
    assert attn.lanes == lanes
    check_backend(attn, pattern, q_shape, k_shape, random_qkv(q_shape, k_shape, heads, kv_heads))


@pytest.mark.parametrize("pattern, q_shape, k_shape, lanes, groups", [
    (pg.window(3), (16, 16), (4, 4), None, (2,)),  # 8 lanes over two key columns, 2 rows
    (pg.window(5), (32, 24), (8, 6), 4, (4,)),  # 4x upsampling: 4x4 queries over one key
    (pg.window(3), (8, 6, 10), (4, 3, 5), 2, (4, 2)),
    (pg.window(3) | pg.axis(1), (16, 16), (8, 8), 2, (2,)),
    (pg.window(3), (12, 10), (5, 5), 2, ()),  # uneven runs of rows over one key row
])
def test_numba_tiles_spanning_rows_over_one_key_row(pattern, q_shape, k_shape, lanes, groups):
    """A tile spans the rows of every axis but the last whose keys coincide; its queries,
    read and written through their indices, have exactly the same keys on those axes."""
    attn = pg.compile(pattern, q_shape, key_grid=k_shape, backend="numba", lanes=lanes)
    assert attn.groups == groups
    if groups:
        mask = oracle_with_queries(pattern, q_shape, k_shape).reshape(*q_shape, -1)
        runs = mask.reshape(*(x for n, g in zip(q_shape, groups) for x in (n // g, g)),
                            *mask.shape[len(groups):])
        for a in range(len(groups)):
            assert (runs == runs.take([0], axis=2 * a + 1)).all()
    if isinstance(pattern, pgspec.Window):  # one term: a tile visits each key row it holds
        spans = groups or (1,) * (len(q_shape) - 1)
        mask = oracle_with_queries(pattern, q_shape, k_shape).reshape(*q_shape, *k_shape)
        tiles = itertools.product(*(range(0, n, g) for n, g in zip(q_shape, spans)),
                                  range(0, q_shape[-1], attn.lanes))
        rows = sum(int(mask[tuple(slice(i, i + g) for i, g in zip(
            start, (*spans, attn.lanes)))].any(axis=tuple(range(len(q_shape))) + (-1,)).sum())
                   for start in tiles)
        assert attn.executed_rows == (rows,)
    check_backend(attn, pattern, q_shape, k_shape, random_qkv(q_shape, k_shape, 2, 1, seed=3))


def test_numba_tiles_spanning_rows_are_priced_as_their_own_lane_plan():
    """4x upsampling: tiles of 4 lanes span 4 rows over one key row. The planner prices them
    as ``span`` on the pairs each tile computes (every lane over the tile's union of keys),
    its queries and its key rows, walked off the mask tile by tile; with a bias table the
    kernels run tiles of one row, priced as ``tiles``."""
    from patterngen.backends import executors
    from patterngen.call import Call

    pattern, q_shape, k_shape = pg.window(5), (32, 24), (8, 6)
    attn = pg.compile(pattern, q_shape, key_grid=k_shape, backend="numba")
    assert (attn.lanes, attn.groups) == (4, (4,))
    mask = oracle(pattern, q_shape, k_shape).reshape(*q_shape, *k_shape)
    pairs = rows = 0
    for i, j in itertools.product(range(0, 32, 4), range(0, 24, 4)):
        union = mask[i:i + 4, j:j + 4].any(axis=(0, 1))
        pairs, rows = pairs + 16 * int(union.sum()), rows + int(union.any(axis=1).sum())
    lowered = pg.lower(pattern, q_shape, key_grid=k_shape)
    numba = executors()["numba"]
    ops = {op.kind: op for op in numba.work(lowered, Call(batch=2, heads=3, head_dim=64))}
    assert {op.kernel for kind, op in ops.items() if kind != "launch"} == {"span"}
    assert [ops[k].count for k in ("numba", "queries", "rows", "loose")] == [
        6 * pairs, 6 * 32 * 24, 6 * rows, 0]
    biased = numba.work(lowered, Call(batch=2, heads=3, head_dim=64, bias=True))
    assert {op.kernel for op in biased if op.kind != "launch"} == {"tiles"}


def test_the_calibration_measures_tiles_spanning_rows_where_it_says():
    """The calibration's key-grid patterns run tiles spanning rows (else their times would be
    fitted as ``span`` rates for another loop), at ratios 4 and 2, and at each head_dim with
    more than two of them their points tell pairs, queries and key rows apart."""
    from patterngen import calibrate
    from patterngen.backends.numba.counts import kernel_counts

    points, ratios = {}, set()
    for lanes, (kind, *args), grid, key_grid, dims in calibrate.NUMBA_CASES:
        if key_grid is None:
            continue
        attn = pg.compile(getattr(pg, kind)(*args), grid, key_grid=key_grid, backend="numba",
                          lanes=lanes)
        assert attn.groups, (kind, args, grid, key_grid)
        ratios.add(grid[0] // key_grid[0])
        [c] = kernel_counts(attn.ir, attn.shape, attn.lanes, attn.shared, attn.groups)
        for d in dims:
            points.setdefault(d, []).append((sum(attn.executed_pairs) * d, c.queries, c.rows))
    assert ratios == {2, 4}
    assert all(np.linalg.matrix_rank(np.array(p) / np.max(p, axis=0)) == 3
               for p in points.values() if len(p) > 2)


def test_auto_runs_4x_upsampling_on_numba_at_the_span_rates():
    """The numba prediction for 4x upsampling (window(5), 64x64 over 16x16, head_dim 64) is
    its span counts at the span rates, whatever the other tiles cost; at rates like this
    machine's the planner runs it on numba."""
    from patterngen.calibrate import Rate

    table = dict(Rates.default().executors)
    span = {"numba": 0.05, "queries": 40.0, "rows": 20.0, "loose": 1.0}
    table.update({f"{what}/span/d64": Rate(0.0, ns, 3.0) for what, ns in span.items()})
    table["launch/numba"] = Rate(0.1, 0.0, 3.0)
    heads, tiles = 4, 64 // 4 * 64 // 4
    want = (0.1 + heads * 1e-6 * (102400 * 64 * span["numba"] + 4096 * span["queries"]
                                  + 5 * tiles * span["rows"]))
    plan = pg.plan(pg.window(5), (64, 64), key_grid=(16, 16), head_dim=64, heads=heads,
                   rates=Rates(table))
    assert plan.options["numba"] == pytest.approx(want)
    assert plan.strategy == "numba"
    dear = {n: Rate(0.0, 1e3, 3.0) for n in table if "/tiles/" in n or "/one/" in n}
    again = pg.plan(pg.window(5), (64, 64), key_grid=(16, 16), head_dim=64, heads=heads,
                    rates=Rates(table | dear), executors=("numba",))
    assert again.options["numba"] == pytest.approx(want)


@pytest.mark.parametrize("pattern, q_shape, k_shape, lanes, softcap", [
    (pg.window(5), (32, 24), (8, 6), 4, None),  # 4x upsampling: each tile's lanes, one key set
    (pg.window(5), (32, 32), (8, 8), 8, 2.5),  # lanes over two key columns: masked, capped
    (pg.window(3), (16, 16), (8, 8), 8, None),  # the window run lane by lane in such tiles
])
def test_numba_tiles_spanning_rows_in_float32(pattern, q_shape, k_shape, lanes, softcap):
    """The float32 kernels of tiles spanning rows (their chunk key-major, unmasked where the
    lanes' keys coincide) at a head_dim they are compiled for, against the oracle."""
    attn = pg.compile(pattern, q_shape, key_grid=k_shape, backend="numba", lanes=lanes,
                      softcap=softcap)
    assert attn.groups
    inputs = [t.detach().float().requires_grad_()
              for t in random_qkv(q_shape, k_shape, 2, 1, dim=64, seed=5)]
    check_backend(attn, pattern, q_shape, k_shape, inputs, atol=2e-5)


@pytest.mark.parametrize("dtype, bits, rtol", [(np.float32, np.int32, 2e-6),
                                               (np.float64, np.int64, 1e-15)])
def test_numba_tile_exponentials_match_numpy(dtype, bits, rtol):
    """A tile's rows in one call, each shifted by its top (a ``-inf`` top by 0); keys past
    ``cnt`` untouched."""
    from patterngen.backends.numba import runtime

    @numba.njit
    def tile_exp(x, bits, cnt, tops):
        runtime.tile_exp_shifted(x, bits, cnt, tops)

    rng = np.random.default_rng(0)
    x = rng.uniform(-20, 0, (5, 40)).astype(dtype)
    x[2, :] = -np.inf
    tops = np.array([0.75, -3.0, -np.inf, 0.0, 1e-30], dtype=dtype)
    want = np.exp(x.astype(np.float64) - np.where(tops > -np.inf, tops, 0.0)[:, None])
    got = x.copy()
    tile_exp(got, np.empty(40, bits), 37, tops)
    np.testing.assert_allclose(got[:, :37], want[:, :37], rtol=rtol, atol=1e-38)
    assert (got[2, :37] == 0).all()
    np.testing.assert_array_equal(got[:, 37:], x[:, 37:])


def test_numba_generate_refuses_rows_in_a_tile_without_a_key_grid():
    with pytest.raises(PatternError, match=r"numba: groups=\(2,\); expected \(\) or, with "
                                           r"lanes and a key grid and without a bias table"):
        pg.backends.numba.generate(pg.lower(pg.window(3), (8, 8)), lanes=4, groups=(2,))

# ---------------------------------------------------------------------------------------------
# the layer


def test_local_cross_attention_equals_its_projections_around_the_oracle():
    torch.manual_seed(0)
    layer = pg.nn.LocalCrossAttention(16, 4, pg.window(3), grid=(8, 8), key_grid=(4, 4),
                                      context_dim=8, backend="numba", kv_heads=2).double()
    x = torch.randn(2, 8, 8, 16, dtype=torch.float64, requires_grad=True)
    context = torch.randn(2, 16, 8, dtype=torch.float64, requires_grad=True)  # flat key grid
    out = layer(x, context)
    q = layer.q(x.reshape(2, 64, 16)).reshape(2, 64, 4, 4).transpose(1, 2)
    k, v = layer.kv(context).reshape(2, 16, 4, 4).transpose(1, 2).split(2, 1)
    mask = torch.as_tensor(oracle(pg.window(3), (8, 8), (4, 4)))
    att = pg.dense_attention(q, k, v, mask)
    want = layer.proj(att.transpose(1, 2).reshape(2, 64, 16)).reshape(x.shape)
    torch.testing.assert_close(out, want)
    assert_gradients_equal(out, want, [x, context], torch.Generator().manual_seed(0),
                           names=["x", "context"])
    assert "key_grid=(4, 4), context_dim=8" in repr(layer)


def test_local_cross_attention_bad_input():
    layer = pg.nn.LocalCrossAttention(16, 4, pg.window(3), grid=(8, 8), key_grid=(4, 4))
    with pytest.raises(PatternError, match=r"context.shape=\(1, 5, 5, 16\) does not match its "
                                           r"grid \(4, 4\)"):
        layer(torch.randn(1, 8, 8, 16), torch.randn(1, 5, 5, 16))
    with pytest.raises(PatternError, match=r"x has batch 2 and context 1"):
        layer(torch.randn(2, 8, 8, 16), torch.randn(1, 4, 4, 16))
    with pytest.raises(PatternError, match=r"dim must be a multiple of heads and heads of "
                                           r"kv_heads: dim=16, heads=4, kv_heads=3"):
        pg.nn.LocalCrossAttention(16, 4, pg.window(3), kv_heads=3)


def random_grid_pair(rng) -> tuple[int, list, list]:
    """``(ndim, query grid, key grid)``: 1-3 axes of 7 or more (up to 20 in 1-D, 9 else),
    where the random specs of ``strategies.random_spec`` are valid."""
    ndim = rng.randint(1, 3)
    top = 20 if ndim == 1 else 9
    q_shape, k_shape = ([rng.randint(7, top) for _ in range(ndim)] for _ in range(2))
    return ndim, q_shape, k_shape


@pytest.mark.skipif(os.environ.get("PATTERNGEN_LONG") != "1",
                    reason="long random sweep: set PATTERNGEN_LONG=1")
@pytest.mark.parametrize("seed", range(30))
def test_random_sweep_numba_with_a_key_grid(seed):
    """Random specs (valid on axes of 7 and more) on random grid pairs, in tiles or not."""
    rng = random.Random(seed)
    ndim, q_shape, k_shape = random_grid_pair(rng)
    q_shape[-1] = rng.choice([q_shape[-1], 2 * k_shape[-1], 4 * k_shape[-1]])  # tiles share
    if ndim > 1:  # tiles span rows
        q_shape[0] = rng.choice([q_shape[0], 2 * k_shape[0]])
    pattern = key_grid_version(random_spec(rng, ndim), k_shape)
    lanes = rng.choice([0, 2, 4]) if seed % 2 else None
    attn = pg.compile(pattern, tuple(q_shape), key_grid=tuple(k_shape), backend="numba",
                      lanes=lanes)
    inputs = random_qkv(tuple(q_shape), tuple(k_shape), 2, rng.choice([1, 2]), seed=seed)
    check_backend(attn, pattern, tuple(q_shape), tuple(k_shape), inputs)
