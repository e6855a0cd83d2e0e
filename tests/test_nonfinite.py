"""Non-finite inputs, on every backend: the rule is ``scaled_dot_product_attention`` run on each
query's attended keys alone.

With torch 2.13 that means: a NaN in ``q``, or in the ``k`` or ``v`` row of a key the query
attends, makes the query's output NaN; a ``+inf`` score makes it NaN; a ``-inf`` score gives its
key probability 0, and a query whose scores are all ``-inf`` outputs zeros (as one without
keys). Keys the query does not attend do not matter. (torch's own masked SDPA adds the mask to
the scores, so there a NaN key poisons every query, and ``0 * inf`` in ``P V`` does too: the
sdpa and flex backends take an exact path for partial blocks when k or v is not finite, which
the compiled flex case reaches too; the dense terms of the term-wise plan take the exact
matmul path then, and a dense term with a mask (a shifted window's region mask)
``dense.masked_attention``, the sdpa backend's exact path.)
"""

import pytest
import torch
import torch.nn.functional as F

import patterngen as pg
from oracle import reference

GRID = (5, 6)
SPEC = pg.window(3) | pg.global_tokens([(0, 0)])  # a union, some keys shared by all queries
POISONED = (2, 3)  # the key made non-finite: attended by its 3x3 neighbourhood only


def _rule(q, k, v, mask):
    """The expected output: per query, SDPA over its attended keys, zeros for none."""
    out = torch.zeros_like(q)
    for i in range(q.shape[2]):
        keys = mask[i].nonzero()[:, 0]
        if len(keys):
            out[:, :, i] = F.scaled_dot_product_attention(
                q[:, :, i:i + 1], k[:, :, keys], v[:, :, keys])[:, :, 0]
    return out


def _case(kind, grid=GRID):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, *grid, 8, generator=gen, dtype=torch.float64)
               for _ in range(3))
    q = q.abs() + 0.1  # positive queries: an infinite key gives an infinite score of its sign
    if kind == "nan key":
        k[:, :, POISONED[0], POISONED[1], 3] = float("nan")
    elif kind == "nan value":
        v[:, :, POISONED[0], POISONED[1], 5] = float("nan")
    elif kind == "+inf score":
        k[:, :, POISONED[0], POISONED[1]] = float("inf")
    elif kind == "-inf score":
        k[:, :, POISONED[0], POISONED[1]] = -float("inf")
    elif kind == "nan query":
        q[:, :, POISONED[0], POISONED[1], 2] = float("nan")
    elif kind == "inf query":  # its scores +-inf or NaN (a zero product): the rule gives NaN
        q[:, :, POISONED[0], POISONED[1], 2] = float("inf")
    elif kind == "every score -inf":  # the global key too, so its queries see only -inf
        k[:, :, POISONED[0], POISONED[1]] = -float("inf")
        k[:, :, 0, 0] = -float("inf")
    return q, k, v


KINDS = ["nan key", "nan value", "+inf score", "-inf score", "every score -inf"]
#: (backend, options, dtype)
BACKENDS = [
    ("numba", dict(lanes=0), torch.float64),
    ("numba", dict(lanes=3), torch.float64),  # the window lane by lane, the global shared
    ("numba", dict(lanes=0), torch.float32),
    ("sdpa", dict(block=8), torch.float64),
    ("flex", dict(block=16, compile=False), torch.float32),
    ("flex", dict(block=16), torch.float32),
    # term by term: the window gathered, the global key a dense term, merged by lse
    ("auto", dict(strategy="terms", terms="dense"), torch.float64),
    ("auto", dict(strategy="terms", terms="dense"), torch.bfloat16),  # the fused kernels
    ("auto", dict(strategy="terms", terms="gather"), torch.float32),
    ("auto", dict(), torch.float32),
]

CASES = [pytest.param(backend, options, dtype, kind,
                      id=f"{backend}-{str(dtype)[6:]}-{options}-{kind}")
         for backend, options, dtype in BACKENDS for kind in KINDS + ["nan query", "inf query"]]


def _flat(t):
    return t.reshape(t.shape[0], t.shape[1], -1, t.shape[-1])


@pytest.mark.parametrize("backend, options, dtype, kind", CASES)
def test_non_finite_values_follow_sdpa_per_query(backend, options, dtype, kind):
    q, k, v = _case(kind)
    mask = torch.as_tensor(pg.materialize(SPEC, GRID))
    want = _rule(*(_flat(t) for t in (q, k, v)), mask)
    attn = pg.compile(SPEC, GRID, backend=backend, dtype=str(dtype)[6:], **options)
    with torch.no_grad():
        got = _flat(attn(*(t.to(dtype) for t in (q, k, v)))).double()
    poisoned = want.isnan().any(-1)
    assert poisoned.any() == (kind in ("nan key", "nan value", "+inf score", "nan query",
                                       "inf query"))
    assert not poisoned.all()
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(got, want, atol=tol, rtol=tol, equal_nan=True)


