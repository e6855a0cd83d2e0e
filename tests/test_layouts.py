"""Any tensor layout: every backend and every executor of the planner gives, for q, k, v, extra
keys/values and a bias table in a layout torch can produce (transposed, permuted, split, sliced,
offset, channels-last, stride-0 expanded batch or heads; k and v with all or grouped heads),
the outputs and gradients of the contiguous call. The storage around each view holds NaN, so a
kernel that reads past its view or ignores a stride poisons the output."""

import functools
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from patterngen import backends
from oracle import check_against_oracle

GRID = (12, 12)
# area(1) is one 144-key problem: a dense term past MATMUL_KEYS, run by the fused kernel
PATTERNS = [pg.area(1), pg.area(3), pg.window(3), pg.criss_cross(), pg.window(3) | pg.axis(1)]
#: (backend, compile options): every registered backend, and the planner's executors forced
EXECUTORS = [(name, {"compile": False} if name == "flex" else {})
             for name in backends.available() if not name.startswith("test_")]
EXECUTORS += [("auto", {"strategy": "terms", "terms": "dense"}),
              ("auto", {"strategy": "terms", "terms": "gather"})]


@st.composite
def layouts(draw, ndim: int):
    """How a tensor of ``ndim`` dims lies in memory: the order its dims are stored in,
    per-dim padding before and after it (slices, splits, storage offset), a step, and whether
    the batch or heads dim is a stride-0 expansion."""
    return dict(order=draw(st.permutations(range(ndim))),
                before=[draw(st.integers(0, 2)) for _ in range(ndim)],
                after=[draw(st.integers(0, 2)) for _ in range(ndim)],
                step=[draw(st.sampled_from([1, 1, 2])) for _ in range(ndim)],
                expand=draw(st.sampled_from([None, None, 0, 1])))


def laid_out(values: torch.Tensor, layout: dict) -> torch.Tensor:
    """A view with ``values`` (after the layout's expansion) in ``layout``, NaN around it."""
    shape = values.shape
    if layout["expand"] is not None:  # one stored slice, every index of the dim reads it
        one = list(shape)
        one[layout["expand"]] = 1
        return laid_out(values.narrow(layout["expand"], 0, 1),
                        {**layout, "expand": None}).expand(shape)
    order, step = layout["order"], layout["step"]
    full = [layout["before"][i] + step[i] * shape[i] + layout["after"][i] for i in order]
    storage = torch.full(full, float("nan"), dtype=values.dtype)
    view = storage.permute([order.index(i) for i in range(len(shape))])
    for i, n in enumerate(shape):
        view = view.narrow(i, layout["before"][i], step[i] * n)[
            (slice(None),) * i + (slice(None, None, step[i]),)]
    view.copy_(values)
    return view


def expanded(values: torch.Tensor, layout: dict) -> torch.Tensor:
    """``values`` as the layout holds them: equal along an expanded dim."""
    if layout["expand"] is None:
        return values
    return values.narrow(layout["expand"], 0, 1).expand(values.shape).clone()


@functools.cache
def _compiled(name: str, pattern: int, options: tuple):
    return pg.compile(PATTERNS[pattern], GRID, backend=name, **dict(options))


def _supports(name: str, flag: str) -> bool:
    return getattr(backends.get_backend(name), flag, False)


@pytest.mark.parametrize("name, options", EXECUTORS,
                         ids=[f"{n}-{'-'.join(map(str, o.values()))}" for n, o in EXECUTORS])
