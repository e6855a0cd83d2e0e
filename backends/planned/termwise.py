"""The term-wise run: the parts of a plan (:class:`GatherGroup` beside the dense parts of
:mod:`.dense_term`), their exact merge by log-sum-exp, and the ``patterngen::planned_fwd`` /
``planned_bwd`` operators that run it under autograd, ``torch.compile`` and ``torch.export``.
"""

from __future__ import annotations

import math

import numpy as np

from patterngen import ir
from patterngen.backends import get_backend, ops
from patterngen.backends.inputs import kv_heads_of, take_heads
from patterngen.backends.merge import acc_dtype, merge
from patterngen.plan import TermPlan, dense_form

from .dense_term import DenseTerm

__all__ = ["GatherGroup", "TermWise", "TermsPart", "covered", "register_runner",
           "planned_fwd"]

class GatherGroup:
    """A pattern's gather terms (or a whole pattern), run by the numba kernels, which return
    the log-sum-exp and take the merged one back: the ``numba`` and ``gather`` executors'
    part (:meth:`patterngen.backends.executor.Executor.prepare`).

    Args:
        lowered: the terms it runs, as an IR (its label heads the kernels' source).
        softcap: scores become ``softcap * tanh(s / softcap)`` (``None``: off).
        options: the numba backend's (``lanes``).
    """

    def __init__(self, lowered, softcap=None, **options):
        self.backend = get_backend("numba")(lowered, softcap=softcap, **options)
        self.shape = self.backend.shape
        self.softcap = softcap

    def forward(self, q, k, v, scale, need_lse: bool = True, table=None):
        """``(out, lse)``; ``table``: the whole pattern's bias table for these heads (the
        kernels read it around its centre: the group's reach is at most the pattern's)."""
        import torch

        out, lse = self.backend.forward_numpy(
            *(ops.widened(t) for t in (q, k, v)), self.shape, scale,
            table=None if table is None else ops.widened(table), softcap=self.softcap)
        return torch.from_numpy(out).to(q.dtype), torch.from_numpy(lse)

    def backward(self, q, k, v, out, lse, dout, scale, table=None):
        """``(dq, dk, dv, dtable)`` of the group's share (``dtable`` ``None`` without a
        table)."""
        import torch

        arrays = [ops.widened(t) for t in (q, k, v, out, dout)]
        lse = ops.widened(lse.to(acc_dtype(q.dtype)))
        grads = self.backend.backward_numpy(
            *arrays, lse, self.shape, scale, table=None if table is None else ops.widened(table),
            softcap=self.softcap)
        dq, dk, dv = (torch.from_numpy(np.ascontiguousarray(g)).to(q.dtype)
                      for g in grads[:3])
        return dq, dk, dv, (None if table is None else
                            torch.from_numpy(grads[3]).to(table.dtype))

    def autograd_forward(self, q, k, v, scale, table=None):
        """``None``: alone, the group runs by :meth:`forward` and :meth:`backward` as well."""
        return None


class TermWise:
    """A term-wise plan's parts for each listed pattern, built for one device; registered for
    the ``patterngen::planned_*`` operators under :attr:`op_key`."""

    name = "planned"

    def prepare(self, device, dtype=None, head_dim=None, heads=None) -> None:
        """Nothing: masks and rows are built per device on the first call, inside the op."""

    def __init__(self, lowered, plan, softcap=None):
        from patterngen.backends import executors
        from patterngen.bias import reach
        from patterngen.call import Call

        self.ir = lowered
        self.softcap = softcap
        self.reach = reach(lowered)
        table = executors()
        call = getattr(plan, "call", None) or Call(plan.device, plan.dtype)
        self.patterns = []
        #: per listed pattern, the queries without any key (``None`` when every query has one)
        self.empty = []
        for head, tps in zip(lowered.patterns, plan.patterns):
            counts = head.key_counts()
            self.empty.append(None if counts.all() else counts == 0)
            gather = tuple(tp.term for tp in tps if tp.executor == "gather")
            parts = []
            done = list(gather)
            if gather:
                parts.append(table["gather"].prepare(
                    ir.IR(lowered.grid, gather, head.label or lowered.label, lowered.key_grid),
                    call, softcap))
            for tp in tps:
                if tp.executor != "dense":
                    continue
                parts.append(table["dense"].prepare(
                    ir.IR(lowered.grid, (tp.term,), key_grid=lowered.key_grid), call, softcap,
                    earlier=tuple(done), reach=self.reach, dense=tp.dense))
                done.append(tp.term)
            self.patterns.append(parts)
        #: the keys outside the grid, merged like a part
        self.extra = table["extra"].prepare(lowered, call, softcap)
        #: the one dense term of a plan that is nothing else (see
        #: :meth:`DenseTerm.autograd_forward`), or ``None``
        only = self.patterns[0] if len(self.patterns) == 1 else ()
        self.alone = only[0] if len(only) == 1 and isinstance(only[0], DenseTerm) else None


