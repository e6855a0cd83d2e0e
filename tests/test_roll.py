"""Dense terms whose tiles an offset cuts at the axis's ends, lowered both ways: padded to whole
tiles, and rolled as Swin rolls (the cut tiles share one, apart by the mask). Each lowering of
a term alone against the float64 oracle, output and the gradients of q, k, v and a bias table
(shared and per head), on grids the tiles do not divide, offsets 0..M-1, 1-D/2-D/3-D; then
through ``auto``: unions with other terms, grouped kv heads, bfloat16."""

import weakref

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import patterngen as pg
from patterngen.backends import planned
from patterngen.backends.planned import dense_term
from patterngen.bias import reach
from patterngen.plan import dense_shape
from oracle import reference
from test_bias import check, inputs

DENSE = dict(strategy="terms", terms="dense")


def run_term(pattern, grid, lowering, shared, heads=2, seed=0):
    """One term as a :class:`planned.DenseTerm` under ``lowering``, forward and backward
    against the oracle in float64; returns the dense shape it ran."""
    lowered = pg.lower(pattern, grid)
    [term] = lowered.terms
    shape = dense_shape(term, grid, lowering)
    counts = lowered.key_counts()
    part = planned.DenseTerm(term, shape, [], grid, counts > 0, reach=reach(lowered))
    torch.manual_seed(seed)
    q, k, v, table = inputs(grid, heads, reach(lowered), shared)
    flat = [t.detach() for t in (q, k, v)]
    scale = q.shape[-1] ** -0.5
    out, lse = part.forward(*flat, scale, True, table.detach())
    wide = [t.detach().double().requires_grad_() for t in (q, k, v, table)]
    ref = reference(pattern, grid, *wide[:3], rel_bias=wide[3])
    torch.testing.assert_close(out.reshape(ref.shape), ref, atol=1e-10, rtol=0)
    dout = torch.randn(ref.shape, dtype=torch.float64)
    got = part.backward(*flat, out, lse, dout.reshape(out.shape), scale, table.detach())
    want = torch.autograd.grad(ref, wide, dout)
    for name, g, w in zip(("q", "k", "v", "table"), got, want):
        torch.testing.assert_close(g.reshape(w.shape), w, atol=1e-10, rtol=0,
                                   msg=lambda m, name=name: f"d{name}: {m}")
    return shape


@st.composite
def cut_blocks(draw):
    ndim = draw(st.integers(1, 3))
    sizes = [draw(st.integers(1, 5)) for _ in range(ndim)]
    offsets = [draw(st.integers(0, m - 1)) for m in sizes]
    grid = tuple(draw(st.integers(1, 3 * m + 2)) for m in sizes)
    return pg.block(tuple(sizes), offset=tuple(offsets)), grid


@settings(max_examples=10, deadline=None)
@given(cut_blocks(), st.booleans())
def test_both_lowerings_equal_the_oracle(case, shared):
    pattern, grid = case
    shapes = {lowering: run_term(pattern, grid, lowering, shared)
              for lowering in ("pad", "roll")}
    assert not any(ax.roll for ax in shapes["pad"].axes)


@pytest.mark.parametrize("offset", range(7))
def test_every_offset_of_a_swin_window_rolls_exactly(offset):
    # 16 = 2 * 7 + 2: the tiles never divide the axis; it rolls where the two cut tiles (the
    # first of `offset` positions, the last of the rest) fit one, the first whole tile then
    # starting the view
    shape = run_term(pg.block(7, offset=offset), (16, 9), "roll", shared=offset % 2 == 0)
    fits = offset + (16 - offset) % 7 <= 7
    assert shape.axes[0].roll == (offset if fits else 0)
    auto = dense_shape(pg.lower(pg.block(7, offset=offset), (16, 9)).terms[0], (16, 9))
    assert auto.batch <= dense_shape(pg.lower(pg.block(7, offset=offset), (16, 9)).terms[0],
                                     (16, 9), "pad").batch


