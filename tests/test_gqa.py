"""Grouped key/value heads (GQA, MQA): k and v with ``kv_heads`` heads dividing q's, query head
``h`` reading kv head ``h // (heads // kv_heads)`` (torch's ``enable_gqa``), on every backend
and executor against the oracle with k and v repeated per group (outputs and gradients, dk and
dv summed over their groups); the custom ops; the cost report; clear errors."""

import functools

import pytest
import torch

import patterngen as pg
from patterngen import backends
from oracle import assert_gradients_equal, reference

GRID = (6, 5)
CASES = [
    pg.window(3) | pg.axis(0),           # a gather term and a dense term
    pg.area(1),                          # one 30-key dense problem
    pg.criss_cross() | pg.global_tokens([(2, 2)]),
    # per-head patterns: with 6 heads over 2 kv heads (groups of 3) and 2 patterns, a
    # pattern's heads read kv heads 0, 0, 1 (the case without a slice)
    pg.heads(pg.window(3), pg.block(2)),
]
EXECUTORS = [(name, {"compile": False} if name == "flex" else {})
             for name in backends.available() if not name.startswith("test_")]
EXECUTORS += [("auto", {"strategy": "terms", "terms": "dense"}),
              ("auto", {"strategy": "terms", "terms": "gather"})]
HEADS = [(4, 2), (6, 2), (3, 1)]


@functools.cache
def _compiled(name, case, options, softcap=None):
    extra = {} if softcap is None else {"softcap": softcap}
    return pg.compile(CASES[case], GRID, backend=name, **dict(options), **extra)


@pytest.mark.parametrize("heads, kv_heads", HEADS)
@pytest.mark.parametrize("name, options", EXECUTORS,
                         ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in EXECUTORS])
def test_grouped_kv_heads_match_the_oracle(name, options, heads, kv_heads):
    if name == "flex" and (heads, kv_heads) != HEADS[0]:
        pytest.skip("eager FlexAttention materialises every score: one head layout is enough")
    cls = backends.get_backend(name)
    dtype = torch.float64 if "float64" in cls.SUPPORTED_DTYPES else torch.float32
    grad = "cpu" in cls.BACKWARD_DEVICES
    tol = 1e-9 if dtype == torch.float64 else 2e-5
    gen = torch.Generator().manual_seed(heads * 10 + kv_heads)
    for case, pattern in enumerate(CASES):
        attn = _compiled(name, case, tuple(options.items()))
        q = torch.randn(2, heads, *GRID, 8, generator=gen, dtype=dtype, requires_grad=grad)
        k, v = (torch.randn(2, kv_heads, *GRID, 8, generator=gen, dtype=dtype,
                            requires_grad=grad) for _ in range(2))
        with torch.set_grad_enabled(grad):
            out = attn(q, k, v)
            want = reference(pattern, GRID, q, k, v).reshape(out.shape)
        torch.testing.assert_close(out, want, atol=tol, rtol=tol)
        if grad:
            dout = torch.randn(out.shape, generator=gen, dtype=dtype)
            for n, g, w in zip("qkv", torch.autograd.grad(out, (q, k, v), dout),
                               torch.autograd.grad(want, (q, k, v), dout)):
                assert g.shape == w.shape, n
                torch.testing.assert_close(g, w, atol=tol, rtol=tol, msg=f"d{n} of {pattern}")


@pytest.mark.parametrize("name, options", [e for e in EXECUTORS if e[0] != "flex"],
                         ids=lambda e: str(e))
def test_grouped_kv_heads_with_extra_keys_and_a_softcap(name, options):
    # the extra keys are keys: they have k's heads
    pattern, grid = CASES[0], GRID
    attn = _compiled(name, 0, tuple(options.items()), softcap=2.5)
    gen = torch.Generator().manual_seed(7)
    q, k, v, ak, av = (torch.randn(1, n, t, 8, generator=gen, dtype=torch.float64,
                                   requires_grad=True)
                       for n, t in ((6, 30), (2, 30), (2, 30), (2, 3), (2, 3)))
    out = attn(q, k, v, additional_keys=ak, additional_values=av)
    want = reference(pattern, grid, q, k, v, additional_keys=ak, additional_values=av,
                     softcap=2.5)
    torch.testing.assert_close(out, want)
    assert_gradients_equal(out, want, (q, k, v, ak, av), gen)