class TermsPart:
    """A term-wise plan as one part of the executor protocol
    (:meth:`patterngen.backends.executor.Executor.prepare`): its parts run and merged by
    :func:`_merged_forward`, their backward from the merged out and lse
    (:func:`_merged_backward`); ``lse`` is 0 (finite) where no part gives a query a key."""

    def __init__(self, lowered, plan, softcap=None):
        self.runner = TermWise(lowered, plan, softcap)

    def forward(self, q, k, v, scale, need_lse=True, table=None):
        return _merged_forward(self.runner, q, k, v, scale, True, None, table)

    def backward(self, q, k, v, out, lse, dout, scale, table=None):
        grads = _merged_backward(self.runner, q, k, v, out, lse, dout, scale, None, table)
        return (*grads[:3], grads[3] if table is not None else None)

    def autograd_forward(self, q, k, v, scale, table=None):
        """A plan that is one dense term: :meth:`DenseTerm.autograd_forward`, else ``None``."""
        alone = self.runner.alone
        return None if alone is None else alone.autograd_forward(q, k, v, scale, table)


def register_runner(runner, plan) -> str:
    return ops.register(runner, plan.device, plan.dtype, runner.softcap, tuple(
        tuple((tp.term, tp.executor) for tp in tps) for tps in plan.patterns))


def covered(grid, terms, key_grid=None) -> np.ndarray:
    """Keys per query of the union of ``terms`` (row-major; zeros for none)."""
    if not terms:
        return np.zeros(math.prod(int(n) for n in grid.shape), dtype=np.int64)
    return ir.IR(grid, tuple(terms), key_grid=key_grid).key_counts()


def _forward_impl(q, k, v, ak, av, rel_bias, key, scale, need_lse):
    """``(out, lse)`` of the plan registered as ``key`` (``lse`` empty unless ``need_lse``);
    ``ak, av``: keys and values every query attends besides the grid; ``rel_bias``: a
    relative position bias table (key minus query)."""
    extra = None if ak is None else (ak, av)
    out, lse = _merged_forward(ops.lookup(key), q, k, v, scale, need_lse, extra, rel_bias)
    return out, (lse if lse is not None else q.new_empty(0, dtype=acc_dtype(q.dtype)))


def _backward_impl(q, k, v, ak, av, rel_bias, out, lse, dout, key, scale):
    """``(dq, dk, dv, dak, dav, drel_bias)`` from the merged ``out`` and ``lse`` (the last
    three empty without extra keys or a table)."""
    extra = None if ak is None else (ak, av)
    grads = list(_merged_backward(ops.lookup(key), q, k, v, out, lse, dout.contiguous(), scale,
                                  extra, rel_bias))
    if extra is None:
        grads[3:3] = [q.new_empty(0), q.new_empty(0)]
    if rel_bias is None:
        grads.append(q.new_empty(0))
    return tuple(g.contiguous() for g in grads)


def _setup(ctx, inputs, output):
    q, k, v, ak, av, rel_bias, key, scale, need_lse = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, ak, av, rel_bias, out, lse)
    ctx.key, ctx.scale = key, scale