def test_swin_shift_rolls_into_aligned_windows():
    # Swin-T's first stage: 64 windows as Swin has them (not 81 padded), the region mask on
    # the wrapped windows only
    term = pg.lower(pg.block(7, offset=3), (56, 56)).terms[0]
    shape = dense_shape(term, (56, 56))
    assert shape.batch == 64 and repr(shape.axes[0]) == "tiles(7, roll 3)"
    part = planned.DenseTerm(term, shape, [], (56, 56), np.ones(56 * 56, bool), reach=(6, 6))
    masked = ~part.mask.reshape(8, 8, 49, 49).all(axis=(2, 3))
    assert masked[:7, :7].sum() == 0 and masked[7].all() and masked[:, 7].all()


@pytest.mark.parametrize("pattern, grid, shared", [
    (pg.block(7, offset=3) | pg.axis(0), (12, 12), True),     # rolled after an axis term
    (pg.block(4, offset=2) | pg.window(3), (10, 11), False),  # after a gather group
    (pg.block(4) | pg.block(4, offset=(1, 3)), (10, 12), True),  # the earlier term masked
    (pg.block((3, 4, 4), offset=(1, 2, 3)), (5, 10, 8), False),
    (pg.block(5, offset=2), (23,), True),
    # tiles that divide the grid: rolled with no padding, one axis of three not rolled
    (pg.block(4, offset=2) | pg.axis(0), (12, 12), False),
    (pg.block((2, 4, 4), offset=(1, 0, 3)), (4, 8, 8), True),
])
def test_rolled_terms_in_auto_equal_the_oracle(pattern, grid, shared):
    attn = check("auto", pattern, grid, shared=shared, **DENSE)
    assert any(ax.roll for tp in attn.plan.patterns[0] if tp.dense is not None
               for ax in tp.dense.axes)


def test_rolled_term_with_grouped_kv_heads():
    pattern, grid = pg.block(7, offset=3), (12, 12)
    attn = pg.compile(pattern, grid, backend="auto", **DENSE)
    q, k, v, table = inputs(grid, 4, attn.reach, False)
    k, v = (t[:, :2].detach().requires_grad_() for t in (k, v))
    out = attn(q, k, v, rel_bias=table)
    wide = [t.detach().double().requires_grad_() for t in (q, k, v, table)]
    want = reference(pattern, grid, *wide[:3], rel_bias=wide[3])
    torch.testing.assert_close(out, want, atol=1e-10, rtol=0)
    dout = torch.randn(want.shape, dtype=torch.float64)
    for name, g, w in zip("q k v table".split(), torch.autograd.grad(out, (q, k, v, table), dout),
                          torch.autograd.grad(want, wide, dout)):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=0,
                                   msg=lambda m, name=name: f"d{name}: {m}")


@pytest.mark.parametrize("grid", [(12, 12), (10, 10)])  # rolled; padded
def test_cut_tiles_in_bfloat16(grid):
    # the padded tiles' dead query rows once turned live rows NaN in bfloat16
    attn = check("auto", pg.block(7, offset=3), grid, heads=2, dtype=torch.bfloat16, atol=0.15,
                 **DENSE)
    assert any(ax.roll for ax in attn.plan.patterns[0][0].dense.axes) == (grid == (12, 12))


@pytest.mark.parametrize("pattern, grid, kv_heads", [
    (pg.block(7, offset=3), (14, 14), 4), (pg.block(7), (14, 14), 2),
    (pg.block(7), (14, 14), 4), (pg.block(7, offset=3), (12, 12), 2)])
@pytest.mark.parametrize("shared", [True, False])
def test_inference_with_a_table_equals_the_oracle(pattern, grid, kv_heads, shared):
    # without gradients a lone biased term runs the fused kernel, bias (and mask) broadcast;
    # what it adds is kept: a table written in place and another batch are read again
    attn = pg.compile(pattern, grid, backend="auto", **DENSE)
    q, k, v, table = (t.detach() for t in inputs(grid, 4, attn.reach, shared))
    k, v = k[:, :kv_heads], v[:, :kv_heads]
    for step in ("first", "table", "batch"):
        if step == "table":
            table.mul_(-2.0)
        if step == "batch":
            q, k, v = torch.cat([q, torch.randn_like(q)]), torch.cat([k, k]), torch.cat([v, v])
        with torch.no_grad():
            out = attn(q, k, v, rel_bias=table)
        want = reference(pattern, grid, q, k, v, rel_bias=table)
        torch.testing.assert_close(out, want, atol=1e-10, rtol=0)


# the token order: q, k, v handed in the dense term's order, the output taken in it

