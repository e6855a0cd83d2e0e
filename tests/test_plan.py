"""The term-wise planner: dense terms and gather groups merged by log-sum-exp, against the
dense oracle (float64, forward and every gradient), the plans chosen, calibration files."""

import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import patterngen as pg
from patterngen import calibrate
from patterngen.backends import dense
from patterngen.backends.flex import flex_available
from patterngen.plan import dense_mask, dense_shape, gather_first
from oracle import assert_gradients_equal, reference
from fakes import register_fake_backend
from strategies import cases


def _check(pattern, grid, dtype=torch.float64, tol=1e-10, batch=2, heads=3, dim=8, **options):
    """Output and q/k/v gradients of the auto backend against the dense oracle; the forward
    without autograd too (it takes another path)."""
    attn = pg.compile(pattern, grid, backend="auto", **options)
    gen = torch.Generator().manual_seed(len(str(pattern)) + sum(grid))
    q, k, v = (torch.randn(batch, heads, *grid, dim, generator=gen, dtype=torch.float64)
               for _ in range(3))
    mine = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    ref_in = [t.requires_grad_() for t in (q, k, v)]
    tokens = int(np.prod(grid))
    ref = pg.dense_attention(*(t.reshape(batch, heads, tokens, dim) for t in ref_in),
                             pg.materialize(pattern, grid))
    out = attn(*mine).reshape(ref.shape)
    with torch.no_grad():
        torch.testing.assert_close(attn(*mine).reshape(ref.shape).double(), ref.detach(),
                                   atol=tol, rtol=tol)
    torch.testing.assert_close(out.double(), ref.detach(), atol=tol, rtol=tol)
    grad = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    got = torch.autograd.grad(out, mine, grad.to(dtype))
    want = torch.autograd.grad(ref, ref_in, grad)
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g.double(), w, atol=tol, rtol=tol, msg=f"d{name}")
    return attn


def _all_dense(pattern, grid) -> bool:
    lowered = pg.lower(pattern, grid)
    return all(not isinstance(dense_shape(t, grid), str)
               for head in lowered.per_head for t in head.terms)


@settings(max_examples=40)
@given(cases(max_tokens=120), st.booleans())
def test_dense_terms_equal_the_oracle(case, fused):
    pattern, grid = case
    assume(_all_dense(pattern, grid) and pg.lower(pattern, grid).per_head[0].terms)
    # the fused kernel with a mask, or matmul-exp-matmul: both paths of every dense term
    keys = 0 if fused else dense.MATMUL_KEYS
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dense, "MATMUL_KEYS", keys)
        attn = _check(pattern, grid, strategy="terms", terms="dense")
    assert {tp.executor for tps in attn.plan.patterns for tp in tps} <= {"dense"}


@settings(max_examples=15)
@given(st.data())
def test_per_head_dense_plans_equal_the_oracle(data):
    from strategies import grids, patterns

    grid = data.draw(grids(max_tokens=60))
    listed = [data.draw(patterns(grid, depth=1)) for _ in range(data.draw(st.integers(2, 3)))]
    pattern = pg.heads(*listed)
    assume(_all_dense(pattern, grid))
    _check(pattern, grid, heads=4, strategy="terms", terms="dense")


@pytest.mark.parametrize("pattern, grid", [
    (pg.criss_cross() | pg.window(3), (6, 7)),
    (pg.window(3, dilation=2) | pg.global_tokens([0, 5]), (7, 6)),
    (pg.window(5, causal=True) | pg.global_tokens([0, 1]), (19,)),
    (pg.heads(pg.window(3) | pg.axis(0), pg.block(2, offset=1)), (5, 6)),
])
def test_mixed_plans_merge_exactly(pattern, grid):
    attn = _check(pattern, grid, strategy="terms", terms="dense")
    executors = [tp.executor for tps in attn.plan.patterns for tp in tps]
    assert "gather" in executors and "dense" in executors
    # gather terms run first: each dense term masks the pairs of every term before it
    for tps in attn.plan.patterns:
        kinds = [tp.executor for tp in tps]
        assert kinds == sorted(kinds, key=("gather", "dense").index)


def test_rows_without_keys_output_zero_and_get_zero_gradients():
    pattern = pg.axis(0) & pg.global_tokens([(0, 0), (3, 1)])  # most queries see nothing
    grid = (4, 3)
    assert (pg.lower(pattern, grid).key_counts() == 0).any()
    _check(pattern, grid, strategy="terms", terms="dense")


def test_bfloat16_on_cpu_runs_and_falls_back_per_call():
    pattern, grid = pg.criss_cross() | pg.window(3), (6, 6)
    attn = _check(pattern, grid, dtype=torch.bfloat16, tol=5e-2)
    # the compile-time plan is for float32; the last call's, attn.plan, for bfloat16
    assert attn.plans[0].dtype == "float32" and attn.plan.dtype == "bfloat16"


def test_w3_and_w4_plan_dense_batches():
    # Swin's windows: among the planner's own strategies the dense batch wins; the block-sparse
    # sdpa backend runs the same windows as one batch too and is priced within 2x of it
    swin = pg.plan(pg.block(7), grid=(56, 56), head_dim=32, heads=4, backward=True,
                   executors=("terms", "numba"))
    assert swin.strategy == "terms"
    [[term]] = swin.patterns
    assert term.executor == "dense" and (term.dense.batch, term.dense.queries) == (64, 49)
    cc = pg.plan(pg.criss_cross(), grid=(64, 64), head_dim=32, heads=4)
    assert cc.strategy == "terms"
    assert [tp.executor for tp in cc.patterns[0]] == ["dense", "dense"]
    # the second term excludes the query itself, held by the first (CCNet's diagonal)
    assert [tp.pairs for tp in cc.patterns[0]] == [64 * 64 * 64, 64 * 64 * 63]


@pytest.mark.parametrize("margin, wanted", [(100.0, ("terms", "dense")), (0.01, ("numba", None))])
def test_the_planner_weighs_predictions_by_each_executors_margin(monkeypatch, margin, wanted):
    # an executor whose predictions spread wider must be predicted cheaper by its margin
    from patterngen.backends import executor

    for cls in (executor.NumbaExecutor, executor.GatherExecutor):
        monkeypatch.setattr(cls, "margin", margin)
    chosen = pg.plan(pg.block(7), grid=(14, 14), head_dim=32, heads=4,
                     executors=("terms", "numba"))
    [[term]] = chosen.patterns
    assert (chosen.strategy, term.executor if chosen.strategy == "terms" else None) == wanted


def test_plan_explains_itself():
    plan = pg.plan(pg.criss_cross() | pg.window(3), grid=(64, 64), head_dim=32, heads=4,
                   device="cpu", dtype=torch.float32, backward=True)
    text = str(plan)
    assert text.startswith("Plan for (criss_cross() | window(3)) on grid 64x64")
    assert "term (Window(3, clamp), Window(3, clamp)): gather" in text
    assert "strategies: " in text and "sdpa" in text
    attn = pg.compile(pg.criss_cross(), grid=(64, 64), backend="auto")
    assert attn.plan is attn.plans[0] and attn.plan.strategy == "terms"


def test_dense_mask_excludes_earlier_terms_exactly():
    lowered = pg.lower(pg.criss_cross(), (5, 4))
    first, second = lowered.terms
    mask = dense_mask(dense_shape(second, (5, 4)), second, [first])
    assert mask.shape == (1, 4, 4) and not mask[0].diagonal().any() and mask.sum() == 12


@pytest.mark.parametrize("kwargs, match", [
    (dict(executors=("numba", "gpu")), r"unknown executors \['gpu'\]; valid executors are"),
    (dict(device="tpu"), r"device='tpu'; expected 'cpu' or 'cuda'"),
    (dict(terms="sparse"), r"terms='sparse'; expected None"),
    (dict(heads=0), r"heads=0; expected a positive int"),
])
def test_bad_plan_requests(kwargs, match):
    with pytest.raises(pg.PatternError, match=match):
        pg.plan(pg.window(3), grid=(8, 8), **kwargs)


def test_bad_strategies_and_calls_no_executor_can_run():
    with pytest.raises(pg.PatternError, match=r"unknown executors \['bogus'\]; valid "
                       r"executors are \['terms', 'numba', 'sdpa', 'flex'\]"):
        pg.compile(pg.window(3), (8, 8), backend="auto", strategy="bogus")
    with pytest.raises(pg.BackendUnavailable, match=(
            r"nothing can run \(window\(3\) \| axis\(0\)\) on device='cuda' with "
            r"dtype='float64':\n  numba: device='cuda' not in \('cpu',\)\n  flex: dtype="
            r"'float64' not in .*\n  terms: gather terms .* need the numba backend")):
        pg.compile(pg.window(3) | pg.axis(0), (8, 8), backend="auto", device="cuda",
                   dtype="float64", strategy=("numba", "terms", "flex"))


def test_the_plan_is_the_last_calls_and_declared_sizes_plan_up_front():
    attn = pg.compile(pg.criss_cross(), (6, 6), backend="auto", head_dim=8, heads=2,
                      backward=True)
    q, k, v = (torch.randn(1, 2, 6, 6, 8, requires_grad=True) for _ in range(3))
    attn(q, k, v).sum().backward()
    assert len(attn.plans) == 1 and attn.plan is attn.plans[0]  # declared: no planning
    with torch.no_grad():
        attn(*(t[:, :1, ..., :4] for t in (q, k, v)))
    assert (attn.plan.heads, attn.plan.head_dim, attn.plan.backward) == (1, 4, False)
    assert attn.plans[1] is attn.plan and len(attn.plans) == 2
    attn(q, k, v)
    assert attn.plan is attn.plans[0] and len(attn.plans) == 2


