"""Relations that are dense after a strided view (MaxViT's grid attention, dilated windows that
cover their residue class, blocks of dilated tiles, strided windows whose runs are tiles): the
planner's recogniser against brute force, and the dense terms against the float64 oracle
(forward and every gradient), with ragged classes, unions, grouped kv heads, a bias table, a
softcap and extra keys; and against timm's ``grid_partition`` written out here."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import patterngen as pg
from patterngen import ir
from patterngen.backends import dense, planned
from patterngen.errors import PatternError
from patterngen.plan import dense_mask, dense_shape, dense_shapes
from oracle import assert_gradients_equal, check_against_oracle, reference
from test_bias import check as check_with_table

DENSE = dict(strategy="terms", terms="dense")


@st.composite
def axis_relations(draw):
    """An axis length and one relation on it, spelled as a window (any dilation, border,
    causality, stride) possibly met with a block: most are gathers, some strided tiles."""
    n = draw(st.integers(1, 40))
    d = draw(st.integers(1, max(1, min(6, n))))
    k = draw(st.integers(1, max(1, n // d)))
    window = pg.window(k, dilation=d, border=draw(st.sampled_from(["clamp", "pad"])),
                       causal=draw(st.booleans()), stride=draw(st.integers(1, k)))
    if draw(st.booleans()):
        m = draw(st.integers(1, n + 3))
        window = window & pg.block(m, offset=draw(st.integers(0, m - 1)))
    return n, window


@settings(max_examples=300, deadline=None)
@given(axis_relations())
def test_a_recognised_relation_lies_inside_its_problems(case):
    # sound: every pair of the relation lies in one problem of the view (the mask then keeps
    # exactly the relation's pairs); each position appears once in the view
    n, spec = case
    [term] = pg.lower(spec, (n,)).terms
    for lowering in ("pad", "roll"):
        shape = dense_shape(term, (n,), lowering)
        if isinstance(shape, str):
            return
        [axis] = shape.axes
        for side in "qk":
            c = axis.coords(side)
            assert sorted(c[c >= 0].tolist()) == list(range(n))
        # and the mask the dense term runs with keeps exactly the relation's pairs
        mask = dense_mask(shape, term, ())
        problems = len(axis.coords("q"))
        inside = shape.executed_pairs if mask is None else int(mask.sum()) * (
            problems if len(mask) == 1 else 1)
        assert inside == int(term.rels[0].counts(n).sum())


@pytest.mark.parametrize("n, spec, want", [
    # MaxViT's grid: G = 7 tokens of each residue class modulo H // G
    (56, pg.window(7, dilation=8), "tiles(7, dilation 8)"),
    (14, pg.window(7, dilation=2), "tiles(7, dilation 2)"),
    # the same relation spelled as a dilated window met with a block covering the axis
    (14, pg.window(7, dilation=2) & pg.block(14), "tiles(7, dilation 2)"),
    # blocks of dilated tiles, ragged: 50 = 28 + 22, the last tile's classes 4 or 3 long
    (50, pg.window(7, dilation=7) & pg.block(28), "tiles(4, dilation 7, pad 0+6)"),
    (20, pg.window(6, dilation=3) & pg.block(12, offset=4),
     "tiles(4, dilation 3, roll 4, pad 0+4)"),
    # a strided dilated window whose runs are tiles; a causal one (Sparse Transformer's
    # strided pattern, causal pairs masked)
    (16, pg.window(4, dilation=2, stride=4), "tiles(4, dilation 2)"),
    (32, pg.window(8, dilation=4, causal=True), "tiles(8, dilation 4)"),
    # Swin's tiles are the contiguous case, rolled as Swin rolls them (8 tiles, not 9); a
    # clamped window over the whole axis is one tile
    (56, pg.block(7, offset=3), "tiles(7, roll 3)"),
    (9, pg.window(9), "tiles(9)"),
])
def test_strided_relations_are_dense(n, spec, want):
    [term] = pg.lower(spec, (n,)).terms
    assert repr(dense_shape(term, (n,)).axes[0]) == want


@pytest.mark.parametrize("n, spec, pad, roll", [
    (56, pg.block(7, offset=3), "tiles(7, pad 4+3)", "tiles(7, roll 3)"),
    # the tiles cut at both ends fit one tile with room to spare: padded after the roll
    (12, pg.block(7, offset=3), "tiles(7, pad 4+5)", "tiles(7, roll 3, pad 0+2)"),
    (20, pg.window(6, dilation=3) & pg.block(12, offset=4), "tiles(4, dilation 3, pad 8+8)",
     "tiles(4, dilation 3, roll 4, pad 0+4)"),
    # the cut tiles (5 + 4 positions) do not fit one tile: no roll offered
    (16, pg.block(7, offset=5), "tiles(7, pad 2+3)", None),
    # no tile saved: rolled only when asked for
    (10, pg.block(7, offset=3), "tiles(7, pad 4+0)", None),
])
def test_both_lowerings_of_cut_tiles_are_offered(n, spec, pad, roll):
    [term] = pg.lower(spec, (n,)).terms
    got = {name: repr(shape.axes[0]) for name, shape in dense_shapes(term, (n,)).items()}
    assert got == {"pad": pad, **({"roll": roll} if roll else {})}
    assert repr(dense_shape(term, (n,), "pad").axes[0]) == pad
    assert repr(dense_shape(term, (n,)).axes[0]) == (roll or pad)
    if n == 10:
        assert repr(dense_shape(term, (n,), "roll").axes[0]) == "tiles(7, roll 3, pad 0+4)"
    with pytest.raises(PatternError, match=r"Invalid lowering='wrap'; expected one of"):
        dense_shape(term, (n,), "wrap")


def test_windows_that_miss_part_of_their_class_stay_gathers():
    # a clamped window of 7 on classes of 8: each query has its own keys
    for n, spec in [(64, pg.window(7, dilation=8)), (15, pg.window(7, dilation=2)),
                    (11, pg.window(3, dilation=3) & pg.block(9, offset=4))]:
        [term] = pg.lower(spec, (n,)).terms
        assert "gather" in dense_shape(term, (n,))


CASES = [
    (pg.window(7, dilation=2), (14, 14)),                          # MaxViT grid, G=7, 14x14
    (pg.window((3, 2), dilation=(3, 4)), (9, 8)),
    (pg.window(4, dilation=3) & pg.block(6, offset=2), (17, 13)),   # ragged, padded, offset
    (pg.window((2, 2, 3), dilation=(2, 3, 1)) & pg.block((4, 6, 2)), (5, 7, 4)),  # 3-D
    (pg.window(8, dilation=4, causal=True), (32,)),
    (pg.window(3, dilation=3) | pg.window(3) | pg.axis(0), (9, 9)),   # with gather and dense
    (pg.window(4, dilation=2, stride=4) | pg.global_tokens([3]), (16,)),
]


@pytest.mark.parametrize("fused", [False, True], ids=["matmul", "fused"])
@pytest.mark.parametrize("spec, grid", CASES, ids=[repr(s) for s, _ in CASES])
def test_strided_terms_equal_the_oracle(spec, grid, fused, monkeypatch):
    monkeypatch.setattr(dense, "MATMUL_KEYS", 0 if fused else dense.MATMUL_KEYS)
    gen = torch.Generator().manual_seed(sum(grid))
    q, k, v = (torch.randn(2, 3, *grid, 8, generator=gen, dtype=torch.float64,
                           requires_grad=True) for _ in range(3))
    attn = check_against_oracle("auto", spec, grid, q, k, v, **DENSE)
    dilated = [tp for tp in attn.plan.patterns[0] if tp.executor == "dense"
               and any(ax.kind == "tiles" and ax.dilation > 1 for ax in tp.dense.axes)]
    assert dilated


@pytest.mark.parametrize("softcap", [None, 1.5])
def test_strided_terms_add_a_bias_table(softcap):
    spec, grid = pg.window(4, dilation=3) & pg.block(6, offset=2), (13, 12)
    attn = check_with_table("auto", spec, grid, softcap=softcap, **DENSE)
    assert attn.plan.patterns[0][0].dense.axes[0].dilation == 3


def test_strided_terms_with_grouped_kv_heads_extra_keys_and_a_softcap():
    spec, grid = pg.window((3, 2), dilation=3) | pg.axis(1), (9, 6)
    attn = pg.compile(spec, grid, backend="auto", softcap=2.0, **DENSE)
    assert attn.plan.patterns[0][0].dense.axes[0].dilation == 3
    gen = torch.Generator().manual_seed(5)
    q, k, v, ak, av = (torch.randn(2, n, *shape, 8, generator=gen, dtype=torch.float64,
                                   requires_grad=True)
                       for n, shape in ((6, grid), (2, grid), (2, grid), (2, (3,)), (2, (3,))))
    out = attn(q, k, v, additional_keys=ak, additional_values=av)
    want = reference(spec, grid, q, k, v, additional_keys=ak, additional_values=av,
                     softcap=2.0).reshape(out.shape)
    torch.testing.assert_close(out, want)
    assert_gradients_equal(out, want, (q, k, v, ak, av), gen)


def test_maxvit_grid_attention_plans_one_dense_batch():
    # 56x56, G=7: 64 classes of 7x7 tokens, as many problems as Swin's 7x7 windows
    plan = pg.plan(pg.window(7, dilation=56 // 7), grid=(56, 56), head_dim=32, heads=4,
                   backward=True, executors=("terms", "numba"))
    [[term]] = plan.patterns
    assert plan.strategy == "terms" and term.executor == "dense"
    assert (term.dense.batch, term.dense.queries, term.dense.keys) == (64, 49, 49)
    assert term.executed == term.pairs == 56 * 56 * 49
    # the IR and its exact count are those of the window: only the execution changed
    assert pg.lower(pg.window(7, dilation=8), (56, 56)).pairs() == 56 * 56 * 49


def grid_partition(x, g):
    """timm's ``grid_partition`` (maxxvit.py), written from its definition:
    ``(B, H, W, C)`` -> ``(B * H/g * W/g, g, g, C)``, window ``(i, j)`` holding the tokens
    ``(a * H/g + i, b * W/g + j)``."""
    b, h, w, c = x.shape
    x = x.view(b, g, h // g, g, w // g, c).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, g, g, c)


def grid_reverse(windows, g, h, w):
    """timm's ``grid_reverse``: the inverse of :func:`grid_partition`."""
    c = windows.shape[-1]
    x = windows.view(-1, h // g, w // g, g, g, c).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(-1, h, w, c)


@pytest.mark.parametrize("h, w, g", [(14, 14, 7), (12, 8, 4)])
def test_grid_attention_equals_timm_s_grid_partition(h, w, g):
    gen = torch.Generator().manual_seed(h + w)
    heads, dim = 2, 8
    q, k, v = (torch.randn(2, heads, h, w, dim, generator=gen, dtype=torch.float64,
                           requires_grad=True) for _ in range(3))

    def timm(q, k, v):  # per head: partition, softmax attention in each window, reverse
        parts = [grid_partition(t.flatten(0, 1), g).flatten(1, 2) for t in (q, k, v)]
        attn = torch.softmax(parts[0] @ parts[1].transpose(-1, -2) * dim ** -0.5, -1)
        return grid_reverse(attn @ parts[2], g, h, w).view(2, heads, h, w, dim)

    spec = pg.window(g, dilation=(h // g, w // g))
    attn = pg.compile(spec, (h, w), backend="auto", **DENSE)
    assert attn.plan.patterns[0][0].executor == "dense"
    out, want = attn(q, k, v), timm(q, k, v)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    dout = torch.randn(out.shape, generator=gen, dtype=torch.float64)
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), dout),
                          torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12, msg=f"d{name}")
    # and the relation itself: a query sees exactly the tokens of its timm window
    index = grid_partition(torch.arange(h * w).view(1, h, w, 1), g).reshape(-1, g * g)
    window_of = torch.empty(h * w, dtype=torch.long)
    window_of[index.reshape(-1)] = torch.arange(index.shape[0]).repeat_interleave(g * g)
    same = (window_of[:, None] == window_of[None, :]).numpy()
    np.testing.assert_array_equal(pg.materialize(spec, (h, w)), same)