ORDERED = [(pg.block(7), (14, 14)), (pg.block(7, offset=3), (14, 14)),
           (pg.window(7, dilation=2), (14, 14)), (pg.block(4, offset=1), (9, 10)),
           (pg.block(3, offset=2), (7,)), (pg.block(2, offset=1) & pg.axis(2), (4, 3, 5)),
           (pg.block(4), (9, 10))]


@pytest.mark.parametrize("pattern, grid", ORDERED)
@pytest.mark.parametrize("kv_heads, table_heads", [(2, 2), (1, 1), (2, 1)])
def test_ordered_calls_equal_the_oracle(pattern, grid, kv_heads, table_heads):
    # in order: the output and the gradients of q, k, v and the table (shared or per head)
    # equal the oracle's on the grid; padded orders (9 x 10, 7) run through the grid
    attn = pg.compile(pattern, grid, backend="auto", dtype="float64")
    order = attn.token_order
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, *grid, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, *grid, 4, generator=gen, dtype=torch.float64,
                        requires_grad=True) for _ in range(2))
    table = torch.randn(table_heads, *(2 * r + 1 for r in attn.reach), generator=gen,
                        dtype=torch.float64, requires_grad=True)
    ordered = [order.in_order(t.flatten(2, -2)) for t in (q, k, v)]
    assert ordered[0].shape == (2, 2, order.positions, 4)
    out = attn(*ordered, rel_bias=table, ordered=True)
    got = order.on_grid(out).reshape(q.shape)
    want = reference(pattern, grid, q, k, v, rel_bias=table)
    torch.testing.assert_close(got, want)
    dout = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    for g, w in zip(torch.autograd.grad(got, (q, k, v, table), dout),
                    torch.autograd.grad(want, (q, k, v, table), dout)):
        torch.testing.assert_close(g, w)
    with torch.no_grad():  # inference with a table: in the fused kernel, the mask folded in
        out = attn(*ordered, rel_bias=table, ordered=True)
        fused = not order.padded and order.term.ordered_fused(*ordered, 0.5, table) is not None
    torch.testing.assert_close(order.on_grid(out).reshape(q.shape), want)
    assert fused == (kv_heads == 2 and not order.padded)
    x = torch.randn(3, *grid, 5, generator=gen, dtype=torch.float64)
    assert order.to_order(x).shape == (3, order.positions, 5)
    torch.testing.assert_close(order.from_order(order.to_order(x)), x)
    torch.testing.assert_close(order.to_order(x), order.in_order(x.flatten(1, -2)[:, None])[:, 0])
    # the order is order.index (the term's view where no axis is rolled, else the gather)
    padded = torch.nn.functional.pad(x.flatten(1, -2), (0, 0, 0, 1))
    assert torch.equal(order.to_order(x), padded[:, order.index])


def test_an_unpadded_order_runs_the_term_on_the_inputs_as_they_are(monkeypatch):
    # Swin's shifted windows in order: no token goes back to the grid, in training too
    grid, pattern = (14, 14), pg.block(7, offset=3)
    attn = pg.compile(pattern, grid, backend="auto", dtype="float64")
    order = attn.token_order
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 3, *grid, 8, generator=gen, dtype=torch.float64,
                           requires_grad=True) for _ in range(3))
    ordered = [order.in_order(t.flatten(2, 3)) for t in (q, k, v)]
    monkeypatch.setattr(planned.TokenOrder, "on_grid", None)
    out = attn(*ordered, ordered=True)
    monkeypatch.undo()
    got = order.on_grid(out).reshape(q.shape)
    want = reference(pattern, grid, q, k, v)
    torch.testing.assert_close(got, want)
    dout = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    for g, w in zip(torch.autograd.grad(got, (q, k, v), dout),
                    torch.autograd.grad(want, (q, k, v), dout)):
        torch.testing.assert_close(g, w)