def test_a_corrupt_calibration_file_is_measured_again(tmp_path, monkeypatch):
    monkeypatch.setenv("PATTERNGEN_CACHE", str(tmp_path))
    monkeypatch.delenv("PATTERNGEN_CALIBRATION")
    monkeypatch.setattr(calibrate, "_MEMO", {})
    measured = calibrate.Rates(calibrate.Rates.default().executors, "measured")
    calls = []
    monkeypatch.setattr(calibrate, "measure", lambda *a: calls.append(a) or measured)
    path = calibrate.calibration_path()
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="is unreadable"):
        got = calibrate.rates("cpu", "float32")
    assert got.source == "measured" and len(calls) == 1
    stored = json.loads(path.read_text())
    assert len(stored) == 1 and set(next(iter(stored.values()))) >= {"launch/terms", "copy"}
    monkeypatch.setattr(calibrate, "_MEMO", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert calibrate.rates("cpu", "float32").executors == measured.executors
    assert len(calls) == 1  # read back from the file, not measured again
    calibrate.rates("cpu", "float32", refresh=True)
    assert len(calls) == 2


@pytest.mark.parametrize("backend, pattern, grid, extra, options", [
    ("auto", pg.criss_cross(), (5, 6), 3, {}),
    ("auto", pg.window(3) | pg.global_tokens([0]), (6, 5), 2, {}),
    ("auto", pg.heads(pg.block(2), pg.axis(0) & pg.global_tokens([(0, 0)])), (4, 5), 1, {}),
    ("auto", pg.window(3), (7, 6), 200, dict(strategy="numba")),  # more keys than MATMUL_KEYS
    ("numba", pg.window(3) | pg.axis(0), (5, 6), 4, {}),
    ("sdpa", pg.criss_cross(), (5, 6), 3, {}),
    ("sdpa", pg.heads(pg.block(2), pg.axis(0) & pg.global_tokens([(0, 0)])), (4, 5), 1, {}),
    ("sdpa", pg.window(3), (7, 6), 200, {}),
    ("sdpa", pg.block(3, offset=1), (5, 6), 2, {}),  # rows with a dummy key in _plan
    # query blocks without any pattern key: those queries attend the extra keys alone
    ("sdpa", pg.window(3, causal=True) & pg.global_tokens([0]), (16,), 3, dict(block=4)),
])
def test_additional_keys_share_the_softmax(backend, pattern, grid, extra, options):
    attn = pg.compile(pattern, grid, backend=backend, **options)
    gen = torch.Generator().manual_seed(extra)
    n = int(np.prod(grid))
    q, k, v = (torch.randn(2, 4, n, 8, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    ak, av = (torch.randn(2, 4, extra, 8, generator=gen, dtype=torch.float64,
                          requires_grad=True) for _ in range(2))
    ref = pg.dense_attention(q, k, v, pg.materialize(pattern, grid), additional_keys=ak,
                             additional_values=av)
    out = attn(q, k, v, additional_keys=ak, additional_values=av)
    torch.testing.assert_close(out, ref)
    with torch.no_grad():
        torch.testing.assert_close(attn(q, k, v, additional_keys=ak, additional_values=av), ref)
    grad = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    for name, g, w in zip(("q", "k", "v", "ak", "av"),
                          torch.autograd.grad(out, (q, k, v, ak, av), grad),
                          torch.autograd.grad(ref, (q, k, v, ak, av), grad)):
        torch.testing.assert_close(g, w, msg=f"d{name}")


@pytest.mark.parametrize("backend, options", [
    ("sdpa", {}), ("numba", {}), ("auto", {}), ("auto", dict(strategy="terms", terms="dense")),
    ("flex", dict(compile=False))])
def test_additional_keys_with_a_softcap(backend, options):
    # the extra keys' scores are softcapped like the pattern's: one softmax over both
    pattern, grid = pg.window(3) | pg.axis(1), (5, 6)
    attn = pg.compile(pattern, grid, backend=backend, softcap=2.0, **options)
    dtype = torch.float32 if backend == "flex" else torch.float64
    grad = backend != "flex"  # FlexAttention has no CPU backward
    gen = torch.Generator().manual_seed(5)
    q, k, v, ak, av = (torch.randn(1, 2, n, 8, generator=gen, dtype=dtype, requires_grad=grad)
                       for n in (30, 30, 30, 3, 3))
    with torch.set_grad_enabled(grad):
        out = attn(q, k, v, additional_keys=ak, additional_values=av)
    ref = pg.dense_attention(q, k, v, pg.materialize(pattern, grid), softcap=2.0,
                             additional_keys=ak, additional_values=av)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)
    if grad:
        assert_gradients_equal(out, ref, (q, k, v, ak, av), gen)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "numba"])
def test_additional_keys_with_a_bias_table_are_refused(backend):
    # a softcap is no reason: the message names the table, which is
    attn = pg.compile(pg.window(3), (6, 6), backend=backend, softcap=2.0)
    q, extra = torch.randn(1, 2, 36, 8), torch.randn(1, 2, 3, 8)
    with pytest.raises(pg.PatternError, match=rf"{backend}: additional_keys with rel_bias is "
                                              r"not supported: the table is indexed by grid "
                                              r"offsets, which extra keys do not have"):
        attn(q, q, q, rel_bias=torch.zeros(2, 5, 5), additional_keys=extra,
             additional_values=extra)


@pytest.mark.skipif(flex_available() is not None, reason="this torch has no FlexAttention")
@pytest.mark.parametrize("pattern, grid, extra, options", [
    # per-head patterns: each head's extra blocks go after its own partial blocks
    # block 16: the compiled CPU kernel is wrong with key blocks of 8 at head_dim 8 on AVX2
    # (the backend refuses them there, see test_flex.py)
    (pg.heads(pg.block(2), pg.axis(0) & pg.global_tokens([(0, 0)])), (6, 5), 1,
     dict(block=16)),
    (pg.window(3), (6, 6), 20, dict(block=16, order="tiled", tile=(2, 2))),
])
def test_additional_keys_on_compiled_flex(pattern, grid, extra, options):
    attn = pg.compile(pattern, grid, backend="flex", **options)
    gen = torch.Generator().manual_seed(extra)
    q, k, v = (torch.randn(2, 4, int(np.prod(grid)), 8, generator=gen) for _ in range(3))
    ak, av = (torch.randn(2, 4, extra, 8, generator=gen) for _ in range(2))
    q64, k64, v64, ak64, av64 = (t.double() for t in (q, k, v, ak, av))
    ref = pg.dense_attention(q64, k64, v64, pg.materialize(pattern, grid),
                             additional_keys=ak64, additional_values=av64)
    with torch.no_grad():
        out = attn(q, k, v, additional_keys=ak, additional_values=av)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "sdpa", "numba"])
def test_bad_additional_keys(backend):
    attn = pg.compile(pg.window(3), (4, 4), backend=backend)
    q = k = v = torch.randn(1, 2, 16, 8)
    good = torch.randn(1, 2, 3, 8)
    with pytest.raises(pg.PatternError, match="additional_keys was given without "
                                              "additional_values"):
        attn(q, k, v, additional_keys=good)
    with pytest.raises(pg.PatternError, match=r"additional_values has shape \(1, 3, 3, 8\); q "
                                              r"has batch=1, head_dim=8 and k heads=2, so "
                                              r"expected \(1, 2, n_extra, 8\)"):
        attn(q, k, v, additional_keys=good, additional_values=torch.randn(1, 3, 3, 8))
    with pytest.raises(pg.PatternError, match="additional_keys has 3 tokens and "
                                              "additional_values 2"):
        attn(q, k, v, additional_keys=good, additional_values=good[:, :, :2])
    with pytest.raises(pg.PatternError, match="additional_keys is torch.float64"):
        attn(q, k, v, additional_keys=good.double(), additional_values=good)


@pytest.mark.parametrize("pattern, grid, softcap, heads", [
    (pg.block(3, offset=1), (5, 6), None, 3),
    (pg.block(3, offset=1), (5, 6), 2.0, 1),
    (pg.criss_cross() | pg.global_tokens([0]), (4, 5), 1.5, 3),
    (pg.heads(pg.axis(0), pg.block(2)), (4, 6), None, 3),
    # gather terms: the numba kernels add the whole pattern's table, read around its centre
    (pg.window(3) | pg.axis(0), (5, 5), 2.0, 3),
    (pg.heads(pg.window(3, dilation=2) | pg.global_tokens([0]), pg.axis(1)), (6, 7), None, 3),
    (pg.window(3), (4, 5), 1.5, 1),
])
def test_bias_and_softcap_equal_the_oracle(pattern, grid, softcap, heads):
    windows = "window" in repr(pattern)  # gather terms; the others forced dense
    attn = pg.compile(pattern, grid, backend="auto", softcap=softcap, strategy="terms",
                      terms=None if windows else "dense")
    gen = torch.Generator().manual_seed(sum(grid))
    table = torch.randn(heads, *(2 * r + 1 for r in attn.reach), generator=gen,
                        dtype=torch.float64, requires_grad=True)
    q, k, v = (torch.randn(2, 3, int(np.prod(grid)), 8, generator=gen, dtype=torch.float64,
                           requires_grad=True) for _ in range(3))
    ref = pg.dense_attention(q, k, v, pg.materialize(pattern, grid), grid=grid, rel_bias=table,
                             softcap=softcap)
    out = attn(q, k, v, rel_bias=table)
    torch.testing.assert_close(out, ref)
    with torch.no_grad():
        torch.testing.assert_close(attn(q, k, v, rel_bias=table), ref)
    grad = torch.randn(ref.shape, generator=gen, dtype=torch.float64)
    for name, g, w in zip(("q", "k", "v", "table"),
                          torch.autograd.grad(out, (q, k, v, table), grad),
                          torch.autograd.grad(ref, (q, k, v, table), grad)):
        torch.testing.assert_close(g, w, msg=f"d{name}")
    assert {p.strategy for p in attn.plans[1:]} == {"terms"}
    executors = {tp.executor for p in attn.plans[1:] for tps in p.patterns for tp in tps}
    assert ("gather" in executors) == windows


