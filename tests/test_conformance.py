"""Every registered executor against the dense oracle, on the same randomised cases.

Each executor (:func:`patterngen.backends.executors`) is asked, for each kind of call (float64
and float32 with gradients, bfloat16 on CPU, a bias table, a softcap, extra keys), whether it
can run each case (its own ``can_run``); where it can, its output and every gradient must
match the float64 oracle within the tolerance it declares for the dtype
(``executor.tolerances``), both through ``compile`` and through the protocol's parts
(``prepare``: ``forward -> (out, lse)`` against the oracle's log-sum-exp, ``backward`` from
the out/lse merged with the extra keys' part). Where it cannot, its reason must be words,
and the planner must not pick it.
"""

import random

import pytest
import torch

import patterngen as pg
from patterngen import ir
from patterngen.backends import executors
from patterngen.backends.merge import finite_lse, merge
from patterngen.bias import reach
from patterngen.call import Call
from patterngen.distributed.attention import LINE_TABLE_STRATEGIES
from patterngen.distributed.local import LocalProblem, rank_share
from patterngen.distributed.reshard import reshard
from patterngen.errors import PatternError

from strategies import random_spec

#: the cases, shared by every executor: one that every term of has a dense form, one with a
#: window and an axis, and one drawn from a seed (1-D, so the kernels stay few)
CASES = [(pg.block(3, offset=1), (6, 7)), (pg.window(3) | pg.axis(0), (6, 6)),
         (random_spec(random.Random(3), 1), (40,))]
#: the kinds of call: dtype, and what the call passes besides q, k, v
CALLS = {"float64": {}, "float32": dict(dtype="float32"), "bfloat16": dict(dtype="bfloat16"),
         "bias": dict(bias=True),
         "softcap": dict(softcap=True), "extra": dict(extra_keys=3)}
SOFTCAP = 2.0


def _inputs(lowered, call: Call, gen):
    shape = (call.batch, call.heads, *lowered.grid.shape, call.head_dim)
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in "qkv")
    extra = {}
    if call.extra_keys:
        extra = {name: torch.randn(call.batch, call.heads, call.extra_keys, call.head_dim,
                                   generator=gen, dtype=torch.float64)
                 for name in ("additional_keys", "additional_values")}
    if call.bias:
        reach = pg.bias.reach(lowered)
        extra["rel_bias"] = 0.5 * torch.randn(call.heads, *(2 * r + 1 for r in reach),
                                              generator=gen, dtype=torch.float64)
    return [q, k, v], extra


def _subject(ex, lowered, case: int):
    """What ``ex`` is asked about for ``lowered``: the pattern, or for the ``local`` executor
    the local problem of one rank holding the whole grid (line tables on the local grid), on
    a local backend that changes with the case."""
    if ex.name != "local":
        return lowered
    shards = ((0, lowered.grid.shape[0]),)
    share = rank_share(lowered, shards, 0, reshard(lowered, shards))
    backend = ex.BACKENDS[case % len(ex.BACKENDS)]
    return LocalProblem(share, backend, share.local,
                        LINE_TABLE_STRATEGIES if backend == "auto" else None)


def _run(ex, lowered, call: Call, gen, subject):
    """Output and gradients of the executor and of the oracle, in float64."""
    attn = ex.compile(subject, call, **({"softcap": SOFTCAP} if call.softcap else {}))
    (q, k, v), extra = _inputs(lowered, call, gen)
    want_in = [t.clone().requires_grad_() for t in (q, k, v, *extra.values())]
    dt = getattr(torch, call.dtype)
    got_in = [t.to(dt).requires_grad_(call.backward) for t in (q, k, v, *extra.values())]
    named = dict(zip(extra, got_in[3:]))
    out = attn(*got_in[:3], **named)
    assert out.dtype == dt and out.shape == q.shape
    flat = [t.reshape(call.batch, call.heads, -1, call.head_dim) for t in want_in[:3]]
    oracle = dict(zip(extra, want_in[3:]))
    want = pg.dense_attention(*flat, pg.materialize(lowered), softcap=SOFTCAP if call.softcap
                              else None, grid=lowered.grid.shape, **oracle).reshape(q.shape)
    pairs = [("out", out.double(), want)]
    if call.backward:
        dout = torch.randn(q.shape, generator=gen, dtype=torch.float64)
        got = torch.autograd.grad(out, got_in, dout.to(dt))
        ref = torch.autograd.grad(want, want_in, dout)
        names = ["dq", "dk", "dv", *(f"d{n}" for n in extra)]
        pairs += [(n, g.double(), w) for n, g, w in zip(names, got, ref)]
    return pairs