@settings(max_examples=300 if os.environ.get("PATTERNGEN_LONG") == "1" else 8)
@given(data=st.data())
def test_any_layout_gives_the_contiguous_result(name, options, data):
    # eager FlexAttention materialises every score: fewer examples there
    if name == "flex" and data.draw(st.integers(0, 2), "flex sample"):
        return
    cls = backends.get_backend(name)
    dtype = torch.float64 if "float64" in cls.SUPPORTED_DTYPES else torch.float32
    grad = "cpu" in cls.BACKWARD_DEVICES
    # area(1) drawn more often: the fused kernel is where a strided row went wrong
    pattern = data.draw(st.sampled_from([0, *range(len(PATTERNS))]), "pattern")
    gridded = data.draw(st.booleans(), "gridded")
    # batch 1 often: then (batch, heads) merge into a view whatever the layout, and the
    # strided rows reach the kernels
    batch = data.draw(st.sampled_from([1, 2]), "batch")
    kv = data.draw(st.sampled_from([2, 1]), "kv heads")  # 1: grouped (MQA)
    shape = (batch, 2, *GRID, 4) if gridded else (batch, 2, GRID[0] * GRID[1], 4)
    extra = data.draw(st.sampled_from([0, 0, 3]), "extra keys") \
        if _supports(name, "SUPPORTS_ADDITIONAL_KEYS") else 0
    table = not extra and _supports(name, "SUPPORTS_REL_POS_BIAS") and data.draw(
        st.booleans(), "bias table")
    attn = _compiled(name, pattern, tuple(options.items()))
    inputs = {n: torch.randn(shape[:1] + (2 if n == "q" else kv,) + shape[2:], dtype=dtype)
              for n in "qkv"}
    if extra:
        for n in ("additional_keys", "additional_values"):
            inputs[n] = torch.randn(batch, kv, extra, 4, dtype=dtype)
    if table:
        inputs["rel_bias"] = torch.randn(2, *(2 * r + 1 for r in attn.reach), dtype=dtype)
    strided, plain = {}, {}
    for n, t in inputs.items():
        layout = data.draw(layouts(t.dim()), n)
        if n == "rel_bias":
            layout["expand"] = None
        values = expanded(t, layout)
        strided[n] = laid_out(values, layout).requires_grad_(grad) if n == "rel_bias" \
            else laid_out(values.requires_grad_(grad), layout)
        plain[n] = values.detach().clone().requires_grad_(grad)
    assert_as_contiguous(attn, strided, plain, grad)


def assert_as_contiguous(attn, strided: dict, plain: dict, grad: bool):
    """``attn`` called with the ``strided`` inputs (q, k, v, then keyword options) gives the
    output, and with ``grad`` the gradients of every input, of the call with ``plain``."""
    # gradients are taken with respect to exactly what each call received (the views)
    names = ["q", "k", "v", *(n for n in strided if n not in "qkv")]
    with torch.set_grad_enabled(grad):
        out = attn(*(strided[n] for n in "qkv"), **{n: strided[n] for n in names[3:]})
        want = attn(*(plain[n] for n in "qkv"), **{n: plain[n] for n in names[3:]})
    # the same kernels on the same values; a copy may change a float32 sum's order
    tol = 1e-9 if out.dtype == torch.float64 else 2e-5
    assert not out.isnan().any()
    torch.testing.assert_close(out, want, atol=tol, rtol=tol)
    if not grad:
        return
    dout = torch.randn_like(want)
    got = torch.autograd.grad(out, [strided[n] for n in names], dout)
    ref = torch.autograd.grad(want, [plain[n] for n in names], dout)
    for n, g, w in zip(names, got, ref):
        torch.testing.assert_close(g, w, atol=tol, rtol=tol, msg=lambda m, n=n: f"d{n}: {m}")


def channels_first(heads: int, tokens: int, head_dim: int):
    """q, k, v as a vision model gets them from a 1x1 convolution (ultralytics' YOLOv12
    ``AAttn``: ``qkv(x).flatten(2).transpose(1, 2)``, then view, permute, split)."""
    base = torch.randn(1, 3 * heads * head_dim, tokens).transpose(1, 2)
    return base.view(1, tokens, heads, 3 * head_dim).permute(0, 2, 1, 3).split(head_dim, -1)