def test_recognition_reads_bounds_not_names():
    # a relation built from atoms directly (as distributed's tables or a meet would give)
    rel = ir.Rel.of(ir.Window(7, 8), ir.Block(56))
    [axis] = dense_shape(ir.Term((rel,)), (56,)).axes
    assert (axis.size, axis.dilation, axis.batch) == (7, 8, 8)


def test_a_lone_dense_term_runs_through_autograd_unless_keys_are_not_finite(monkeypatch):
    # one dense term without a mask: views, bmm, softmax, bmm under torch's autograd (no
    # recomputation in the backward); an infinite key sends the call to the exact merge
    calls = []
    forward = planned.DenseTerm.forward
    monkeypatch.setattr(planned.DenseTerm, "forward",
                        lambda self, *a, **kw: calls.append(1) or forward(self, *a, **kw))
    spec, grid = pg.window(7, dilation=2), (14, 14)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, *grid, 8, generator=gen, dtype=torch.float64,
                           requires_grad=True) for _ in range(3))
    check_against_oracle("auto", spec, grid, q, k, v, **DENSE)
    assert not calls
    k = k.detach().clone()
    k[0, 0, 0, 0, 0] = float("-inf")
    pg.compile(spec, grid, backend="auto", **DENSE)(q, k, v)
    assert calls