def test_ordered_bfloat16_and_token_order_refusals():
    grid = (14, 14)
    attn = pg.compile(pg.block(7, offset=3), grid, backend="auto", dtype="bfloat16")
    order = attn.token_order
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, *grid, 8, generator=gen) for _ in range(3))
    got = attn(*(order.in_order(t.flatten(2, 3)).bfloat16() for t in (q, k, v)), ordered=True)
    want = reference(pg.block(7, offset=3), grid, q, k, v)
    torch.testing.assert_close(order.on_grid(got).float().reshape(want.shape), want,
                               atol=3e-2, rtol=3e-2)
    with pytest.raises(pg.PatternError, match=r"token order has 196 positions .*expected "
                                               r"\(batch, heads, 196, head_dim\)"):
        attn(q, k, v, ordered=True)
    with pytest.raises(pg.PatternError, match=r"to_order: x has shape \(2, 13, 14, 8\)"):
        order.to_order(torch.randn(2, 13, 14, 8))
    with pytest.raises(pg.PatternError, match=r"from_order: y has shape \(2, 195, 8\)"):
        order.from_order(torch.randn(2, 195, 8))
    for pattern, why in [(pg.block(7) | pg.axis(0), "a union of 2 terms"),
                         (pg.window(3), "is a gather"),
                         (pg.global_tokens(keys=[0]), "viewed in different orders")]:
        with pytest.raises(pg.PatternError, match=rf"has no token order: .*\(.*{why}"):
            pg.compile(pattern, grid, backend="auto").token_order