PINNED = [pg.area(4), pg.window(7), pg.criss_cross()]


@pytest.mark.parametrize("pattern", PINNED, ids=repr)
def test_channels_first_views_on_auto(pattern):
    # the case: area(4) planned term-wise returned NaN (its dense term's 400 keys run
    # on the fused CPU kernel, which read the strided rows as contiguous)
    torch.manual_seed(0)
    q, k, v = (t.requires_grad_() for t in channels_first(2, 1600, 32))
    attn = check_against_oracle("auto", pattern, (40, 40), q, k, v, atol=2e-5,
                                strategy="terms")
    plan = attn.plans[-1]
    assert not plan.contiguous
    assert pattern != pg.area(4) or plan.patterns[0][0].dense.keys == 400


@pytest.mark.parametrize("name", ["auto", "sdpa"])
@pytest.mark.parametrize("pattern", PINNED, ids=repr)
def test_channels_first_views_with_a_bias_table(name, pattern):
    # sdpa runs the fused kernel itself when the table needs a gradient (it read strided rows);
    # numba with a table is among the random layouts above
    torch.manual_seed(1)
    attn = pg.compile(pattern, (40, 40), backend=name)
    q, k, v = (t.requires_grad_() for t in channels_first(2, 1600, 8))
    table = torch.randn(2, *(2 * r + 1 for r in attn.reach), requires_grad=True)
    plain = {n: t.detach().contiguous().requires_grad_() for n, t in zip("qkv", (q, k, v))}
    plain["rel_bias"] = table.detach().clone().requires_grad_()
    assert_as_contiguous(attn, dict(q=q, k=k, v=v, rel_bias=table), plain, grad=True)


def test_the_planner_prices_the_copies_of_strided_inputs():
    from patterngen.calibrate import Rates
    from patterngen.plan import COPYING, plan

    rates = Rates.default()
    sizes = dict(head_dim=16, heads=2, batch=3, rates=rates, backward=True)
    plain = plan(pg.window(3) | pg.axis(0), (10, 12), **sizes)
    strided = plan(pg.window(3) | pg.axis(0), (10, 12), contiguous=False, **sizes)
    # one pass over q, k, v per (batch, head), forward and backward
    copy = 2 * rates.predict("merge", 0, 16, calls=0, tokens=3 * 120 * 3 * 2)
    terms = plan(pg.window(3) | pg.axis(0), (10, 12), contiguous=False, executors=["terms"],
                 **sizes)
    executors = [tp.executor for tp in terms.patterns[0]]
    # term-wise: the gather group copies once, and each dense term its own view
    parts = ("gather" in executors) + executors.count("dense")
    for name, charged in (("numba", 1), ("sdpa", 0), ("terms", parts)):
        assert strided.options[name] == pytest.approx(plain.options[name] + charged * copy)
    assert "numba" in COPYING and "sdpa" not in COPYING
    assert "inputs not contiguous" in str(strided) and "contiguous" not in str(plain)


@pytest.mark.parametrize("pattern, grid, copied", [
    (pg.block(4), (8, 8), True),  # windows: the view permutes, a copy that reads any strides
    (pg.axis(0), (6, 8), True),  # columns: the same
    (pg.axis(1), (6, 8), False),  # rows: a pure view, so strided inputs are copied on their own
])
def test_a_dense_terms_own_copy_reads_strided_inputs(pattern, grid, copied):
    from patterngen.calibrate import Rates
    from patterngen.plan import plan

    sizes = dict(executors=["terms"], head_dim=16, heads=2, batch=3, rates=Rates.default(),
                 backward=True)
    plain, strided = plan(pattern, grid, **sizes), plan(pattern, grid, contiguous=False, **sizes)
    assert [tp.executor for tp in strided.patterns[0]] == ["dense"]
    assert (strided.options["terms"] == plain.options["terms"]) == copied
    assert ("restride" in str(strided)) != copied