@pytest.mark.parametrize("spec", [pg.window(7, dilation=2), pg.block(7, offset=3)])
def test_a_repeated_kind_of_call_is_still_checked_and_exact(spec):
    # the checks of a call are kept by its signature: a later call that differs in dtype,
    # shape, device-independent layout or gradients is checked and planned again; a
    # repeated call hands the lone dense term the caller's tensors, gridded or flat (a
    # rolled term gathers from the flat tokens), with or without a table
    grid = (14, 14)
    attn = pg.compile(spec, grid, backend="auto", dtype="float64", **DENSE)
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, *grid, 8, generator=gen, dtype=torch.float64)
               for _ in range(3))
    table = torch.randn(4, *(2 * r + 1 for r in attn.reach), generator=gen,
                        dtype=torch.float64)
    for _ in range(2):
        torch.testing.assert_close(attn(q, k, v), reference(spec, grid, q, k, v))
        flat = attn(*(t.flatten(2, 3) for t in (q, k, v)), rel_bias=table)
        torch.testing.assert_close(flat.view(q.shape),
                                   reference(spec, grid, q, k, v, rel_bias=table))
    with pytest.raises(PatternError, match=r"dtypes differ: torch.float64, torch.float32"):
        attn(q, k.float(), v)
    with pytest.raises(PatternError, match=r"q has shape \(2, 4, 13, 14, 8\)"):
        attn(q[:, :, 1:], k[:, :, 1:], v[:, :, 1:])
    with pytest.raises(PatternError, match="must be a torch.Tensor, got ndarray"):
        attn(q, k, v.numpy())
    strided = q.transpose(2, 3).contiguous().transpose(2, 3)  # same shape, other strides
    torch.testing.assert_close(attn(strided, k, v), reference(spec, grid, q, k, v))
    for _ in range(2):  # the second through the kept signature
        leaves = [t.clone().requires_grad_() for t in (q, k, v, table)]
        out = attn(*leaves[:3], rel_bias=leaves[3])
        assert_gradients_equal(out, reference(spec, grid, *leaves[:3], rel_bias=leaves[3]),
                               leaves, gen, names=["q", "k", "v", "table"])


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_lone_dense_term_s_repeated_calls_with_and_without_gradients(dtype):
    # the kept signature hands MaxViT's grid attention to the term's direct path (views, GEMMs,
    # softmax and the copy back, no layer between): gridded, flat and transposed-strided
    # inputs, inference and training, each twice, equal the oracle
    spec, grid = pg.window(3, dilation=(4, 3)), (12, 9)  # 12 classes of 3 x 3
    attn = pg.compile(spec, grid, backend="auto", dtype=str(dtype)[6:], **DENSE)
    gen = torch.Generator().manual_seed(7)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    base = [torch.randn(2, 3, *grid, 8, generator=gen, dtype=torch.float64) for _ in range(3)]
    layouts = {"gridded": lambda t: t, "flat": lambda t: t.flatten(2, 3),
               "strided": lambda t: t.transpose(2, 3).contiguous().transpose(2, 3)}
    for name, layout in layouts.items():
        for _ in range(2):
            with torch.no_grad():
                out = attn(*(layout(t.to(dtype)) for t in base))
            want = reference(spec, grid, *base).to(dtype)
            torch.testing.assert_close(out.reshape(want.shape), want, **tol, msg=name)
            leaves = [layout(t.to(dtype)).detach().requires_grad_() for t in base]
            out = attn(*leaves)
            assert out.shape == leaves[0].shape
            exact = [t.detach().double().requires_grad_() for t in leaves]
            want = reference(spec, grid, *exact)
            torch.testing.assert_close(out.double(), want, **tol, msg=name)
            dout = torch.randn(want.shape, generator=gen, dtype=torch.float64)
            for a, b in zip(torch.autograd.grad(out, leaves, dout.to(dtype)),
                            torch.autograd.grad(want, exact, dout)):
                torch.testing.assert_close(a.double(), b, **tol, msg=name)
    assert [tp.executor for tp in attn.plan.patterns[0]] == ["dense"]