def _backward_with(forward, backward):
    """The autograd formula, calling ``forward``/``backward`` (the operators when traced, the
    implementations in eager mode)."""
    def formula(ctx, dout, dlse):
        q, k, v, ak, av, rel_bias, out, lse = ctx.saved_tensors
        if lse.numel() == 0 and q.numel():  # run without need_lse: its backward needs one
            out, lse = forward(q, k, v, ak, av, rel_bias, ctx.key, ctx.scale, True)
        dq, dk, dv, dak, dav, dbias = backward(q, k, v, ak, av, rel_bias, out, lse, dout,
                                               ctx.key, ctx.scale)
        extra = (dak, dav) if ak is not None else (None, None)
        return (dq, dk, dv, *extra, dbias if rel_bias is not None else None, None, None,
                None)
    return formula


def _define_ops():
    """The term-wise runs as ``patterngen::planned_fwd`` / ``planned_bwd`` operators (torch
    does not trace into the numba gather group or the views; see backends/ops.py), and the
    same formula as an ``autograd.Function`` for eager calls."""
    import torch

    # explicit schemas: this module's annotations are strings (from __future__)
    planned_fwd = torch.library.custom_op(
        f"{ops.NAMESPACE}::planned_fwd", _forward_impl, mutates_args=(),
        device_types=("cpu", "cuda"),
        schema="(Tensor q, Tensor k, Tensor v, Tensor? ak, Tensor? av, Tensor? rel_bias, "
               "str key, float scale, bool need_lse) -> (Tensor, Tensor)")

    @planned_fwd.register_fake
    def _(q, k, v, ak, av, rel_bias, key, scale, need_lse):
        return torch.empty_like(q), q.new_empty(q.shape[:3] if need_lse else (0,),
                                                dtype=acc_dtype(q.dtype))

    planned_bwd = torch.library.custom_op(
        f"{ops.NAMESPACE}::planned_bwd", _backward_impl, mutates_args=(),
        device_types=("cpu", "cuda"),
        schema="(Tensor q, Tensor k, Tensor v, Tensor? ak, Tensor? av, Tensor? rel_bias, "
               "Tensor out, Tensor lse, Tensor dout, str key, float scale) -> (Tensor, Tensor, "
               "Tensor, Tensor, Tensor, Tensor)")

    @planned_bwd.register_fake
    def _(q, k, v, ak, av, rel_bias, out, lse, dout, key, scale):
        def like(t):
            return torch.empty_like(t) if t is not None else q.new_empty(0)
        return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), like(ak),
                like(av), like(rel_bias))

    planned_fwd.register_autograd(_backward_with(planned_fwd, planned_bwd),
                                  setup_context=_setup)
    eager = ops.eager_function("PlannedFunction", _forward_impl, _setup,
                           _backward_with(_forward_impl, _backward_impl))
    return ops.traced_or_eager(planned_fwd, eager)


def _rebuild(lowered, options):
    """A term-wise plan's runner from its op key's options (``ops.lookup`` of a loaded
    exported program): device, dtype, softcap, and per listed pattern its ``(term,
    executor)`` list (dense terms get their dense shape back)."""
    from types import SimpleNamespace

    device, dtype, softcap, patterns = options
    shape = lowered.grid.shape
    plan = SimpleNamespace(device=device, dtype=dtype, patterns=tuple(
        tuple(TermPlan(term, executor, 0, 0, dense_form(
            term, shape, [u for u in head.terms if u is not term])
            if executor == "dense" else None, 0.0) for term, executor in tps)
        for head, tps in zip(lowered.patterns, patterns)))
    runner = TermWise(lowered, plan, softcap)
    runner.op_key = register_runner(runner, plan)


# defined when the backend module loads (get_backend("auto")), so a graph or exported program
# that calls them finds them once the pattern is compiled
planned_fwd = _define_ops()
ops.register_rebuild("planned", _rebuild)


def _heads_of(p: int, npat: int, heads: int):
    return slice(p, heads, npat) if npat > 1 else slice(None)


def _table_of(table, sel, npat: int):
    """The rows of a bias table for the heads ``sel`` of one listed pattern."""
    if table is None or table.shape[0] == 1 or npat == 1:
        return table
    return table[sel]