# lanes that share a term's keys multiply a key's value row by each lane's probability (0 for a
# lane that does not attend it): with a non-finite value the kernels run one query at a time
@pytest.mark.parametrize("kind", ["nan key", "+inf score", "nan value"])
def test_non_finite_values_in_tiles_that_share_keys(kind):
    spec, grid = pg.window(6), (21,)
    attn = pg.compile(spec, grid, backend="numba", lanes=2)
    assert attn.shared == ((True,),)  # every lane computes every key of the tile's union
    q, k, v = _case("finite", grid)
    poison = {"nan key": (k, float("nan")), "+inf score": (k, float("inf")),
              "nan value": (v, float("nan"))}
    tensor, value = poison[kind]
    tensor[:, :, 11] = value  # in the union of tile (8, 9); lane 8 does not attend it
    want = _rule(q, k, v, torch.as_tensor(pg.materialize(spec, grid)))
    with torch.no_grad():
        got = attn(q, k, v)
    assert want.isnan().any() and not want.isnan().all()
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10, equal_nan=True)
    if kind == "nan value":  # the backward too: a query that does not see the key stays finite
        q.requires_grad_()
        attn(q, k, v).sum().backward()
        clean = ~want.isnan().any(-1)
        assert q.grad[clean].isfinite().all() and q.grad[~clean].isnan().any()