def _parts(ex, lowered, call: Call, subject):
    """The executor's parts covering the pattern: one, or for ``dense`` one per term (each
    less the earlier terms' pairs); the ``extra`` executor covers the extra keys only, so the
    pattern is the ``gather`` executor's there."""
    softcap = SOFTCAP if call.softcap else None
    if ex.name == "extra":
        ex = executors()["gather"]
    if ex.name != "dense":
        return [ex.prepare(subject, call, softcap)]
    terms = lowered.terms
    return [ex.prepare(ir.IR(lowered.grid, (t,)), call, softcap, earlier=terms[:i],
                       reach=reach(lowered)) for i, t in enumerate(terms)]


def _run_parts(ex, lowered, call: Call, gen, subject):
    """Output, log-sum-exp and gradients of the executor's parts merged with the extra keys'
    part, and of the oracle, in float64."""
    (q, k, v), extra = _inputs(lowered, call, gen)
    dt, scale = getattr(torch, call.dtype), call.head_dim ** -0.5
    flat = [t.reshape(call.batch, call.heads, -1, call.head_dim) for t in (q, k, v)]
    table = extra.pop("rel_bias", None)
    ak, av = extra.get("additional_keys"), extra.get("additional_values")
    runs = [(part, flat[1:], table) for part in _parts(ex, lowered, call, subject)]
    if ak is not None:
        runs.append((executors()["extra"].prepare(lowered, call, SOFTCAP if call.softcap
                                                  else None), [ak, av], None))
    qd = flat[0].to(dt)
    results = [part.forward(qd, *(t.to(dt) for t in kv), scale, True,
                            None if tab is None else tab.to(dt)) for part, kv, tab in runs]
    out, lse = merge(results)
    want_in = [t.clone().requires_grad_() for t in (*flat, *extra.values(),
                                                    *([table] if table is not None else []))]
    named = dict(zip(extra, want_in[3:]))
    want, want_lse = pg.dense_attention(
        *want_in[:3], pg.materialize(lowered), softcap=SOFTCAP if call.softcap else None,
        grid=lowered.grid.shape, return_lse=True,
        rel_bias=want_in[-1] if table is not None else None, **named)
    pairs = [("out", out.double(), want), ("lse", lse.double(), finite_lse(want_lse))]
    if len(runs) == 1:  # alone, a part may offer its backend's own autograd path
        alone = runs[0][0].autograd_forward(qd, *(t.to(dt) for t in flat[1:]), scale,
                                            None if table is None else table.to(dt))
        if alone is not None:
            pairs.append(("autograd_forward", alone.double(), want))
    if call.backward:
        dout = torch.randn(want.shape, generator=gen, dtype=torch.float64)
        got = [torch.zeros_like(t) for t in want_in]
        for part, kv, tab in runs:
            grads = part.backward(qd, *(t.to(dt) for t in kv), out.to(dt), lse, dout.to(dt),
                                  scale, None if tab is None else tab.to(dt))
            at = [0, 1, 2] if kv[0] is flat[1] else [0, 3, 4]
            for i, g in zip(at + [len(want_in) - 1] * (tab is not None), grads):
                got[i] += g.double()
        ref = torch.autograd.grad(want, want_in, dout)
        names = ["dq", "dk", "dv", *(f"d{n}" for n in extra), *["dtable"] * (table is not None)]
        pairs += [(n, g, w) for n, g, w in zip(names, got, ref)]
    return pairs