@pytest.mark.parametrize("name", ["auto", "sdpa", "numba"])
def test_grouped_kv_heads_with_a_bias_table(name):
    # the table is per query head; its gradient too
    pattern = CASES[0]
    attn = pg.compile(pattern, GRID, backend=name)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 30, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, 2, 30, 8, generator=gen, dtype=torch.float64, requires_grad=True)
            for _ in range(2))
    table = torch.randn(4, *(2 * r + 1 for r in attn.reach), generator=gen,
                        dtype=torch.float64, requires_grad=True)
    out = attn(q, k, v, rel_bias=table)
    repeated = [t.repeat_interleave(2, 1) for t in (k, v)]
    want = attn(q, *repeated, rel_bias=table)
    torch.testing.assert_close(out, want)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for n, g, w in zip(["q", "k", "v", "table"],
                       torch.autograd.grad(out, (q, k, v, table), dout),
                       torch.autograd.grad(want, (q, k, v, table), dout)):
        torch.testing.assert_close(g, w, msg=f"d{n}")


@pytest.mark.parametrize("name", ["auto", "sdpa", "numba", "flex"])
def test_a_kv_head_count_that_does_not_divide_is_a_clear_error(name):
    attn = pg.compile(pg.window(3), GRID, backend=name, **({"compile": False}
                                                            if name == "flex" else {}))
    q, k = torch.randn(1, 4, 30, 8), torch.randn(1, 3, 30, 8)
    with pytest.raises(pg.PatternError, match=rf"{name}: k and v have 3 heads and q has 4; "
                                              r"grouped key/value heads need the kv head count "
                                              r"to divide the query heads .* expected one of "
                                              r"\[1, 2, 4\]"):
        attn(q, k, k)
    with pytest.raises(pg.PatternError, match=r"q, k, v shapes differ"):
        attn(q, k[:, :2], k[:, :1])


def test_the_numba_ops_take_grouped_kv_heads():
    attn = pg.compile(pg.window(3) | pg.axis(0), GRID, backend="numba")
    q = torch.randn(2, 4, 30, 8, requires_grad=True)
    k, v = (torch.randn(2, 1, 30, 8, requires_grad=True) for _ in range(2))
    torch.library.opcheck(torch.ops.patterngen.numba_fwd.default,
                          (q, k, v, attn.op_key, 0.3, None, None))


def test_the_planned_ops_take_grouped_kv_heads():
    attn = pg.compile(pg.window(3) | pg.axis(0), GRID, backend="auto", strategy="terms")
    q = torch.randn(2, 4, 30, 8, requires_grad=True)
    k, v, ak, av = (torch.randn(2, 2, n, 8, requires_grad=True) for n in (30, 30, 3, 3))
    attn(q, k, v)
    key = attn.op_key
    torch.library.opcheck(torch.ops.patterngen.planned_fwd.default,
                          (q, k, v, ak, av, None, key, 0.3, True))


def test_compiled_graph_with_grouped_kv_heads_matches_eager():
    layer = pg.nn.LocalSelfAttention(16, 4, pg.window(3) | pg.axis(0), grid=GRID, kv_heads=1)
    x = torch.randn(2, *GRID, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), layer(x))


def test_the_cost_report_counts_kv_bytes_per_kv_head():
    mqa = pg.cost(pg.window(3), GRID, head_dim=8, heads=4, kv_heads=1, batch=2)
    mha = pg.cost(pg.window(3), GRID, head_dim=8, heads=4, batch=2)
    element = 2 * 30 * 8 * 4  # batch x tokens x head_dim x float32 bytes, per head
    assert mha.bytes == 4 * 4 * element  # Q, K, V, O of 4 heads
    assert mqa.bytes == (2 * 4 + 2 * 1) * element  # Q, O of 4 heads; K, V of 1
    assert mqa.flops == mha.flops and "kv_heads=1" in repr(mqa)
    symbolic = pg.cost(pg.window(3), ("H", "W"), head_dim="d", heads="h", kv_heads="g")
    h, g = (pg.grid.symbol(n) for n in "hg")
    assert symbolic.bytes.coeff(g) != 0 and symbolic.bytes.coeff(h) != 0
    with pytest.raises(pg.PatternError, match=r"cost: k and v have 3 heads and q has 4"):
        pg.cost(pg.window(3), GRID, heads=4, kv_heads=3)
