"""The executors that leave torch as torch.library operators: opcheck, torch.compile without
graph breaks, torch.export, and calls from several threads and processes."""

import multiprocessing
import os
import subprocess
import sys
import threading

import pytest
import torch

import patterngen as pg
from patterngen import nn
from patterngen.backends import ops


def _qkv(shape=(2, 2, 36, 8), dtype=torch.float32, grad=False):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=gen, dtype=dtype).requires_grad_(grad)
            for _ in range(3)]


def test_numba_ops_pass_opcheck():
    attn = pg.compile(pg.criss_cross() | pg.window(3), (6, 6), backend="numba")
    for dtype in (torch.float32, torch.float64):
        q, k, v = _qkv(dtype=dtype, grad=True)
        torch.library.opcheck(torch.ops.patterngen.numba_fwd.default,
                              (q, k, v, attn.op_key, 0.3, None, None))
        q, k, v = (t.detach() for t in (q, k, v))  # the backward op has no double backward
        out, lse = torch.ops.patterngen.numba_fwd(q, k, v, attn.op_key, 0.3, None, None)
        torch.library.opcheck(torch.ops.patterngen.numba_bwd.default,
                              (q, k, v, out, lse, torch.randn_like(out), attn.op_key, 0.3,
                               None, None))


def test_planned_ops_pass_opcheck():
    attn = pg.compile(pg.criss_cross() | pg.window(3), (6, 6), backend="auto",
                      strategy="terms", terms="dense")
    key = attn.op_key
    q, k, v = _qkv(grad=True)
    ak, av = (torch.randn(2, 2, 3, 8, requires_grad=True) for _ in range(2))
    for extra in ((None, None), (ak, av)):
        for need_lse in (True, False):
            torch.library.opcheck(torch.ops.patterngen.planned_fwd.default,
                                  (q, k, v, *extra, None, key, 0.3, need_lse))
    q, k, v, ak, av = (t.detach() for t in (q, k, v, ak, av))
    out, lse = torch.ops.patterngen.planned_fwd(q, k, v, ak, av, None, key, 0.3, True)
    torch.library.opcheck(torch.ops.patterngen.planned_bwd.default,
                          (q, k, v, ak, av, None, out, lse, torch.randn_like(out), key, 0.3))


def test_planned_ops_with_a_bias_table_pass_opcheck():
    attn = pg.compile(pg.block(3, offset=1), (6, 6), backend="auto", softcap=3.0,
                      strategy="terms")
    q, k, v = _qkv(grad=True)
    table = torch.randn(2, *(2 * r + 1 for r in attn.reach), requires_grad=True)
    attn(q, k, v, rel_bias=table)  # plans and registers the runner with a table
    key = attn.op_key
    torch.library.opcheck(torch.ops.patterngen.planned_fwd.default,
                          (q, k, v, None, None, table, key, 0.3, True))
    q, k, v, table = (t.detach() for t in (q, k, v, table))
    out, lse = torch.ops.patterngen.planned_fwd(q, k, v, None, None, table, key, 0.3, True)
    torch.library.opcheck(torch.ops.patterngen.planned_bwd.default,
                          (q, k, v, None, None, table, out, lse, torch.randn_like(out), key,
                           0.3))


def test_an_unknown_key_is_a_clear_error():
    q, k, v = _qkv()
    with pytest.raises(pg.PatternError, match="No compiled pattern has op key 'numba:nope'"):
        torch.ops.patterngen.numba_fwd(q, k, v, "numba:nope", 0.3, None, None)


@pytest.mark.parametrize("backend", ["numba", "sdpa", "auto"])
def test_compile_fullgraph_and_export_match_eager(backend):
    torch.manual_seed(0)
    layer = nn.LocalSelfAttention(dim=16, heads=2, pattern=pg.criss_cross() | pg.window(3),
                                  grid=(5, 6), backend=backend)
    x = torch.randn(2, 5, 6, 16)
    assert torch._dynamo.explain(layer)(x).graph_break_count == 0
    compiled = torch.compile(layer, fullgraph=True)
    xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager = layer(xe)
    torch.testing.assert_close(compiled(xc), eager)
    eager.square().sum().backward()
    compiled(xc).square().sum().backward()
    torch.testing.assert_close(xc.grad, xe.grad)
    exported = torch.export.export(layer, (x,))
    torch.testing.assert_close(exported.module()(x), layer(x))