HEADS_INSIDE = [(pg.block(4), (8, 12)), (pg.window(3, dilation=(4, 2)), (12, 6)),
                (pg.block(3), (9,)), (pg.block(2), (4, 4, 6)), (pg.axis(0), (5, 7))]


@pytest.mark.parametrize("spec, grid", HEADS_INSIDE, ids=[repr(s) for s, _ in HEADS_INSIDE])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_heads_inside_each_token_give_the_output_in_that_layout(spec, grid, dtype):
    # q, k, v as a projection on the map gives them ((b, *grid, 3, h, d) split in three, or
    # three tensors (b, *grid, h, d)), gridded or flat, without a table or with a shared or
    # per-head one: inference equals the oracle, and with a table its output has the heads
    # inside each token too, so that the output projection reads it without a copy;
    # training equals it as well
    attn = pg.compile(spec, grid, backend="auto", dtype=str(dtype)[6:], **DENSE)
    gen = torch.Generator().manual_seed(11)
    tol = dict(atol=1e-10, rtol=1e-10) if dtype == torch.float64 else dict(atol=2e-5, rtol=2e-5)
    b, h, d, axes = 2, 3, 8, len(grid)
    qkv = torch.randn(b, *grid, 3, h, d, generator=gen, dtype=torch.float64)
    apart = [torch.randn(b, *grid, h, d, generator=gen, dtype=torch.float64) for _ in range(3)]
    tables = [None] + [torch.randn(n, *(2 * r + 1 for r in attn.reach), generator=gen,
                                   dtype=torch.float64) for n in (1, h)]
    for inputs in (qkv.movedim(-3, 0).unbind(0), apart):
        inputs = [t.movedim(-2, 1) for t in inputs]  # (b, h, *grid, d), heads inside tokens
        for table, flat in ((t, f) for t in tables for f in (False, True)):
            args = [t.to(dtype) for t in inputs]
            args = [t.flatten(2, 1 + axes) for t in args] if flat else args
            want = reference(spec, grid, *inputs, rel_bias=table).to(dtype)
            for _ in range(2):  # the second through the kept signature
                with torch.no_grad():
                    out = attn(*args, rel_bias=None if table is None else table.to(dtype))
                assert out.shape == args[0].shape
                assert out.movedim(1, -2).is_contiguous() == (table is not None)
                torch.testing.assert_close(out.reshape(want.shape), want, **tol)
    leaves = [t.movedim(-2, 1).detach().requires_grad_() for t in apart]
    out = attn(*leaves, rel_bias=tables[2])
    assert_gradients_equal(out, reference(spec, grid, *leaves, rel_bias=tables[2]),
                           leaves, gen, names=["q", "k", "v"])
    contiguous = [t.movedim(-2, 1).contiguous() for t in apart]
    with torch.no_grad():  # heads outside tokens: the layout kept
        assert attn(*contiguous, rel_bias=tables[2]).is_contiguous()