def _merged_forward(runner, q, k, v, scale, need_lse: bool = True, extra=None, table=None):
    """``(out, lse)`` of every part (and of the ``extra`` keys and values, if any) merged;
    ``lse`` is 0 for queries without any key (their output is 0), so the backward never
    subtracts an infinity. ``lse`` is ``None`` when not ``need_lse`` and one part runs alone.
    ``table``: a relative position bias table, added by the dense parts."""
    import torch

    b, h, n, d = q.shape
    npat = len(runner.patterns)
    out = q.new_zeros(b, h, n, d) if npat > 1 else None
    lse_all = torch.zeros(b, h, n, dtype=acc_dtype(q.dtype), device=q.device) if need_lse else None
    for p, (parts, empty) in enumerate(zip(runner.patterns, runner.empty)):
        sel, kv = _heads_of(p, npat, h), kv_heads_of(p, npat, h, k.shape[1])
        qs, ks, vs = (q, k, v) if npat == 1 else (q[:, sel], *(take_heads(t, kv) for t in (k, v)))
        if extra is not None:  # every query has the extra keys: no row is empty
            empty = None
        if not parts and extra is None:
            mine = q.new_zeros(qs.shape)
        elif len(parts) == 1 and extra is None:
            mine, lse = parts[0].forward(qs, ks, vs, scale, need_lse,
                                         _table_of(table, sel, npat))
            if need_lse:
                lse_all[:, sel] = lse
        else:
            results = [part.forward(qs, ks, vs, scale, True, _table_of(table, sel, npat))
                       for part in parts]
            if extra is not None:
                results.append(runner.extra.forward(qs, *(take_heads(t, kv) for t in extra),
                                                    scale))
            mine, lse = merge(results)
            if need_lse:
                lse_all[:, sel] = lse
            mine = mine.to(q.dtype)
        if empty is not None:
            mine = mine.masked_fill(torch.as_tensor(empty, device=q.device)[:, None], 0.0)
            if need_lse:
                lse_all[:, sel] = lse_all[:, sel].masked_fill(
                    torch.as_tensor(empty, device=q.device), 0.0)
        if npat == 1:
            return mine, lse_all
        out[:, sel] = mine
    return out, lse_all


def _merged_backward(runner, q, k, v, out, lse, dout, scale, extra=None, table=None):
    """``(dq, dk, dv)``, then with ``extra`` the gradients of the extra keys and values, then
    with ``table`` the table's gradient."""
    import torch

    npat = len(runner.patterns)
    tensors = (q, k, v, *(extra or ()), *(() if table is None else (table,)))
    if npat > 1 or not runner.patterns[0]:
        grads = [torch.zeros_like(t) for t in tensors]
    else:
        grads = [None] * len(tensors)
    at_table = len(tensors) - 1

    def add(i, sel, g):  # the first part's gradient is taken as it is, the others added
        if g is None:
            return
        if i == at_table and table is not None:
            sel = slice(None) if table.shape[0] == 1 else sel
        if grads[i] is None:
            grads[i] = g
        elif i == at_table and table is not None:
            grads[i][sel] += g
        elif isinstance(sel, slice):
            grads[i][:, sel] += g
        else:  # a kv head read by several of the pattern's query heads: summed
            grads[i].index_add_(1, sel.to(g.device), g)

    for p, parts in enumerate(runner.patterns):
        sel = _heads_of(p, npat, q.shape[1])
        kv = kv_heads_of(p, npat, q.shape[1], k.shape[1])
        args = [take_heads(t, kv) if t is k or t is v else t[:, sel]
                for t in (q, k, v, out, lse, dout)]
        rows = _table_of(table, sel, npat)
        for part in parts:
            dq, dk, dv, dtable = part.backward(*args, scale, rows)
            for i, g in enumerate((dq, dk, dv)):
                add(i, sel if i == 0 else kv, g)
            if table is not None:
                add(at_table, sel, dtable)
        if extra is not None:
            ak, av = (take_heads(t, kv) for t in extra)
            grads_extra = runner.extra.backward(args[0], ak, av, *args[3:], scale)[:3]
            for i, g in zip((0, 3, 4), grads_extra):
                add(i, sel if i == 0 else kv, g)
    if table is not None and grads[at_table] is None:
        grads[at_table] = torch.zeros_like(table)
    return tuple(grads)

