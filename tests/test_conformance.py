"""Every registered executor against the dense oracle, on the same randomised cases.

Each executor (:func:`patterngen.backends.executors`) is asked, for each kind of call (float64
and float32 with gradients, bfloat16 on CPU, a bias table, a softcap, extra keys), whether it
can run each case (its own ``can_run``); where it can, its output and every gradient must
match the float64 oracle within the tolerance it declares for the dtype
(``executor.tolerances``). Where it cannot, its reason must be words, and the planner must not
pick it.
"""

import random

import pytest
import torch

import patterngen as pg
from patterngen.backends import executors
from patterngen.call import Call

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


def _run(ex, lowered, call: Call, gen):
    """Output and gradients of the executor and of the oracle, in float64."""
    attn = ex.compile(lowered, call, **({"softcap": SOFTCAP} if call.softcap else {}))
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


@pytest.mark.parametrize("kind", list(CALLS))
@pytest.mark.parametrize("name", list(executors()))
def test_every_executor_matches_the_oracle(name, kind):
    ex = executors()[name]
    gen = torch.Generator().manual_seed(0)
    ran = []
    for spec, grid in CASES:
        lowered = pg.lower(spec, grid)
        options = {"dtype": "float64", "heads": 2, "head_dim": 8, **CALLS[kind]}
        call = Call(backward=True, **options)
        if ex.can_run(lowered, call) is not None:
            call = Call(backward=False, **options)  # forward only, where that is all it has
        reason = ex.can_run(lowered, call)
        if reason is not None:
            assert isinstance(reason, str) and reason
            continue
        atol, rtol = ex.tolerances[call.dtype]
        for what, got, want in _run(ex, lowered, call, gen):
            torch.testing.assert_close(got, want, atol=atol, rtol=rtol,
                                       msg=lambda m, what=what: f"{spec!r} {what}: {m}")
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