@pytest.mark.parametrize("kind", list(CALLS))
@pytest.mark.parametrize("name", list(executors()))
def test_every_executor_matches_the_oracle(name, kind):
    ex = executors()[name]
    gen = torch.Generator().manual_seed(0)
    ran = []
    for case, (spec, grid) in enumerate(CASES):
        lowered = pg.lower(spec, grid)
        subject = _subject(ex, lowered, case)
        options = {"dtype": "float64", "heads": 2, "head_dim": 8, **CALLS[kind]}
        call = Call(backward=True, **options)
        if ex.can_run(subject, call) is not None:
            call = Call(backward=False, **options)  # forward only, where that is all it has
        reason = ex.can_run(subject, call)
        if reason is not None:
            assert isinstance(reason, str) and reason
            continue
        atol, rtol = ex.tolerances[call.dtype]
        for how, run in (("compiled", _run), ("parts", _run_parts)):
            for what, got, want in run(ex, lowered, call, gen, subject):
                torch.testing.assert_close(
                    got, want, atol=atol, rtol=rtol,
                    msg=lambda m, what=what, how=how: f"{spec!r} {how} {what}: {m}")
        ran.append(spec)
    if not ran:
        pytest.skip(f"{name} can run none of the cases for {kind} calls")


def test_the_planner_picks_only_executors_that_can_run_the_call():
    lowered = pg.lower(pg.window(3) | pg.axis(0), (6, 6))
    call = Call(dtype="float32", heads=2, head_dim=8, backward=True)
    plan = pg.plan(lowered, head_dim=8, heads=2, backward=True)
    for name, ex in executors().items():
        if ex.whole and ex.can_run(lowered, call) is not None:
            assert isinstance(plan.options[name], str) and name != plan.strategy


def test_a_part_is_refused_where_its_executor_cannot_run_the_call():
    lowered = pg.lower(pg.window(3), (6, 6))
    with pytest.raises(PatternError, match=r"flex: cannot prepare .* no backward on cpu"):
        executors()["flex"].prepare(lowered, Call(backward=True))
    with pytest.raises(PatternError, match=r"dense: .* has 2 terms; expected one"):
        executors()["dense"].prepare(pg.lower(pg.block(3) | pg.axis(0), (6, 6)), Call())
    q = torch.randn(1, 2, 36, 8)
    k = q.clone()
    k[0, 0, 5, 0] = float("nan")
    part = executors()["sdpa"].prepare(lowered, Call())
    with pytest.raises(PatternError, match=r"sdpa: forward_lse got keys or values that are not "
                                           r"all finite"):
        part.forward(q, k, q, 0.5)


@pytest.mark.parametrize("name", ["numba", "sdpa"])
def test_a_whole_executors_part_takes_listed_patterns_and_grouped_kv_heads(name):
    """Heads cycling over two patterns, two kv heads for four query heads: the part's out and
    lse, and its backward from its own out/lse, equal the oracle's."""
    lowered = pg.lower(pg.heads(pg.window(3), pg.axis(0)), (5, 6))
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 4, 30, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 30, 8, generator=gen, dtype=torch.float64) for _ in "kv")
    part = executors()[name].prepare(lowered, Call(dtype="float64", batch=2, kv_heads=2,
                                                   head_dim=8, backward=True))
    out, lse = part.forward(q, k, v, 0.3)
    want_in = [t.clone().requires_grad_() for t in (q, k, v)]
    want, want_lse = pg.dense_attention(*want_in, pg.materialize(lowered), scale=0.3,
                                        return_lse=True)
    torch.testing.assert_close(out, want.detach())
    torch.testing.assert_close(lse, want_lse.detach())
    dout = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    for g, w in zip(part.backward(q, k, v, out, lse, dout, 0.3)[:3],
                    torch.autograd.grad(want, want_in, dout)):
        torch.testing.assert_close(g, w)