def test_a_softcap_without_a_table_on_a_gather_group():
    pattern, grid = pg.window(3) | pg.axis(0), (6, 7)
    attn = pg.compile(pattern, grid, backend="auto", softcap=1.5, strategy="terms")
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 3, 42, 8, generator=gen, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    ref = pg.dense_attention(q, k, v, pg.materialize(pattern, grid), softcap=1.5)
    out = attn(q, k, v)
    torch.testing.assert_close(out, ref)
    for g, w in zip(*(torch.autograd.grad(t.sum(), (q, k, v)) for t in (out, ref))):
        torch.testing.assert_close(g, w)
    assert any(tp.executor == "gather" for tps in attn.plans[-1].patterns for tp in tps)


def test_a_bfloat16_gather_group_runs_in_float32():
    _check(pg.criss_cross() | pg.window(3), (5, 6), dtype=torch.bfloat16, tol=5e-2,
           strategy="terms", terms="dense")


def test_additional_keys_with_rel_bias_or_on_a_backend_without_them_are_refused():
    q = k = v = torch.randn(1, 2, 16, 8)
    ak = torch.randn(1, 2, 3, 8)
    for backend in ("sdpa", "flex"):
        attn = pg.compile(pg.window(3), (4, 4), backend=backend)
        table = torch.zeros(1, *(2 * r + 1 for r in attn.reach))
        with pytest.raises(pg.PatternError, match=f"{backend}: additional_keys with rel_bias "
                                                  f"is not supported"):
            attn(q, k, v, additional_keys=ak, additional_values=ak, rel_bias=table)
    fake = pg.compile(pg.window(3), (4, 4), backend=register_fake_backend())
    with pytest.raises(pg.PatternError, match=r"additional_keys= is not supported by the "
                                              r"test_fake_dense backend .*\(auto, flex, numba, "
                                              r"sdpa\)"):
        fake(q, k, v, additional_keys=ak, additional_values=ak)


@pytest.fixture
def fixed_clock(monkeypatch) -> list:
    """Every micro-benchmark of a calibration runs once for real; its time is a fixed clock
    (the unit suite times nothing), the forward+backward twice the forward. Returns the runs."""
    runs = []

    def once(fn, repeats=7):
        fn()
        runs.append(fn)
        return 1.0 if len(runs) % 2 else 2.0

    monkeypatch.setattr(calibrate, "_best_ms", once)
    monkeypatch.setattr(calibrate, "PASSES", 1)  # a fixed clock gains nothing from passes
    return runs


def test_the_calibration_copies_and_scans_data_out_of_cache(monkeypatch):
    # a call reads q, k and v after its own traffic has pushed them out of the caches: each
    # run of the scan's benchmark (k and v, 2 MiB each) reads sources none of the runs
    # before it in the last COLD_BYTES read
    from patterngen.backends import inputs

    seen, scan = [], inputs.non_finite

    def recording(*tensors):
        seen.append([t.data_ptr() for t in tensors])
        return scan(*tensors)

    def clock(fn, repeats=7):
        fn()
        if seen:  # the scan's benchmark: run it on
            while len(seen) < 40:
                fn()
        return 1.0

    monkeypatch.setattr(inputs, "non_finite", recording)
    monkeypatch.setattr(calibrate, "_best_ms", clock)
    monkeypatch.setattr(calibrate, "PASSES", 1)
    calibrate.measure("cpu", "float32", only=("scan",))
    ptrs = [p for run in seen for p in run]
    assert len(ptrs) == 80
    window = calibrate.COLD_BYTES // (4 * 4096 * 32 * 4)  # sources that fit in COLD_BYTES
    assert window >= 16
    for i in range(len(ptrs) - window):
        assert len(set(ptrs[i:i + window])) == window


def test_calibration_measures_inside_no_grad(fixed_clock):
    # pg.profile compiles under no_grad: measuring the rates there must still run a backward
    runs = fixed_clock
    with torch.no_grad():
        rates = calibrate.measure("cpu", "float64", only=("launch/sdpa", "launch/terms"))
    assert runs
    assert rates.source == "measured"
    default = calibrate.Rates.default().executors
    for name, rate in rates.executors.items():
        if name in ("launch/sdpa", "launch/terms"):
            assert rate.call_ms > 0 and rate.backward_factor > 1 and rate != default[name]
        elif name.startswith(("attend/", "numba/", "rows/")):
            assert rate == default[name]


def test_calibration_times_every_dense_kernel(fixed_clock, monkeypatch):
    # each dense micro-benchmark (the kept path's autograd ones included) runs, here on the
    # smallest shape class only, and gets its measured rate
    runs = fixed_clock
    monkeypatch.setattr(calibrate, "ATTEND_ROWS", {k: (16,) for k in calibrate.ATTEND_ROWS})
    monkeypatch.setattr(calibrate, "ATTEND_KEYS", {k: (16,) for k in calibrate.ATTEND_KEYS})
    monkeypatch.setattr(calibrate, "PASSES", 2)  # each pass runs every micro-benchmark again
    with torch.no_grad():
        rates = calibrate.measure("cpu", "float32", only=("attend/",))
    names = [n for n in rates.executors if n.startswith("attend/")]
    assert len(names) == 3 * len(calibrate.ATTEND_DIMS)
    assert len(runs) == 2 * 2 * (len(names) + 1)  # and the kept path's call
    for name in names:  # kept's, less its backward's call: test_the_kept_backward_factors_...
        if "/kept/" not in name:
            assert rates.executors[name].backward_factor == pytest.approx(2.0)


def test_the_calibration_runs_at_the_thread_count_it_is_keyed_by(fixed_clock, monkeypatch):
    # numba's OpenMP layer, started by a process's first numba backward, sets the team torch
    # shares to NUMBA_NUM_THREADS: a stand-in for the numba call's benchmark does that once
    threads = torch.get_num_threads()
    seen, flip = [], [threads + 1]

    class Bench:
        name, units, counts, best = "launch/numba", 1, (), [1.0, 2.0]

        def forward(self):
            seen.append(torch.get_num_threads())

        def both(self):
            self.forward()
            if flip:
                torch.set_num_threads(flip.pop())

        def run(self, repeats):
            self.forward()
            self.both()

    monkeypatch.setattr(calibrate, "_numba_benches", lambda *args: [Bench()])
    monkeypatch.setattr(calibrate, "_solve_numba", lambda *args: None)
    try:
        with torch.no_grad():
            calibrate.measure("cpu", "float32", only=("launch/numba", "blockmask"))
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(threads)
    assert not flip and set(seen) == {threads}


def test_a_dense_term_whose_mask_would_be_too_large_is_gathered():
    # causal on 8192 tokens: one problem of 8192 x 8192 with a triangular mask
    plan = pg.plan(pg.causal(), grid=(8192,), head_dim=16, heads=1, executors=("terms",),
                   terms="dense")
    [[term]] = plan.patterns
    assert term.executor == "gather"
    assert "larger than MAX_DENSE_MASK" in str(plan)


def test_a_stale_calibration_is_measured_again_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv("PATTERNGEN_CACHE", str(tmp_path))
    monkeypatch.delenv("PATTERNGEN_CALIBRATION")
    monkeypatch.setattr(calibrate, "_MEMO", {})
    measured = calibrate.Rates(calibrate.Rates.default().executors, "measured")
    monkeypatch.setattr(calibrate, "measure", lambda *a: measured)
    old = {"v1|cpu|float32|torch " + torch.__version__ + f"|threads {torch.get_num_threads()}":
           {"dense": {"call_ms": 0.1, "pair_ns": 0.1, "backward_factor": 3.0}}}
    calibrate.calibration_path().write_text(json.dumps(old))
    with pytest.warns(UserWarning, match=r"holds rates of another version of the cost model "
                                         r"\(v1, this is v\d+\); measuring again"):
        assert calibrate.rates("cpu", "float32") is measured
    stored = json.loads(calibrate.calibration_path().read_text())
    assert [k.split("|")[0] for k in stored] == [f"v{calibrate.VERSION}"]