# inference in the token order runs the fused kernel on the windows as they are: without a
# mask it checks only the log-sum-exp, so a non-finite value must still reach exactly the
# queries that attend it
@pytest.mark.parametrize("shift", [0, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_non_finite_values_in_ordered_inference(kind, shift):
    grid, spec = (8, 8), pg.block(4, offset=shift)
    # the poisoned key moved to (0, 1): shifted, it lands in a window the region mask cuts,
    # whose other queries do not attend it
    q, k, v = (t.roll((-2, -2), (2, 3)) for t in _case(kind, grid))
    want = _rule(*(_flat(t) for t in (q, k, v)), torch.as_tensor(pg.materialize(spec, grid)))
    attn = pg.compile(spec, grid, backend="auto", dtype="float64")
    order = attn.token_order
    with torch.no_grad():
        got = order.on_grid(attn(*(order.in_order(_flat(t)) for t in (q, k, v)), ordered=True))
    assert want.isnan().any() == (kind in ("nan key", "nan value", "+inf score"))
    torch.testing.assert_close(got.reshape(want.shape), want, atol=1e-10, rtol=1e-10,
                               equal_nan=True)


def test_a_masked_dense_terms_nan_value_with_a_bias_table():
    # the term-wise path's exact path adds the mask and the bias as one tensor: the queries
    # that attend the NaN value are NaN, the others equal the oracle with that value zeroed
    grid, spec = (8, 8), pg.block(4, offset=2)
    q, k, v = (t.roll((-2, -2), (2, 3)) for t in _case("nan value", grid))
    attn = pg.compile(spec, grid, backend="auto", dtype="float64", strategy="terms")
    table = torch.randn(2, 7, 7, generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64)
    with torch.no_grad():
        got = _flat(attn(q, k, v, rel_bias=table))
    want = _flat(reference(spec, grid, q, k, v.nan_to_num(0.0), rel_bias=table))
    mask = torch.as_tensor(pg.materialize(spec, grid))
    seen = mask[:, (0 * grid[1] + 1)]  # the queries attending the poisoned key, now at (0, 1)
    assert got[:, :, seen].isnan().any(-1).all() and seen.any() and not seen.all()
    torch.testing.assert_close(got[:, :, ~seen], want[:, :, ~seen], atol=1e-10, rtol=1e-10)


# a lone dense term's inference runs views, bmm, softmax, bmm and one finiteness sum: its output
# already follows the rule except where every score of a query is -inf (softmax's NaN, where
# the rule gives zeros), which that sum sends to the exact merge
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS + ["a whole class -inf", "nan query"])
def test_non_finite_values_in_a_lone_dense_term(kind, dtype, monkeypatch):
    from patterngen.backends import planned

    grid, spec = (6, 6), pg.window(3, dilation=2)  # MaxViT's grid attention: 4 classes of 3x3
    q, k, v = _case(kind, grid)
    if kind == "a whole class -inf":  # the class of (0, 1): its queries see only -inf scores
        k[:, :, 0::2, 1::2] = -float("inf")
    want = _rule(*(_flat(t) for t in (q, k, v)), torch.as_tensor(pg.materialize(spec, grid)))
    assert want.isnan().any() == (kind in ("nan key", "nan value", "+inf score", "nan query"))
    attn = pg.compile(spec, grid, backend="auto", dtype=str(dtype)[6:], strategy="terms",
                      terms="dense")
    assert [tp.executor for tp in attn.plan.patterns[0]] == ["dense"]
    merged = []
    forward = planned.DenseTerm.forward
    monkeypatch.setattr(planned.DenseTerm, "forward",
                        lambda self, *a, **kw: merged.append(1) or forward(self, *a, **kw))
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
    with torch.no_grad():
        for _ in range(2):  # the second call through the kept signature
            got = _flat(attn(*(t.to(dtype) for t in (q, k, v)))).double()
            torch.testing.assert_close(got, want, atol=tol, rtol=tol, equal_nan=True)
    # float32/float64 run the direct path, which hands the call to the merge only where its
    # output is not finite; bfloat16 runs the fused kernel through the merge
    assert bool(merged) == (dtype == torch.bfloat16 or kind in (
        "nan key", "nan value", "+inf score", "a whole class -inf", "nan query"))


# heads inside each token (q, k, v of a projection on the map) with a table run the fused
# kernel and check only its log-sum-exp (a zero table here, so that the rule holds as it is)
@pytest.mark.parametrize("spec, grid", [(pg.window(3, dilation=2), (6, 6)),
                                        (pg.block(4), (8, 8))], ids=["9 keys", "16 keys"])
@pytest.mark.parametrize("kind", KINDS + ["nan query"])
def test_non_finite_values_with_heads_inside_each_token(kind, spec, grid):
    q, k, v = _case(kind, grid)
    want = _rule(*(_flat(t) for t in (q, k, v)), torch.as_tensor(pg.materialize(spec, grid)))
    assert want.isnan().any() == (kind in ("nan key", "nan value", "+inf score", "nan query"))
    attn = pg.compile(spec, grid, backend="auto", strategy="terms", terms="dense")
    inside = [t.float().movedim(1, -2).contiguous().movedim(-2, 1) for t in (q, k, v)]
    table = torch.zeros(1, *(2 * r + 1 for r in attn.reach))
    with torch.no_grad():
        for _ in range(2):  # the second through the kept signature
            got = attn(*inside, rel_bias=table)
            torch.testing.assert_close(_flat(got).double(), want, atol=2e-5, rtol=2e-5,
                                       equal_nan=True)
    if kind in ("nan value", "-inf score"):  # a finite log-sum-exp: that path's output
        assert got.movedim(1, -2).is_contiguous()


@pytest.mark.parametrize("kind", ["nan query", "nan key"])
def test_non_finite_values_in_ordered_inference_of_few_keys(kind):
    # 9 keys a problem and no table: without a mask the CPU kernel drops a NaN from a row's
    # maximum over fewer keys than a vector (16 float32), so it runs with a zero mask
    grid, spec = (6, 6), pg.block(3)
    q, k, v = _case(kind, grid)
    want = _rule(*(_flat(t) for t in (q, k, v)), torch.as_tensor(pg.materialize(spec, grid)))
    attn = pg.compile(spec, grid, backend="auto")
    order = attn.token_order
    with torch.no_grad():
        got = order.on_grid(attn(*(order.in_order(_flat(t).float()) for t in (q, k, v)),
                                 ordered=True))
    assert want.isnan().any()
    torch.testing.assert_close(got.reshape(want.shape).double(), want, atol=2e-5, rtol=2e-5,
                               equal_nan=True)


# the fused bfloat16 CPU kernel gives a query holding an infinity a row of zeros where the
# rule gives NaN (its scores are infinite or NaN): such half-precision calls run in float32
@pytest.mark.parametrize("backend", ["auto", "sdpa"])
def test_an_infinite_half_precision_query_follows_the_rule(backend):
    spec, grid = pg.block(4), (8, 8)
    q, k, v = _case("inf query", grid)
    want = _rule(*(_flat(t) for t in (q, k, v)), torch.as_tensor(pg.materialize(spec, grid)))
    attn = pg.compile(spec, grid, backend=backend, dtype="bfloat16")
    with torch.no_grad():
        got = _flat(attn(*(t.to(torch.bfloat16) for t in (q, k, v)))).double()
    assert want.isnan().any() and not want.isnan().all()
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2, equal_nan=True)