def test_one_compiled_attention_from_several_threads():
    attn = pg.compile(pg.window(3) | pg.axis(0), (6, 6), backend="numba")
    inputs = [_qkv((1, 2, 36, 8)) for _ in range(4)]
    for i, (q, k, v) in enumerate(inputs):
        q.mul_(i + 1)
    expected = [attn(*qkv) for qkv in inputs]
    results, errors = [None] * 4, []

    def work(i):
        try:
            for _ in range(5):
                results[i] = attn(*inputs[i])
        except Exception as e:  # surfaced below: a thread's exception is otherwise lost
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    for got, want in zip(results, expected):
        torch.testing.assert_close(got, want)


CHILD = """
import torch, patterngen as pg
torch.set_num_threads(1)
attn = pg.compile(pg.window(3), (6, 6), backend="numba")
q = k = v = torch.ones(1, 1, 36, 4)
print(float(attn(q, k, v).sum()))
"""


def test_a_spawned_child_runs_the_kernels():
    run = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert float(run.stdout.split()[-1]) == 36 * 4


def _forked_child(queue):
    torch.set_num_threads(1)  # the fork rule: a forked child runs with one thread
    attn = pg.compile(pg.window(3), (6, 6), backend="numba")
    q = k = v = torch.ones(1, 1, 36, 4)
    queue.put(float(attn(q, k, v).sum()))


@pytest.mark.skipif(sys.platform != "linux", reason="fork is the Linux default start method")
def test_a_forked_child_with_one_thread_does_not_hang():
    attn = pg.compile(pg.window(3), (6, 6), backend="numba")
    attn(*_qkv((1, 2, 36, 8)))  # the parent has used its threads before the fork
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_forked_child, args=(queue,))
    child.start()
    child.join(timeout=120)
    alive = child.is_alive()
    if alive:
        child.kill()
    assert not alive and child.exitcode == 0
    assert queue.get(timeout=5) == 36 * 4


EAGER = """
import sys, torch, patterngen as pg
for options in (dict(backend="numba"), dict(backend="auto", strategy="terms")):
    attn = pg.compile(pg.window(3) | pg.axis(0), (6, 6), **options)
    q, k, v = (torch.randn(1, 2, 36, 4, requires_grad=True) for _ in range(3))
    attn(q, k, v).sum().backward()
print("torch._dynamo" in sys.modules)
"""


def test_eager_calls_do_not_go_through_the_operators():
    # a custom op's first call imports torch._dynamo (0.9 s of a first forward): eager calls
    # run the same implementation and formula as an autograd.Function instead
    run = subprocess.run([sys.executable, "-c", EAGER], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == "False"


def test_an_eager_call_records_a_gradient_only_when_one_is_needed(monkeypatch):
    calls = []

    def forward(x, factor):
        calls.append("forward")
        return x * factor

    def setup(ctx, inputs, output):
        ctx.factor = inputs[1]

    def backward(ctx, grad):
        return grad * ctx.factor, None

    function = ops.eager_function("Scale", forward, setup, backward)
    monkeypatch.setattr(function, "apply", classmethod(
        lambda cls, *args: calls.append("apply") or torch.autograd.Function.apply.__func__(
            cls, *args)))
    call = ops.traced_or_eager(None, function)
    x = torch.arange(3.0)
    with torch.no_grad():
        assert torch.equal(call(x.requires_grad_(), 2.0), 2 * x.detach())
    assert calls == ["forward"]  # no graph to record: the implementation alone
    out = call(x, 2.0)
    assert calls == ["forward", "apply", "forward"] and out.grad_fn is not None
    out.sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))


def test_keys_are_stable_and_distinct():
    a = pg.compile(pg.window(3), (6, 6), backend="numba")
    b = pg.compile(pg.window(3), (6, 6), backend="numba")
    c = pg.compile(pg.window(5), (6, 6), backend="numba")
    assert a.op_key == b.op_key != c.op_key
    assert ops.lookup(c.op_key) is c


def test_keys_are_the_same_in_another_process():
    # digests of the pattern, not hash(): an exported program's key means the same there
    code = ("import patterngen as pg; print(pg.compile(pg.window(3), (6, 6), "
            "backend='numba').op_key)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert run.stdout.split()[-1] == pg.compile(pg.window(3), (6, 6), backend="numba").op_key