def test_autotune_times_the_close_strategies_once_and_keeps_the_winner(tmp_path, monkeypatch):
    from patterngen import autotune

    monkeypatch.setenv("PATTERNGEN_CACHE", str(tmp_path))
    monkeypatch.setattr(autotune, "WITHIN", 1e9)  # every strategy that can run is close
    timed = []

    def fake(name, fn):  # no clock in the unit suite: sdpa "measures" fastest
        fn()
        timed.append(name)
        return 1.0 if name == "sdpa" else 5.0

    monkeypatch.setattr(autotune, "time_ms", fake)
    pattern, grid = pg.window(3) | pg.axis(0), (6, 6)
    q, k, v = (torch.randn(1, 2, 6, 6, 8, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    attn = pg.compile(pattern, grid, backend="auto", autotune=True, dtype="float64")
    out = attn(q, k, v)
    planned = pg.plan(pattern, grid, head_dim=8, heads=2, dtype="float64", backward=True)
    assert sorted(timed) == sorted(autotune.candidates(planned)) and len(timed) > 1
    assert attn.plan.strategy == "sdpa"
    flat = [t.detach().reshape(1, 2, 36, 8) for t in (q, k, v)]
    torch.testing.assert_close(out.reshape(1, 2, 36, 8),
                               pg.dense_attention(*flat, pg.materialize(pattern, grid)))
    out.sum().backward()
    # the winner is kept on disk: a new compiled attention times nothing
    timed.clear()
    again = pg.compile(pattern, grid, backend="auto", autotune=True, dtype="float64")
    again(q, k, v)
    assert timed == [] and again.plan.strategy == "sdpa"
    [entry] = json.loads(autotune.path().read_text()).values()
    assert entry["winner"] == "sdpa" and set(entry["ms"]) == set(autotune.candidates(planned))
    # a corrupt file is timed again, with a warning
    autotune.path().write_text("{not json")
    with pytest.warns(UserWarning, match=r"autotune file .* is unreadable .*; timing again"):
        pg.compile(pattern, grid, backend="auto", autotune=True, dtype="float64")(q, k, v)
    assert sorted(timed) == sorted(autotune.candidates(planned))


@pytest.mark.parametrize("pattern, grid", [(pg.window(3) | pg.axis(0), (6, 7)),
                                           (pg.block(4, offset=1), (9, 8)),
                                           (pg.window(16, causal=True), (100,))])
def test_each_executor_reports_the_pairs_it_computes(pattern, grid):
    from patterngen.backends import executors, get_backend
    from patterngen.call import Call

    lowered = pg.lower(pattern, grid)
    call = Call(batch=2, heads=3, head_dim=8)
    table = executors()

    def attended(ops):  # pairs the attention ops compute
        return sum(op.count * op.shape[0] * op.shape[1] for op in ops if op.kind == "attend")

    numba = get_backend("numba")(lowered)
    [computed] = [op.count for op in table["numba"].work(lowered, call) if op.kind == "numba"]
    assert computed == sum(numba.executed_pairs) * 2 * 3
    # sdpa computes every group's whole tiles, padding past the last token included
    sdpa = get_backend("sdpa")(lowered)
    tiles = sum(g.kv_blocks.size * b["layout"].block[0] * b["layout"].block[1]
                for b in sdpa.block_sparse() for g in b["groups"])
    assert attended(table["sdpa"].work(lowered, call)) == tiles * 2 * 3 >= \
        sdpa.layout.executed_pairs * 2 * 3
    for _, shape in gather_first(lowered, grid)[1]:
        assert attended(table["dense"].work(shape, call, 0)) == shape.executed_pairs * 2 * 3


def _keys_per_axis(term, shape, i):
    from patterngen import ir

    keys = []
    for rel, n, c in zip(term.rels, shape, i):
        lo, hi = (int(np.asarray(x).reshape(-1)[0])
                  for x in rel.bounds(np.array([c]), n, ir.NUMPY_OPS, n))
        keys.append(len(range(lo, max(hi, lo), int(rel.step))))
    return int(np.prod(keys[:-1])), keys[-1]


def _walk_forward_loops(lowered, chunk, lanes=0):
    """Queries, key rows of two keys or more, keys buffered one at a time and key rows of
    one key or none, by the forward, walking its loops (source.py). One
    query at a time: per term, the outer axes' keys, then the last axis's as one run (the
    first term on a contiguous axis, when the run fits the buffer's room) or key by key
    (every key of a later term, held earlier or not). In tiles whose lanes share every term:
    per tile and term, the outer axes' keys of the tile's row, the union key by key."""
    shape = lowered.grid.shape
    rows = loose = plain = 0
    if lanes:
        for i in np.ndindex(*shape[:-1], -(-shape[-1] // lanes)):
            rows += sum(_keys_per_axis(term, shape, (*i[:-1], i[-1] * lanes))[0]
                        for term in lowered.terms)
        return int(np.prod(shape)), rows, 0, 0
    for i in np.ndindex(*shape):
        cnt = 0
        for t, term in enumerate(lowered.terms):
            outer, last = _keys_per_axis(term, shape, i)
            for _ in range(outer):
                rows += last > 1
                plain += last <= 1
                if t == 0 and int(term.rels[-1].step) == 1 and 0 < last <= chunk - cnt:
                    cnt += last
                    continue
                for _ in range(last):
                    cnt = (cnt if cnt < chunk else 0) + 1
                    loose += 1
    return int(np.prod(shape)), rows, loose, plain


@pytest.mark.parametrize("pattern, grid", [
    (pg.window(5), (9, 9)), (pg.window(13), (16, 16)), (pg.window(4, dilation=2), (11, 10)),
    (pg.window((3, 7, 7)), (4, 9, 9)), (pg.window(200), (300,)), (pg.window(9), (20,)),
    (pg.window(3) | pg.axis(0), (6, 7)), (pg.criss_cross(), (8, 8)),
    (pg.block(4, offset=1), (9, 8)), (pg.window(7, stride=2), (12, 12)),
    (pg.axis(0), (7, 5)), (pg.criss_cross() | pg.window(3), (9, 9))])
def test_the_numba_counts_are_the_forward_loops(pattern, grid):
    # the planner prices the kernels on these counts; a walk of the loops gives them exactly,
    # one query at a time for every pattern and in the tiles the planner picks
    from patterngen.backends import executors
    from patterngen.backends.numba import source
    from patterngen.backends.numba.counts import kernel_counts
    from patterngen.backends.numba.tiling import plan_lanes, runs_first
    from patterngen.call import Call

    lowered = runs_first(pg.lower(pattern, grid))
    [one] = kernel_counts(lowered, grid, 0, None)
    assert (one.queries, one.rows, one.loose, one.plain) == _walk_forward_loops(
        lowered, source.KEY_CHUNK)
    lanes, shared = plan_lanes(lowered, grid)
    ops = {op.kind: op for op in executors()["numba"].work(
        lowered, Call(batch=2, heads=3, head_dim=8)) if op.kind != "launch"}
    assert {op.kernel for op in ops.values()} == {"tiles" if lanes else "one"}
    assert all(op.shape == (8,) for op in ops.values())
    if lanes:
        assert all(map(all, shared))  # every term shared: what the tile walk knows
    assert [ops[k].count for k in ("queries", "rows", "loose", "plain")] == [
        6 * n for n in _walk_forward_loops(lowered, source.KEY_CHUNK, lanes)]


@pytest.mark.parametrize("pattern, q_shape, k_shape, lanes", [
    (pg.window(5), (32, 24), (8, 6), 4), (pg.window(3), (8, 6, 10), (4, 3, 5), 2),
    (pg.window(3), (16, 16), (4, 4), None)])
def test_numba_tiles_spanning_rows_count_each_key_row_once(pattern, q_shape, k_shape, lanes):
    # keys on another grid: a tile spans the query rows over one key row and visits it once,
    # as the backend's own count (checked against the oracle in test_cross.py) says
    from patterngen.backends.numba.counts import kernel_counts

    attn = pg.compile(pattern, q_shape, key_grid=k_shape, backend="numba", lanes=lanes)
    assert attn.groups
    [counts] = kernel_counts(attn.ir, attn.shape, attn.lanes, attn.shared, attn.groups)
    assert (counts.queries, counts.rows, counts.loose) == (
        int(np.prod(q_shape)), *attn.executed_rows, 0)


def test_the_numba_rates_are_a_nonnegative_least_squares_fit():
    # the calibration's points as (units, queries, rows, loose keys) -> ns; exact data gives
    # the rates back, a rate the points make negative is 0, a fixed one is held
    rates = np.array([0.1, 40.0, 6.0, 2.0])
    points = [(64 * 32 * 2048, 2048, 2048, 0), (9 * 32 * 8192, 8192, 8192, 0),
              (200 * 32 * 1024, 1024, 1024, 200 * 1024), (25 * 32 * 4096, 4096, 5 * 4096, 0)]
    times = [float(np.dot(p, rates)) for p in points]
    assert calibrate.nonnegative_fit(points, times, {}) == pytest.approx(list(rates))
    assert calibrate.nonnegative_fit(points, times, {2: 6.0}) == pytest.approx(list(rates))
    noisy = calibrate.nonnegative_fit(points[:3], [t * 0.5 for t in times[:3]], {2: 30.0})
    assert noisy[2] == 30.0 and min(noisy) >= 0.0
    # a count no point exercises gets no rate
    assert calibrate.nonnegative_fit([p[:3] + (0,) for p in points],
                                     [float(np.dot(p[:3], rates[:3])) for p in points],
                                     {})[3] == 0.0


def test_a_price_is_the_sum_of_its_ops_at_their_rates():
    from patterngen.call import Op

    rates = calibrate.Rates.default()
    r = rates.executors
    ops = [Op("launch", 2, kernel="sdpa"), Op("copy", 1000),
           Op("attend", 5, (64, 64, 64), "fused"), Op("attend", 5, (64, 64, 16), "fused")]
    fwd, lines = rates.price(ops, backward=False)
    want = (2 * r["launch/sdpa"].call_ms + 1000 * r["copy"].pair_ns / 1e6
            + 5 * 64 * 64 * 64 * r["attend/fused/64x64/d64"].pair_ns / 1e6
            + 5 * 64 * 64 * 16 * r["attend/fused/64x64/d16"].pair_ns / 1e6)
    assert fwd == pytest.approx(want) and len(lines) == 4
    both, _ = rates.price(ops[1:2], backward=True)
    assert both == pytest.approx(1000 * r["copy"].pair_ns / 1e6 * r["copy"].backward_factor)
    # between measured shapes, the rate lies between its neighbours'; beyond them, the edge's
    low, high = (rates.unit_rate(Op("attend", 1, (64, n, 16), "fused"))[1] for n in (64, 256))
    mid = rates.unit_rate(Op("attend", 1, (64, 128, 16), "fused"))[1]
    assert min(low, high) <= mid <= max(low, high)
    edge = rates.unit_rate(Op("attend", 1, (4096, 4096, 256), "fused"))[1]
    assert edge == pytest.approx(r["attend/fused/256x1024/d64"].pair_ns)
    # in log2 of the shape, the logarithm of the rate (a cost per problem falls off as
    # 1 / pairs between the points); the backward factors likewise, of the two products
    ns, factor = rates.unit_rate(Op("attend", 1, (32, 16, 16), "matmul"))[1:]
    a, b = r["attend/matmul/16x16/d16"], r["attend/matmul/64x16/d16"]
    assert ns == pytest.approx((a.pair_ns * b.pair_ns) ** 0.5)
    assert ns * factor == pytest.approx((a.pair_ns * a.backward_factor * b.pair_ns
                                         * b.backward_factor) ** 0.5)


def _autograd_nodes(t) -> set:
    seen, stack = set(), [t.grad_fn]
    while stack:
        f = stack.pop()
        if f is not None and f not in seen:
            seen.add(f)
            stack += [g for g, _ in f.next_functions]
    return {type(f).__name__ for f in seen}


@pytest.mark.parametrize("pattern, grid, options, extra, kept", [
    (pg.block(7), (14, 14), {}, False, True),           # Swin's windows: alone, matmul path
    (pg.axis(0), (12, 6), {}, False, True),
    (pg.block(7), (14, 14), {"softcap": 5.0}, False, False),
    (pg.block(7), (14, 14), {}, True, False),           # extra keys: a second part
    (pg.criss_cross(), (8, 8), {"terms": "dense"}, False, False),  # two dense terms
    (pg.axis(0), (200, 2), {}, False, False),           # 200 keys: the fused kernel
    (pg.global_tokens(queries=[(0, 0)]), (6, 6), {}, False, False),  # keyless queries
    (pg.block(4, offset=1), (8, 7), {"terms": "dense"}, False, True),  # rolled and padded
])
def test_a_lone_dense_term_is_priced_on_the_path_it_runs(pattern, grid, options, extra, kept):
    # the plan prices the probabilities-keeping autograd path (attend/kept) exactly where the
    # call takes it: its backward then runs through torch's softmax node
    attn = pg.compile(pattern, grid, backend="auto", strategy="terms", **options)
    q, k, v = (torch.randn(1, 2, *grid, 16, requires_grad=True) for _ in range(3))
    more = {}
    if extra:
        more = dict(additional_keys=torch.randn(1, 2, 3, 16), additional_values=torch.randn(
            1, 2, 3, 16))
    out = attn(q, k, v, **more)
    lines = [line for tps in attn.plan.patterns for tp in tps for line in tp.work]
    assert any("attend/kept" in line for line in lines) == kept
    assert ("KeptAttentionBackward" in _autograd_nodes(out)) == kept
    if not kept and attn.plan.patterns[0][0].dense is not None \
            and attn.plan.patterns[0][0].dense.copied:
        # the merge's backward views q, k, v again
        assert any("recopy" in line for line in lines)
    with torch.no_grad():
        attn(q, k, v, **more)
    forward = [line for tps in attn.plan.patterns for tp in tps for line in tp.work]
    assert any("attend/kept" in line for line in forward) == kept
    assert not any("recopy" in line for line in forward)


def _lone_term_call(pattern, grid, gen, bias: bool, kv_heads: int = 2):
    """``(attn, (q, k, v), options, out)``: ``pattern`` as one dense term (float64, 2 query
    heads, head_dim 8, a bias table with a gradient where ``bias``), called once through
    torch's autograd."""
    attn = pg.compile(pattern, grid, backend="auto", strategy="terms", terms="dense")
    qkv = tuple(torch.randn(1, h, *grid, 8, generator=gen, dtype=torch.float64,
                            requires_grad=True) for h in (2, kv_heads, kv_heads))
    more = {}
    if bias:
        r = pg.bias.reach(pg.lower(pattern, grid))
        more["rel_bias"] = torch.randn(2, *(2 * x + 1 for x in r), generator=gen,
                                       dtype=torch.float64, requires_grad=True)
    out = attn(*qkv, **more)
    assert "KeptAttentionBackward" in _autograd_nodes(out)
    return attn, qkv, more, out


@pytest.mark.parametrize("pattern, grid", [
    (pg.block(4, offset=1), (8, 7)),         # rolled on both axes, padded on the second
    (pg.block(3, offset=2), (7,)),           # rolled and padded
    (pg.block((2, 3), offset=(1, 1)), (3, 5)),
])
@pytest.mark.parametrize("bias", [False, True])
def test_a_padded_term_alone_runs_through_autograd_exactly(pattern, grid, bias):
    # padded queries' rows have a key in torch's softmax (their output is dropped), so the
    # lone term's autograd path runs instead of falling back to the merge after the work
    gen = torch.Generator().manual_seed(0)
    attn, (q, k, v), more, out = _lone_term_call(pattern, grid, gen, bias)
    want = reference(pattern, grid, q, k, v, **more)
    torch.testing.assert_close(out, want)
    assert_gradients_equal(out, want, (q, k, v, *more.values()), gen, "q k v table".split())
    with torch.no_grad():
        torch.testing.assert_close(attn(q, k, v, **more), want.detach())


@pytest.mark.parametrize("pattern, grid, kv_heads, bias", [
    (pg.window(3, dilation=2), (6, 6), 2, False),  # MaxViT's grid: bmm, softmax, bmm
    (pg.block(3), (6, 6), 1, False),               # grouped key/value heads: problems_forward
    (pg.block(3), (6, 6), 2, True),                # a table with a gradient: problems_forward
])
def test_a_lone_dense_term_takes_a_broadcast_gradient_contiguous(pattern, grid, kv_heads, bias,
                                                                monkeypatch):
    # out.sum()'s gradient is stride 0, and a view of it through the unview would send torch's
    # CPU bmm backward problem by problem on one thread: both of the backward's bmms with the
    # output gradient get it contiguous (the one copy the planner prices), and the gradients
    # stay exact
    _, (q, k, v), more, out = _lone_term_call(pattern, grid, torch.Generator().manual_seed(0),
                                              bias, kv_heads)
    assert "KeptAttentionBackward" in _autograd_nodes(out)
    seen, bmm = [], torch.bmm

    def spy(a, b):
        seen.append(all(0 not in t.stride() for t in (a, b)))
        return bmm(a, b)

    monkeypatch.setattr(torch, "bmm", spy)
    inputs = (q, k, v, *more.values())
    got = torch.autograd.grad(out.sum(), inputs)
    monkeypatch.setattr(torch, "bmm", bmm)
    assert len(seen) == 2 and all(seen)  # dout v^T and P^T dout
    want = torch.autograd.grad(reference(pattern, grid, q, k, v, **more).sum(), inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("pattern, grid, parts", [
    (pg.criss_cross(), (8, 8), 2),                          # two dense terms, merged
    (pg.axis(0) | pg.axis(1) | pg.global_tokens([(0, 0)]), (6, 6), 4),
    (pg.block(4), (8, 8), 0),                               # one part: nothing merged
])
def test_each_merged_part_is_charged_its_fixed_cost(pattern, grid, parts):
    plan = pg.plan(pattern, grid, executors=("terms",), terms="dense")
    assert sum(map(len, plan.patterns)) == max(parts, 1)
    shared = "\n".join(plan.work["terms"])
    assert (f"Op(launch/part x {parts})" in shared) == bool(parts)
    assert ("Op(merge" in shared) == bool(parts)


def test_the_fixed_cost_of_a_part_is_measured(fixed_clock):
    # the plans of calibrate.PART_CASES run, and launch/part replaces its default
    runs = fixed_clock
    rates = calibrate.measure("cpu", "float32", only=("launch/part",))
    assert len(runs) >= 2 * len(calibrate.PART_CASES)
    assert rates.executors["launch/part"] != calibrate.Rates.default().executors["launch/part"]


@pytest.mark.parametrize("grid, fused", [((200, 2), True), ((12, 6), False)])
def test_a_dense_term_on_the_fused_kernel_is_charged_its_scan_of_k_and_v(grid, fused):
    # DenseTerm.forward checks k and v for non-finite values before a fused kernel
    plan = pg.plan(pg.axis(0), grid, head_dim=16, heads=2, executors=("terms",))
    [[term]] = plan.patterns
    scans = [line for line in term.work if line.startswith("Op(scan")]
    assert len(scans) == fused
    assert not fused or scans[0].startswith(f"Op(scan x {2 * grid[0] * grid[1] * 2 * 16})")


@pytest.mark.parametrize("backward, kernel", [(False, "kept"), (True, "fused")])
def test_sdpa_mask_free_inference_is_priced_on_the_path_without_lse(backward, kernel):
    # dense.matmul_attention (baddbmm, softmax, bmm, no log-sum-exp) runs the aligned windows
    # without autograd: the ops of the kept path's forward
    plan = pg.plan(pg.block(7), (14, 14), executors=("sdpa",), backward=backward)
    kernels = {line.split()[0].split("/")[1] for line in plan.work["sdpa"]
               if line.startswith("Op(attend/")}
    assert kernels == {kernel}


def test_a_term_wise_plan_of_gather_terms_only_leaves_the_kernels_to_numba():
    # gathering every term runs the numba kernels of the whole pattern through the merge's
    # operator: where the numba strategy can run the call, it runs them without it
    plan = pg.plan(pg.window(7), (64, 64), head_dim=64, backward=True)
    assert plan.strategy == "numba" and isinstance(plan.options["terms"], float)
    forced = pg.plan(pg.window(7), (64, 64), head_dim=64, backward=True,
                     executors=("terms", "sdpa"))
    assert forced.strategy == "terms"
    assert [tp.executor for tp in forced.patterns[0]] == ["gather"]


def _sdpa_ops(pattern, grid, call):
    from patterngen.backends.executor import WHOLE

    return WHOLE["sdpa"].work(pg.lower(pattern, grid), call)


def test_sdpa_prices_the_band_and_gather_backwards_its_autograd_runs():
    # a causal dilated window: mask-free band groups (unfold views) and a gathered group;
    # the bytes unfold_backward receives are the band ops', and a gathered group's key
    # gradients are copied for index_add
    from torch.profiler import profile

    from patterngen.call import Call

    pattern, grid, heads, d = pg.window(64, dilation=2, causal=True), (1000,), 2, 16
    attn = pg.compile(pattern, grid, backend="sdpa")
    q, k, v = (torch.randn(1, heads, *grid, d, requires_grad=True) for _ in range(3))
    with profile(record_shapes=True) as prof:
        attn(q, k, v).sum().backward()
    ran = {}
    for e in prof.events():
        if e.name in ("aten::unfold_backward", "aten::index_add_"):
            ran.setdefault(e.name, []).append(e.input_shapes)
    ops = _sdpa_ops(pattern, grid, Call(heads=heads, head_dim=d, backward=True))
    band = sum(op.count for op in ops if op.kind == "band")
    assert band == sum(4 * np.prod(s[0]) for s in ran["aten::unfold_backward"]) > 0
    assert "aten::index_add_" in ran and any(op.kind == "recopy" for op in ops)
    forward = _sdpa_ops(pattern, grid, Call(heads=heads, head_dim=d))
    assert not any(op.kind in ("band", "recopy", "fill", "fault") for op in forward)


@pytest.mark.parametrize("pattern, grid", [
    (pg.window(9) | pg.global_tokens([0, 1]), (256,)),  # a shared mask and a per-block one
    (pg.criss_cross(), (12, 12)),                         # one group: a mask per block
    (pg.window(3), (12, 12)),                             # two groups, rows back in order
])
@pytest.mark.parametrize("chunk", [None, 1])
def test_sdpa_prices_every_gather_and_per_block_mask_its_forward_runs(pattern, grid, chunk,
                                                                      monkeypatch):
    # row-major layouts: every index_select of the forward (query and key blocks, the output
    # rows back into token order) is a gather op, byte for byte; every flash call with a mask
    # per block (not one shared by the blocks) reads it once per (batch, head): the mask ops;
    # each flash call is a kernel launch (a gathered group in chunks: one per chunk); every
    # output copied into its rows (two groups, or a group in chunks) is a copy op
    from torch.profiler import profile

    from patterngen.backends.sdpa import calls as sdpa_calls
    from patterngen.call import Call

    if chunk is not None:
        monkeypatch.setattr(sdpa_calls, "CHUNK_BYTES", chunk)
    heads, d = 2, 16
    attn = pg.compile(pattern, grid, backend="sdpa")
    (blocks,) = attn.block_sparse()
    assert (blocks["permutation"] == np.arange(np.prod(grid))).all()
    q, k, v = (torch.randn(1, heads, *grid, d) for _ in range(3))
    with torch.no_grad(), profile(record_shapes=True) as prof:
        attn(q, k, v)
    gathered = masks = flash = copied = 0
    for e in prof.events():
        shapes = e.input_shapes
        if e.name == "aten::index_select":  # (batch * heads, tokens, d) by an index, or
            # its (batch * heads * tokens, d) rows by one into all (inputs.select_rows)
            rows, index = shapes[0], shapes[2]
            gathered += (rows[0] if len(rows) == 3 else 1) * index[0] * rows[-1] * 4
        elif e.name == "aten::copy_" and shapes[0] and shapes[0][-1] == d:  # not a mask
            copied += int(np.prod(shapes[0])) * 4
        elif e.name == "aten::_scaled_dot_product_flash_attention_for_cpu":
            flash += 1
            if shapes[5] and shapes[5][1] > 1:
                masks += shapes[0][0] * int(np.prod(shapes[5]))
    ops = _sdpa_ops(pattern, grid, Call(heads=heads, head_dim=d))
    assert gathered == sum(op.count for op in ops if op.kind == "gather") > 0
    assert copied == sum(op.count for op in ops if op.kind == "copy")
    assert copied > 0 or (chunk is None and len(attn.groups[0]) == 1)
    if chunk is None:  # a chunk of one block reads its slice of the mask: shaped as shared
        assert masks == sum(op.count for op in ops if op.kind == "blockmask") > 0
    launches = sum(op.count for op in ops if op.kind == "launch" and op.kernel == "kernel")
    assert flash == launches > (len(attn.groups[0]) if chunk else 0)
    # with a graph, or on CUDA, every group runs whole: one launch each
    for call in (Call(heads=heads, head_dim=d, backward=True),
                 Call(device="cuda", heads=heads, head_dim=d)):
        assert sum(op.count for op in _sdpa_ops(pattern, grid, call)
                   if op.kind == "launch" and op.kernel == "kernel") == len(attn.groups[0])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sdpa_prices_the_kernel_its_inference_with_a_bias_table_runs(dtype):
    # Swin's windows with a bias table, no graph: in float32 the mask-free small groups run
    # baddbmm onto the table's tiles copied into the scores, softmax and bmm (the kept
    # path's forward and one pass over the scores); in bfloat16 the fused kernel, with the
    # table or without; the tiles are gathered once for the windows, which share offsets
    from torch.profiler import profile

    from patterngen.call import Call

    heads, d, grid = 2, 16, (14, 14)
    attn = pg.compile(pg.block(7), grid, backend="sdpa")
    table = torch.randn(heads, *(2 * r + 1 for r in attn.reach)).to(getattr(torch, dtype))
    q, k, v = (torch.randn(1, heads, *grid, d, dtype=getattr(torch, dtype)) for _ in range(3))
    with torch.no_grad(), profile(record_shapes=True) as prof:
        attn(q, k, v, rel_bias=table)
    scores = sum(int(np.prod(e.input_shapes[0])) for e in prof.events()
                 if e.name == "aten::baddbmm_")
    # the table's tiles, one window's offsets for every window: (heads, 49) indices
    gathered = sum(e.input_shapes[0][0] * e.input_shapes[2][0] * table.element_size()
                   for e in prof.events() if e.name == "aten::index_select")
    flash = sum(e.name == "aten::_scaled_dot_product_flash_attention_for_cpu"
                for e in prof.events())
    ops = _sdpa_ops(pg.block(7), grid, Call(heads=heads, head_dim=d, bias=True, dtype=dtype))
    attend = [op for op in ops if op.kind == "attend"]
    masked = sum(op.count for op in ops if op.kind == "mask")
    assert gathered == sum(op.count for op in ops if op.kind == "gather") == heads * 49 ** 2 * (
        table.element_size())
    if dtype == "float32":
        assert flash == 0 and [op.kernel for op in attend] == ["kept"]
        assert masked == scores == attend[0].count * 7 * 7 * 7 * 7 > 0
    else:
        assert flash == 1 and [op.kernel for op in attend] == ["fused"]
        assert masked == scores == 0
        with torch.no_grad(), profile() as prof:  # nor without the table
            attn(q, k, v)
        assert sum(e.name == "aten::_scaled_dot_product_flash_attention_for_cpu"
                   for e in prof.events()) == 1
        assert [op.kernel for op in _sdpa_ops(pg.block(7), grid, Call(
            heads=heads, head_dim=d, dtype=dtype)) if op.kind == "attend"] == ["fused"]


def test_the_block_mask_rate_is_measured_on_a_mask_per_problem(fixed_clock, monkeypatch):
    seen = []
    fused = dense.fused_forward

    def recording(q, k, v, mask, scale):
        seen.append(None if mask is None else tuple(mask.shape))
        return fused(q, k, v, mask, scale)

    monkeypatch.setattr(dense, "fused_forward", recording)
    rates = calibrate.measure("cpu", "float32", only=("blockmask",))
    problems, rows, keys, _ = calibrate.BLOCKMASK_CASE
    assert (1, problems, rows, keys) in seen and None in seen
    mask = rates.executors["blockmask"]
    assert mask.pair_ns >= 0 and mask.backward_factor >= 1.0


def test_a_fused_class_of_fewer_problems_than_threads_takes_its_backward_from_more(
        monkeypatch):
    # the fused kernel's backward splits its work by problem alone: a class benchmarked on
    # fewer problems than threads takes its backward factor from one problem a thread (here
    # a backward that runs 1.5x slower on too few problems); its forward rate stays its own
    seen, backward = [], []
    fused, fused_backward = dense.fused_forward, dense.fused_backward

    def recording(q, *args, **kwargs):
        seen.append(q.shape[1])
        return fused(q, *args, **kwargs)

    def recording_backward(*args, **kwargs):
        backward.append(True)
        return fused_backward(*args, **kwargs)

    def clock(fn, repeats=7):
        seen.clear(), backward.clear()
        fn()
        if not seen:
            return 1.0
        return (3.0 if seen[0] < 4 else 2.0) if backward else 1.0

    monkeypatch.setattr(dense, "fused_forward", recording)
    monkeypatch.setattr(dense, "fused_backward", recording_backward)
    monkeypatch.setattr(calibrate, "_best_ms", clock)
    monkeypatch.setattr(calibrate, "PASSES", 1)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    rates = calibrate.measure("cpu", "float32", only=("attend/",)).executors
    few = 0
    for name, rate in rates.items():
        if name.startswith("attend/fused/"):
            (m, n), d = map(int, name.split("/")[2].split("x")), int(name.split("/d")[1])
            p = calibrate.attend_problems("fused", m, n, d)
            few += p < 4
            assert rate.pair_ns * p * m * n * d == pytest.approx(1e6)  # its own 1 ms forward
            assert rate.backward_factor == pytest.approx(2.0)
    assert few >= 4  # e.g. 256 x 1024 at head_dim 64: one problem


def test_a_matmul_benchmark_holds_scores_for_every_thread():
    # torch's CPU elementwise ops and reductions split their work in grains of 32768
    # elements (ATen's GRAIN_SIZE): each matmul-path class is measured on at least two grains of
    # scores, as the planned calls are (rows of one key hold few in the calls too); the
    # others keep about 2^20 units a benchmark
    grain = 32768
    assert calibrate.MATMUL_SCORES >= 2 * grain
    for kernel, keys in calibrate.ATTEND_KEYS.items():
        for rows in calibrate.ATTEND_ROWS[kernel]:
            for n in keys:
                for d in calibrate.ATTEND_DIMS:
                    p = calibrate.attend_problems(kernel, rows, n, d)
                    units = max(1, (1 << 20) // (max(rows, 4) * n * d))
                    if kernel in ("matmul", "kept") and n > 1:
                        assert p * rows * n >= calibrate.MATMUL_SCORES
                        assert p == max(units, -(-calibrate.MATMUL_SCORES // (rows * n)))
                    else:
                        assert p == units
    # head_dim 64's class of 64 x 64: 16 problems where 2^20 units are 4 (16384 scores)
    assert calibrate.attend_problems("matmul", 64, 64, 64) == 16
    assert calibrate.attend_problems("kept", 64, 64, 64) == 16
    assert calibrate.attend_problems("matmul", 64, 1, 64) == 256


@pytest.mark.parametrize("strategy", ["terms", "sdpa"])
def test_the_spill_counts_the_bytes_of_scores_beyond_the_caches(strategy, monkeypatch):
    # every softmax the call runs is over one kernel call's scores: what each holds beyond
    # the caches (made small here) is the spill ops' count, on the dense term and on sdpa's
    # mask-free groups alike
    import re

    from torch.profiler import profile

    from patterngen import call

    monkeypatch.setattr(call, "CACHE_BYTES", 40_000)
    pattern, grid, batch, heads, d = pg.block(7), (14, 14), 2, 2, 16
    attn = pg.compile(pattern, grid, backend="auto", strategy=strategy, terms="dense")
    q, k, v = (torch.randn(batch, heads, *grid, d) for _ in range(3))
    with torch.no_grad(), profile(record_shapes=True) as prof:
        attn(q, k, v)
    scores = [4 * math.prod(e.input_shapes[0]) for e in prof.events()
              if e.name == "aten::_softmax"]
    plan = pg.plan(pattern, grid, head_dim=d, heads=heads, batch=batch,
                   executors=(strategy,), terms="dense")
    counts = re.findall(r"Op\(spill x (\d+)\)", str(plan))
    assert sum(map(int, counts)) == sum(max(0, s - 40_000) for s in scores) > 0
    monkeypatch.setattr(call, "CACHE_BYTES", max(scores))
    plan = pg.plan(pattern, grid, head_dim=d, heads=heads, batch=batch,
                   executors=(strategy,), terms="dense")
    assert "Op(spill" not in str(plan)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_spill_rate_is_the_forward_time_the_larger_scores_add(monkeypatch, dtype):
    # a clock that gives each kept forward 1 us per problem, and the problems beyond the
    # caches 0.5 ms more: the rate is those 0.5 ms over the bytes beyond the caches (2-byte
    # scores on twice the problems: on float32's they spilled nothing, a division by zero)
    from patterngen.call import ITEMSIZE, spilled

    seen, score_matrix = [], dense.score_matrix

    def recording(q, k, *args, **kwargs):
        seen.append(q.shape[1])
        return score_matrix(q, k, *args, **kwargs)

    def clock(fn, repeats=7):
        seen.clear()
        fn()
        return 0.0 if not seen else seen[-1] * 1e-3 + (0.5 if seen[-1] == many else 0.0)

    monkeypatch.setattr(dense, "score_matrix", recording)
    monkeypatch.setattr(calibrate, "_best_ms", clock)
    monkeypatch.setattr(calibrate, "PASSES", 1)
    rows, keys = calibrate.SPILL_CASE[:2]
    size = ITEMSIZE[dtype]
    few, many = calibrate.spill_problems(size)
    assert spilled(few, rows, keys, size) == 0 < spilled(many, rows, keys, size)
    spill = calibrate.measure("cpu", dtype, only=("spill",)).executors["spill"]
    assert spill.pair_ns == pytest.approx(0.5e6 / spilled(many, rows, keys, size))
    assert spill.backward_factor == calibrate.SPILL_BACKWARD


def test_the_kept_backward_factors_leave_out_the_fixed_cost_of_a_backward(monkeypatch):
    # a clock giving the kept path 1 ns per unit forward and 3 both ways, beside 0.01 ms and
    # 0.2 ms per call: every kept class comes out at a factor of 3, its forward's fixed cost
    # left in its rate
    runs, seen, score_matrix = [], [], dense.score_matrix

    def recording(q, k, *args, **kwargs):
        seen.append(q.shape[-3] * q.shape[-2] * k.shape[-2] * q.shape[-1])
        return score_matrix(q, k, *args, **kwargs)

    def clock(fn, repeats=7):
        seen.clear()
        fn()
        runs.append(fn)
        both = len(runs) % 2 == 0  # a bench runs its forward, then both
        return (3e-6 * seen[0] + 0.2 if both else 1e-6 * seen[0] + 0.01) if seen else 1.0

    monkeypatch.setattr(dense, "score_matrix", recording)
    monkeypatch.setattr(calibrate, "_best_ms", clock)
    monkeypatch.setattr(calibrate, "PASSES", 1)
    rates = calibrate.measure("cpu", "float32", only=("attend/",)).executors
    names = [n for n in rates if n.startswith("attend/kept/")]
    assert len(names) == len(calibrate.ATTEND_ROWS["kept"]) * len(calibrate.ATTEND_KEYS["kept"]) \
        * len(calibrate.ATTEND_DIMS)
    for name in names:
        (m, n), d = map(int, name.split("/")[2].split("x")), int(name.split("/d")[1])
        units = calibrate.attend_problems("kept", m, n, d) * m * n * d  # the bench's
        rate = rates[name]
        assert rate.pair_ns * units == pytest.approx(1e6 * (1e-6 * units + 0.01), rel=1e-9)
        assert rate.backward_factor == pytest.approx(
            (3e-6 * units + 0.2 - 0.19) / (1e-6 * units + 0.01), rel=1e-3)


def test_flash_bias_rebuilds_the_table_gradient_at_the_matmul_forward_rate():
    from patterngen.call import Op

    pattern, grid = pg.block(7), (14, 14)
    attn = pg.compile(pattern, grid, backend="sdpa")
    q, k, v = (torch.randn(1, 2, *grid, 16, requires_grad=True) for _ in range(3))
    table = torch.randn(2, 13, 13, requires_grad=True)
    assert "FlashBiasBackward" in _autograd_nodes(attn(q, k, v, rel_bias=table))
    plan = pg.plan(pattern, grid, head_dim=16, heads=2, backward=True, bias=True,
                   executors=("sdpa",))
    [line] = [line for line in plan.work["sdpa"] if line.startswith("Op(rebuild")]
    assert line.startswith("Op(rebuild/matmul 49x49 d16 x 8)")
    rates = calibrate.Rates.default()
    rebuild = rates.unit_rate(Op("rebuild", 8, (49, 49, 16), "matmul"))
    attend = rates.unit_rate(Op("attend", 8, (49, 49, 16), "matmul"))
    assert rebuild == (attend[0], attend[1], 1.0)
    inference = pg.plan(pattern, grid, head_dim=16, heads=2, bias=True, executors=("sdpa",))
    assert not any(line.startswith("Op(rebuild") for line in inference.work["sdpa"])
    # a table that needs no gradient is a plain mask to the fused kernel, both ways
    table.requires_grad_(False)
    assert "FlashBiasBackward" not in _autograd_nodes(attn(q, k, v, rel_bias=table))
    frozen = pg.plan(pattern, grid, head_dim=16, heads=2, backward=True, bias=True,
                     bias_grad=False, executors=("sdpa",))
    assert not any(line.startswith("Op(rebuild") for line in frozen.work["sdpa"])


def test_a_call_plans_for_whether_its_bias_table_needs_a_gradient():
    pattern, grid = pg.block(7), (14, 14)
    attn = pg.compile(pattern, grid, backend="auto", head_dim=16, heads=2, strategy="sdpa")
    q, k, v = (torch.randn(1, 2, *grid, 16, requires_grad=True) for _ in range(3))
    table = torch.randn(2, 13, 13)
    attn(q, k, v, rel_bias=table).sum().backward()
    assert attn.plan.call.bias and not attn.plan.call.bias_grad
    attn(q, k, v, rel_bias=table.requires_grad_()).sum().backward()
    assert attn.plan.call.bias_grad and table.grad is not None
    assert attn.plan.predicted_ms > attn.plans[-2].predicted_ms  # the table's gradient


def test_sdpa_backward_buffers_beyond_the_resident_bytes_are_priced_as_new_pages():
    from patterngen.backends.executor import RESIDENT
    from patterngen.call import Call

    pattern, grid = pg.window(256, causal=True), (8192,)
    call = Call(heads=8, head_dim=64, backward=True)
    ops = _sdpa_ops(pattern, grid, call)
    # each group's whole-input gradients (its fill, zero-filled and added: twice their
    # bytes) and the fused backward's key and value gradients, per query head
    kv = sum(2 * op.count * op.shape[1] * 64 * 4 for op in ops
             if op.kind == "attend" and op.kernel == "fused")
    allocated = sum(op.count for op in ops if op.kind == "fill") // 2 + kv
    [fault] = [op for op in ops if op.kind == "fault"]
    assert fault.count == allocated - RESIDENT > 0
    small = _sdpa_ops(pg.window(16, causal=True), (600,), call)
    assert not any(op.kind == "fault" for op in small)
    # CUDA's caching allocator keeps its blocks
    on_cuda = _sdpa_ops(pattern, grid, Call(device="cuda", heads=8, head_dim=64, backward=True))
    assert not any(op.kind == "fault" for op in on_cuda)


def test_the_fault_rate_is_measured(fixed_clock):
    rates = calibrate.measure("cpu", "float32", only=("fault",))
    fault = rates.executors["fault"]
    assert fault != calibrate.Rates.default().executors["fault"]
    assert fault.pair_ns > 0 and fault.backward_factor == 1.0


def test_a_calibration_on_a_busy_machine_warns(fixed_clock, monkeypatch):
    cores = os.cpu_count()
    monkeypatch.setattr(os, "getloadavg", lambda: (cores + 3.0, 0.0, 0.0))
    with pytest.warns(UserWarning, match=rf"calibrated while the machine was busy \(load "
                                         rf"average {cores + 3}\.0 on {cores} cores"):
        calibrate.measure("cpu", "float32", only=("fault",))
    monkeypatch.setattr(os, "getloadavg", lambda: (0.2, 0.0, 0.0))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        calibrate.measure("cpu", "float32", only=("fault",))
    assert not any("busy" in str(w.message) for w in seen)


@pytest.mark.parametrize("pattern, grid", [
    (pg.criss_cross(), (8, 8)),                  # the row masks the column's pairs: one scan
    (pg.criss_cross() | pg.window(3), (8, 8)),   # both dense terms masked
    (pg.axis(0), (200, 2)),                      # 200 keys: the fused kernel scans
    (pg.axis(0), (8, 8)),                        # alone, no mask: nothing scanned
    (pg.block(4, offset=1), (8, 8)),             # alone and masked: autograd checks its output
    (pg.axis(0) | pg.global_tokens([(0, 0)]), (6, 6)),
])
def test_the_scans_priced_are_the_scans_run(pattern, grid, monkeypatch):
    # a dense term checks k and v for non-finite values before the fused kernel and before a
    # masked matmul: the plan's scan ops count exactly the elements the forward scans
    from patterngen.backends.planned import dense_term

    scanned = []

    def counting(k, v):
        scanned.append(k.numel() + v.numel())
        return False

    monkeypatch.setattr(dense_term, "non_finite", counting)
    attn = pg.compile(pattern, grid, backend="auto", strategy="terms")
    q, k, v = (torch.randn(1, 2, *grid, 16) for _ in range(3))
    with torch.no_grad():
        attn(q, k, v)
    lines = [line for tps in attn.plan.patterns for tp in tps for line in tp.work]
    priced = [int(line.split(" x ")[1].split(")")[0]) for line in lines
              if line.startswith("Op(scan x ")]
    assert sorted(priced) == sorted(scanned)


def test_the_choice_weighs_the_numba_kernels_wherever_they_run():
    # the term-wise plan's gather group is the numba kernels too: its share carries their
    # margin as the whole pattern on them does, and print(plan) shows what was compared
    from patterngen.backends import executors

    margin = executors()["gather"].margin
    plan = pg.plan(pg.criss_cross() | pg.window(3), (32, 32), terms="dense")
    terms = pg.plan(pg.criss_cross() | pg.window(3), (32, 32), executors=("terms",),
                    terms="dense")
    executed = [tp.executor for tp in terms.patterns[0]]
    assert "gather" in executed and "dense" in executed
    gathered = sum(tp.predicted_ms for tp in terms.patterns[0] if tp.executor == "gather")
    assert plan.compared["terms"] == pytest.approx(plan.options["terms"]
                                                   + (margin - 1) * gathered)
    assert plan.compared["numba"] == pytest.approx(plan.options["numba"]
                                                   * executors()["numba"].margin)
    assert plan.compared["sdpa"] == plan.options["sdpa"]
    assert plan.strategy == min(plan.compared, key=plan.compared.get)
    assert f"numba {plan.options['numba']:.3g} ms (compared as {plan.compared['numba']:.3g})" \
        in str(plan)


def _profiled_forward(pattern, grid):
    """A term-wise plan of dense terms compiled and run without gradients on (2, 3, *grid,
    16) inputs: ``(attn, the torch ops of its second call, with their input shapes)``."""
    from torch.profiler import profile

    attn = pg.compile(pattern, grid, backend="auto", strategy="terms", terms="dense")
    q, k, v = (torch.randn(2, 3, *grid, 16) for _ in range(3))
    with torch.no_grad():
        attn(q, k, v)
        with profile(record_shapes=True) as prof:
            attn(q, k, v)
    return attn, prof.events()


@pytest.mark.parametrize("pattern, grid", [
    (pg.stripe(1, width=2), (8, 8)),    # tiles of whole rows: a tile index, then its rows
    (pg.area(2), (8, 6)),
    (pg.block((2, 6)), (8, 6)),         # one tile across the second axis
    (pg.axis(1), (8, 6)),               # CCNet's row
    (pg.axis(0), (8, 6)),               # its column: a transpose
    (pg.block(4), (8, 8)),
    (pg.block(3), (8, 6)),              # padded
    (pg.block(4, offset=2), (8, 8)),    # rolled
    (pg.window(2, dilation=4), (8, 8)),
])
def test_a_dense_term_is_charged_the_copies_its_views_make(pattern, grid):
    # DenseShape.copied against what the forward runs: a copy of q, k, v into the problems
    # and of the output back exactly where the plan prices them
    attn, events = _profiled_forward(pattern, grid)
    copies = {e.name for e in events} & {"aten::copy_", "aten::index_select"}
    [[term]] = attn.plan.patterns
    assert bool(copies) == term.dense.copied
    assert any(line.startswith("Op(copy") for line in term.work) == term.dense.copied


@pytest.mark.parametrize("pattern, grid", [
    (pg.block(4, offset=2), (8, 8)),
    (pg.block(3, offset=1), (7, 5)),     # rolled on the first axis, padded on the second
])
def test_a_rolled_view_is_priced_as_the_gathers_it_runs(pattern, grid):
    # the views of a rolled term are index_selects (of rows of (batch * heads * tokens, d)):
    # the plan's copy/roll bytes are those the forward's index_selects write, at the roll's
    # rate (each row gathered once), and again by the adjoint in the backward
    from patterngen.call import Op

    attn, events = _profiled_forward(pattern, grid)
    selects = [e.input_shapes for e in events if e.name == "aten::index_select"]
    assert selects and all(len(src) == 2 and dim == [] for src, dim, _ in selects)
    written = sum(index[0] * src[1] * 4 for src, _, index in selects)
    [[term]] = attn.plan.patterns
    assert term.dense.rolled
    [priced] = [line for line in term.work if line.startswith("Op(copy")]
    assert priced.startswith(f"Op(copy/roll x {written})")
    rates = calibrate.Rates.default()
    roll, copy = rates.executors["roll"], rates.executors["copy"]
    assert rates.unit_rate(Op("copy", 10, kernel="roll")) == (10, roll.pair_ns, 2.0)
    assert rates.unit_rate(Op("recopy", 10, kernel="roll")) == (10, roll.pair_ns, 1.0)
    assert rates.unit_rate(Op("copy", 10)) == (10, copy.pair_ns, copy.backward_factor)


@pytest.mark.parametrize("pattern, grid, masked", [
    (pg.block(4, offset=2), (8, 8), True),   # Swin's shifted windows: the roll's mask
    (pg.block(3), (8, 6), True),             # padded tiles
    (pg.axis(0), (8, 6), False),
    (pg.axis(0) | pg.axis(1), (8, 8), True),  # the row's diagonal: holes filled, merged
])
def test_a_mask_is_priced_on_the_scores_it_is_added_to(pattern, grid, masked):
    # the matmul paths add a term's mask to its scores after the GEMM (broadcast over the
    # batch and heads; or fill its few holes): the plan's mask op counts those scores
    attn, events = _profiled_forward(pattern, grid)
    scores = sum(math.prod(e.input_shapes[0]) for e in events
                 if e.name == "aten::index_fill_"
                 or e.name == "aten::add_" and e.input_shapes[1] != e.input_shapes[0])
    priced = [line for tps in attn.plan.patterns for tp in tps for line in tp.work
              if line.startswith("Op(mask")]
    assert bool(priced) == masked
    assert scores == (int(priced[0].split(" x ")[1].split(")")[0]) if masked else 0)


@pytest.mark.parametrize("pattern, grid", [
    (pg.block(7), (14, 14)),          # W3-bias's windows
    (pg.block(4, offset=1), (8, 7)),  # rolled and padded: the mask added after the table
])
@pytest.mark.parametrize("trains", [False, True])
def test_a_lone_terms_table_in_training_is_priced_on_the_scores_it_is_added_to(
        pattern, grid, trains, monkeypatch):
    # the kept path adds the table to the scores (dense.KeptAttention), then the mask: a
    # pass over them each, the plan's mask op; its backward sums the table's gradient only
    # where the table trains
    from torch.profiler import profile

    sums, real = [], dense.bias_grad
    monkeypatch.setattr(dense, "bias_grad", lambda *a: sums.append(a) or real(*a))
    attn = pg.compile(pattern, grid, backend="auto", strategy="terms", terms="dense")
    q, k, v = (torch.randn(2, 3, *grid, 16, requires_grad=True) for _ in range(3))
    reach = pg.bias.reach(pg.lower(pattern, grid))
    table = torch.randn(3, *(2 * r + 1 for r in reach), requires_grad=trains)
    with profile(record_shapes=True) as prof:
        out = attn(q, k, v, rel_bias=table)
    scores = sum(math.prod(e.input_shapes[0]) for e in prof.events()
                 if e.name in ("aten::add", "aten::add_")
                 and e.input_shapes[1] != e.input_shapes[0])
    lines = [line for tps in attn.plan.patterns for tp in tps for line in tp.work]
    assert any(line.startswith("Op(attend/kept") for line in lines)
    [priced] = [line for line in lines if line.startswith("Op(mask")]
    assert scores == int(priced.split(" x ")[1].split(")")[0]) > 0
    out.sum().backward()
    assert len(sums) == trains and (table.grad is not None) == trains


@pytest.mark.parametrize("layout", ["contiguous", "projection"])
def test_a_lone_biased_rolled_inference_is_priced_on_what_its_kernel_reads(layout):
    # without gradients a lone rolled term with a table runs the fused kernel with bias plus
    # region mask, one per problem, and checks its output: no scan of k and v, and the mask
    # read for each batch and head (blockmask) as many elements as the kernel's calls read
    from torch.profiler import profile

    grid, heads = (16, 16), 3
    attn = pg.compile(pg.block(4, offset=2), grid, backend="auto", strategy="terms",
                      terms="dense")
    if layout == "projection":
        q, k, v = torch.randn(2, *grid, 3, heads, 16).permute(3, 0, 4, 1, 2, 5)
    else:
        q, k, v = (torch.randn(2, heads, *grid, 16) for _ in range(3))
    table = torch.randn(heads, 7, 7)
    with torch.no_grad():
        attn(q, k, v, rel_bias=table)
        with profile(record_shapes=True) as prof:
            attn(q, k, v, rel_bias=table)
    [[term]] = attn.plan.patterns
    assert term.dense.rolled and not any(line.startswith("Op(scan") for line in term.work)
    read = sum(math.prod(e.input_shapes[0][:3]) * e.input_shapes[1][2]
               for e in prof.events() if "flash_attention" in e.name and e.input_shapes[0])
    [priced] = [line for line in term.work if line.startswith("Op(blockmask")]
    assert priced.startswith(f"Op(blockmask x {read})")
    assert not any(e.name == "aten::isfinite" or e.name == "aten::mul"
                   and e.input_shapes[0] in (list(k.shape), [2, heads, 256, 16])
                   for e in prof.events())