@pytest.mark.parametrize("shift", [0, 3])
def test_ordered_inference_follows_the_table_and_fully_masked_rows(shift):
    # the fused path keeps the gathered bias (and bias + mask) between calls: a table written
    # in place, or another table, is read again; without a table it runs too; a table of
    # -inf masks every row, which gives zeros as in the oracle, not NaN
    grid, pattern = (14, 14), pg.block(7, offset=shift)
    attn = pg.compile(pattern, grid, backend="auto", dtype="float64", batch=3)
    order = attn.token_order
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(3, 2, *grid, 8, generator=gen, dtype=torch.float64)
               for _ in range(3))
    ordered = [order.in_order(t.flatten(2, 3)) for t in (q, k, v)]
    table = torch.randn(2, *(2 * r + 1 for r in attn.reach), generator=gen,
                        dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        assert order.term.ordered_fused(*ordered, 8 ** -0.5, table) is not None
        for change in (lambda: None, lambda: table.mul_(-2.0), lambda: table.add_(1.0)):
            change()
            got = order.on_grid(attn(*ordered, rel_bias=table, ordered=True))
            torch.testing.assert_close(got.reshape(q.shape),
                                       reference(pattern, grid, q, k, v, rel_bias=table))
        assert order.term.ordered_fused(*ordered, 8 ** -0.5, None) is not None
        got = order.on_grid(attn(*ordered, ordered=True))
        torch.testing.assert_close(got.reshape(q.shape), reference(pattern, grid, q, k, v))
        other = torch.full_like(table, float("-inf"))
        got = order.on_grid(attn(*ordered, rel_bias=other, ordered=True))
    want = reference(pattern, grid, q, k, v, rel_bias=other)
    assert not got.isnan().any()
    torch.testing.assert_close(got.reshape(q.shape), want)


@pytest.mark.parametrize("shift", [0, 3])
def test_ordered_inference_is_kept_per_kind_of_call(monkeypatch, shift):
    # a projection's output in order (SwinBlock's layout): the first call of a kind builds
    # the fused kernel's function, repeated calls run it and stay exact as the table is
    # written in place or all -inf (zeros, the rule); a table of another shape is still
    # refused; to_order and from_order keep theirs per shape and still refuse other shapes
    grid, pattern, heads, d = (14, 14), pg.block(7, offset=shift), 2, 8
    attn = pg.compile(pattern, grid, backend="auto", dtype="float64")
    order = attn.token_order
    built = []
    keep = planned.DenseTerm.ordered_inference
    monkeypatch.setattr(planned.DenseTerm, "ordered_inference",
                        lambda *a: built.append(1) or keep(*a))
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, *grid, 3 * heads * d, generator=gen, dtype=torch.float64)
    t = order.to_order(x)
    assert torch.equal(t, torch.nn.functional.pad(x.flatten(1, 2), (0, 0, 0, 1))[:, order.index])
    q, k, v = t.view(2, order.positions, 3, heads, d).permute(2, 0, 3, 1, 4)
    on_grid = [order.on_grid(z).view(2, heads, *grid, d) for z in (q, k, v)]
    table = torch.randn(heads, *(2 * r + 1 for r in attn.reach), generator=gen,
                        dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        for change in (lambda: None, lambda: None, lambda: table.mul_(-2.0),
                       lambda: table.fill_(float("-inf"))):
            change()
            got = order.on_grid(attn(q, k, v, rel_bias=table, ordered=True))
            want = reference(pattern, grid, *on_grid, rel_bias=table)
            assert not got.isnan().any()
            torch.testing.assert_close(got.view(want.shape), want)
        assert built == [1] and any(callable(f) for f in attn._checked.values())
        with pytest.raises(pg.PatternError, match="rel_bias has shape"):
            attn(q, k, v, rel_bias=table[:, 1:], ordered=True)
    y = torch.randn(2, order.positions, 5, generator=gen, dtype=torch.float64)
    for _ in range(2):
        torch.testing.assert_close(order.to_order(order.from_order(y)), y)
        torch.testing.assert_close(order.from_order(t), x)
    assert len(order._runs) == 4  # each way, C of 48 and of 5
    with pytest.raises(pg.PatternError, match=r"to_order: x has shape \(2, 13, 14, 48\)"):
        order.to_order(x[:, 1:])
    with pytest.raises(pg.PatternError, match=r"from_order: y has shape \(2, 195, 5\)"):
        order.from_order(y[:, 1:])


@pytest.mark.parametrize("tables_kept", [8, 2])
def test_ordered_inference_with_tables_in_turn(monkeypatch, tables_kept):
    # the blocks of a stage share one compiled pattern and call it in turn with their own
    # tables: each call reads its own, also after one is written in place, and when more
    # tables come than are kept
    monkeypatch.setattr(planned.dense_term, "ORDERED_TABLES", tables_kept)
    grid, pattern = (14, 14), pg.block(7, offset=3)
    attn = pg.compile(pattern, grid, backend="auto", dtype="float64")
    order = attn.token_order
    gen = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 2, *grid, 8, generator=gen, dtype=torch.float64)
               for _ in range(3))
    ordered = [order.in_order(t.flatten(2, 3)) for t in (q, k, v)]
    tables = [torch.randn(2, *(2 * r + 1 for r in attn.reach), generator=gen,
                          dtype=torch.float64) for _ in range(3)]
    with torch.no_grad():
        for i, write in [(0, False), (1, False), (2, False), (0, True), (1, False), (0, False)]:
            if write:
                tables[i].mul_(-2.0)
            got = order.on_grid(attn(*ordered, rel_bias=tables[i], ordered=True))
            torch.testing.assert_close(got.reshape(q.shape), reference(
                pattern, grid, q, k, v, rel_bias=tables[i]), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("table_heads", [2, 1, None])
def test_ordered_inference_in_batch_chunks(monkeypatch, table_heads):
    # shifted windows in order: bias plus mask kept expanded over as many batch elements as
    # the bytes allowed hold (2 with a table per head, else 4), so a batch of 5 runs in chunks
    # and one of 2 or 1 in one call; a NaN value reaches the queries of its block, not those
    # of the window's other blocks
    monkeypatch.setattr(planned.dense_term, "ORDERED_ADD_BYTES", 2 * 4 * 2 * 49 * 49 * 8)
    grid, pattern = (14, 14), pg.block(7, offset=3)
    attn = pg.compile(pattern, grid, backend="auto", dtype="float64")
    order = attn.token_order
    gen = torch.Generator().manual_seed(5)
    table = (torch.randn(table_heads, *(2 * r + 1 for r in attn.reach), generator=gen,
                         dtype=torch.float64) if table_heads else None)
    for batch in (5, 2, 1, 5):
        q, k, v = (torch.randn(batch, 2, *grid, 8, generator=gen, dtype=torch.float64)
                   for _ in range(3))
        want = reference(pattern, grid, q, k, v, rel_bias=table)
        v[-1, 1, 13, 13] = float("nan")  # block [10, 14)^2: its window holds the corners too
        want[-1, 1, 10:, 10:] = float("nan")
        ordered = [order.in_order(t.flatten(2, 3)) for t in (q, k, v)]
        with torch.no_grad():
            clean = [t.nan_to_num() for t in ordered]
            assert order.term.ordered_fused(*clean, 8 ** -0.5, table) is not None
            assert order.term.ordered_fused(*ordered, 8 ** -0.5, table) is None
            got = order.on_grid(attn(*ordered, rel_bias=table, ordered=True))
            fused = order.on_grid(attn(*clean, rel_bias=table, ordered=True))
        torch.testing.assert_close(got.reshape(q.shape), want, atol=1e-10, rtol=1e-10,
                                   equal_nan=True)
        torch.testing.assert_close(fused.reshape(q.shape), reference(
            pattern, grid, q, k, v.nan_to_num(), rel_bias=table), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("pattern, grid", [
    (pg.block(7, offset=3), (14, 14)),   # rolled, the region mask on the wrapped windows
    (pg.block(7, offset=3), (16, 9)),    # rolled and padded on the right
    (pg.block(4, offset=1), (10, 10)),   # padded
    (pg.block(4), (10, 10))])            # neither
def test_a_lone_term_without_a_table_equals_the_oracle(pattern, grid):
    # the lone term's nested matmul path, with and without gradients, first call and a
    # repeated kind of call (which views the caller's tensors itself)
    attn = pg.compile(pattern, grid, backend="auto", **DENSE)
    q, k, v, _ = inputs(grid, 2, attn.reach, True)
    wide = [t.detach().requires_grad_() for t in (q, k, v)]
    want = reference(pattern, grid, *wide)
    dout = torch.randn(want.shape, dtype=torch.float64)
    for _ in range(2):
        with torch.no_grad():
            torch.testing.assert_close(attn(q, k, v), want, atol=1e-10, rtol=0)
        out = attn(q, k, v)
        torch.testing.assert_close(out, want, atol=1e-10, rtol=0)
        for name, g, w in zip("qkv", torch.autograd.grad(out, (q, k, v), dout),
                              torch.autograd.grad(want, wide, dout, retain_graph=True)):
            torch.testing.assert_close(g, w, atol=1e-10, rtol=0,
                                       msg=lambda m, name=name: f"d{name}: {m}")


class _LiveBytes(TorchDispatchMode):
    """The most bytes of new storage alive at once among the ops' outputs."""

    def __init__(self):
        super().__init__()
        self.refs, self.live, self.peak = {}, 0, 0

    def _gone(self, ptr, size):
        self.refs[ptr] -= 1
        if not self.refs[ptr]:
            del self.refs[ptr]
            self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ptr, size = storage.data_ptr(), storage.nbytes()
                if ptr not in self.refs:
                    self.live += size
                    self.peak = max(self.peak, self.live)
                self.refs[ptr] = self.refs.get(ptr, 0) + 1
                weakref.finalize(t, self._gone, ptr, size)
        return out


def test_a_rolled_forward_frees_each_buffer_once_read():
    # with every view, the scores and the probabilities alive at once, Swin's shifted
    # windows outgrew what the C allocator keeps and faulted 4.6 MB of new pages a call
    # (1.6x the time at 56x56); each is freed once read, as in the unshifted forward
    q, k, v = (torch.randn(1, 4, 56 * 56, 32) for _ in range(3))
    peaks = []
    for offset in (0, 3):
        attn = pg.compile(pg.block(7, offset=offset), (56, 56), backend="auto", **DENSE)
        with torch.no_grad():
            attn(q, k, v)
            with _LiveBytes() as live:
                attn(q, k, v)
        peaks.append(live.peak)
    scores = 4 * 64 * 49 * 49 * 4
    assert peaks[1] <= peaks[0] + 1e5 and peaks[1] < 2 * scores + 2 * q.nbytes, peaks


@pytest.mark.parametrize("joint", [True, False])
@pytest.mark.parametrize("table_heads", [3, 1])
def test_rolled_inference_on_a_projection_output(monkeypatch, joint, table_heads):
    # q, k, v as a qkv projection gives them ((B, *grid, 3, H, d) permuted, or each its own
    # (B, *grid, H, d)): gathered into the token order by rows, the fused kernel in order,
    # the output a view whose (B, *grid, H, d) permute is contiguous for the output
    # projection; a NaN value at a key the region mask removes sends the call to the exact
    # path, the queries of the other regions not reached
    grid, pattern = (14, 14), pg.block(7, offset=3)
    attn = pg.compile(pattern, grid, backend="auto", dtype="float64")
    gen = torch.Generator().manual_seed(7)
    if joint:
        qkv = torch.randn(2, *grid, 3, 3, 8, generator=gen, dtype=torch.float64)
        q, k, v = qkv.permute(3, 0, 4, 1, 2, 5)
    else:
        q, k, v = (torch.randn(2, *grid, 3, 8, generator=gen, dtype=torch.float64).permute(
            0, 3, 1, 2, 4) for _ in range(3))
    table = torch.randn(table_heads, *(2 * r + 1 for r in attn.reach), generator=gen,
                        dtype=torch.float64)
    calls = []
    fused = planned.DenseTerm.ordered_fused
    monkeypatch.setattr(planned.DenseTerm, "ordered_fused",
                        lambda *a: calls.append(1) or fused(*a))
    for _ in range(2):  # the first call, and a repeated kind of call
        with torch.no_grad():
            out = attn(q, k, v, rel_bias=table)
        torch.testing.assert_close(out, reference(pattern, grid, q, k, v, rel_bias=table),
                                   atol=1e-10, rtol=0)
        assert out.permute(0, 2, 3, 1, 4).is_contiguous()
    assert len(calls) == 2
    want = reference(pattern, grid, q, k, v, rel_bias=table)
    want[0, 1, 10:, 10:] = float("nan")  # the block [10, 14)^2 of the corner's window
    v = v.clone()
    v[0, 1, 13, 13] = float("nan")
    with torch.no_grad():
        out = attn(q, k, v, rel_bias=table)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=0, equal_nan=True)


@pytest.mark.parametrize("layout", ["contiguous", "strided rows"])
def test_a_rolled_view_gathers_rows_of_any_layout(layout, monkeypatch):
    # a view's gather takes one index into every (batch, head)'s rows where they lie
    # contiguously (2-D), kept per block count, and along the tokens where they do not
    # (head_dim a slice of wider rows, 3-D): both exact, forward and backward
    grid, pattern = (9, 8), pg.block(4, offset=(1, 2))
    attn = pg.compile(pattern, grid, backend="auto", dtype="float64", **DENSE)
    gen = torch.Generator().manual_seed(3)
    wide = 8 if layout == "contiguous" else 11
    q, k, v = (torch.randn(2, 3, *grid, wide, generator=gen, dtype=torch.float64)[..., :8]
               .requires_grad_() for _ in range(3))
    selects, real = [], torch.Tensor.index_select
    for _ in range(2):  # the second call finds its row index kept
        monkeypatch.setattr(torch.Tensor, "index_select",
                            lambda t, dim, index: selects.append(t.dim()) or real(t, dim, index))
        out = attn(q, k, v)  # the forward's views of q, k and v
        monkeypatch.setattr(torch.Tensor, "index_select", real)
        want = reference(pattern, grid, q, k, v)
        torch.testing.assert_close(out, want)
        got = torch.autograd.grad(out.sum(), (q, k, v))
        for g, w in zip(got, torch.autograd.grad(want.sum(), (q, k, v))):
            torch.testing.assert_close(g, w)
    # strided rows: q's, k's and v's views in each call (the output's comes from the kernel),
    # and contiguous ones on one thread (backends.inputs.select_rows)
    flat = layout == "contiguous" and torch.get_num_threads() > 1
    assert selects and selects.count(3) == (0 if flat else 6)


def test_a_rolled_term_keeps_few_row_indexes(monkeypatch):
    # one row index per side, direction and count of blocks (batch x heads): a model's
    # varying batch sizes do not grow the kept indexes past ROW_INDEXES, and each gather
    # stays exact after the others were dropped (with several threads, which take them)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    grid, pattern = (9, 8), pg.block(4, offset=(1, 2))
    lowered = pg.lower(pattern, grid)
    [term] = lowered.terms
    shape = dense_shape(term, grid, "roll")
    part = planned.DenseTerm(term, shape, [], grid, lowered.key_counts() > 0)
    index, padding, _, _ = part._gather("q", "cpu")
    for blocks in range(1, 2 * dense_term.ROW_INDEXES + 2):
        x = torch.randn(blocks, 1, 72, 3)
        want = x[:, 0, index]
        want[:, padding] = 0.0  # padding positions (the tiles do not divide 9)
        torch.testing.assert_close(part._gathered(x, "q").reshape(blocks, -1, 3), want)
        kept = [k for k in part._cache if k[0] == "rows"]
        assert 1 <= len(kept) <= dense_term.ROW_INDEXES