@pytest.mark.parametrize("spec, grid", [
    (pg.window(3, dilation=(4, 3)), (12, 9)),  # MaxViT's grid: views by fixed shapes
    (pg.block(3), (7, 8)),                     # padded tiles: cuts, and a mask
    (pg.block(3, offset=1), (6, 6)),           # rolled: gathers, and the wrap's mask
])
def test_a_lone_terms_inference_is_kept_per_kind_of_call(spec, grid):
    # without gradients or a table a repeated kind of call runs the term's function for its
    # shapes, built by its first call, and the output stays exact, gridded or flat, in each
    # dtype; a NaN in q makes the kept function hand the call to the exact path
    attn = pg.compile(spec, grid, backend="auto", **DENSE)
    gen = torch.Generator().manual_seed(5)

    def functions():
        terms = {hit[3] for hit in attn._checked.values() if hit is not None}
        return {(id(t), key): f for t in terms - {None} for key, f in t._inference.items()}

    for dtype in (torch.float32, torch.float64, torch.float32):
        q, k, v = (torch.randn(2, 3, *grid, 4, generator=gen, dtype=dtype) for _ in range(3))
        flat = [t.flatten(2, 3) for t in (q, k, v)]
        for call in range(3):
            torch.testing.assert_close(attn(q, k, v), reference(spec, grid, q, k, v))
            torch.testing.assert_close(attn(*flat).view(q.shape),
                                       reference(spec, grid, q, k, v))
            if call == 0:
                first = functions()
                assert any(key[1][3] == dtype for key in first)  # (q, k, out, dtype, device)
        assert functions() == first  # nothing built again
    q[0, 1, 2, 3, 0] = float("nan")  # tests/test_nonfinite.py's rule: that query's output NaN
    want = reference(spec, grid, q, k, v)
    want[0, 1, 2, 3] = float("nan")
    torch.testing.assert_close(attn(q, k, v), want, equal_nan=True)
