"""Execution of a :class:`patterngen.plan.Plan`: dense terms, a gather group, an exact merge.

Each part of a term-wise plan returns ``(out_t, lse_t)`` over the whole grid (``lse_t = -inf``
where the part gives a query no key, decided from the IR's exact counts, never from a kernel's
value for a fully masked row). The ``patterngen::planned_fwd`` operator merges them in
float32 (float64 for float64 inputs) as ``lse = logsumexp_t lse_t``,
``out = sum_t exp(lse_t - lse) out_t``, and its backward (``planned_bwd``) hands every part
the *merged* ``out`` and ``lse`` (FlashAttention-2:
``D = rowsum(dO * out)``, ``P = exp(S - lse)``), so each part's gradient is exactly its share
and no part keeps probabilities.

- :class:`DenseTerm` runs a term as ``(batch * heads, problems, rows, head_dim)`` fused
  attention after views and one permute (the axes of :class:`patterngen.plan.DenseShape`), with
  a mask only where the term has padding, causal pairs or pairs of earlier terms. On CPU the
  fused kernel is ``aten._scaled_dot_product_flash_attention_for_cpu`` (returns the
  log-sum-exp; its backward op takes the merged out and lse); small float32/float64 problems
  run as matmul, exp, matmul instead (faster below ``MATMUL_KEYS`` keys, measured); on CUDA
  ``aten._scaled_dot_product_efficient_attention`` with ``compute_log_sumexp``. A plan that
  is one such term without a mask runs, in eager mode, through torch's own autograd instead
  (:meth:`DenseTerm.autograd_forward`).
- :class:`GatherGroup` runs a pattern's gather terms (windows) by the numba kernels, which
  already return the log-sum-exp and take it back in their backward.

The package: :mod:`.dense_term` (the dense problems: :class:`DenseTerm`, :class:`ExtraKeys`),
:mod:`.token_order` (a lone term's :class:`TokenOrder`), :mod:`.termwise` (the gather group,
the merge and the operators), and here :class:`PlannedBackend`, ``backend="auto"``: plans per
kind of call and runs the plan.

Example:
    >>> import torch, patterngen as pg
    >>> attn = pg.compile(pg.criss_cross(), grid=(8, 8), backend="auto", strategy="terms")
    >>> attn.plan.strategy  # forced here: the planner's own choice depends on measured rates
    'terms'
    >>> q = k = v = torch.randn(1, 2, 8, 8, 16)
    >>> attn(q, k, v).shape
    torch.Size([1, 2, 8, 8, 16])
"""

from __future__ import annotations

import torch

from patterngen.backends import Backend, get_backend, register_backend
from patterngen.backends.inputs import flatten_qkv
from patterngen.bias import check_softcap
from patterngen.call import bias_trains
from patterngen.errors import PatternError
from patterngen.plan import dense_form, plan

from .dense_term import HOLES, DenseTerm, ExtraKeys
from .termwise import GatherGroup, TermsPart, TermWise, covered, planned_fwd, register_runner
from .token_order import TokenOrder

__all__ = ["PlannedBackend", "DenseTerm", "GatherGroup", "ExtraKeys", "TermsPart", "TokenOrder",
           "covered", "HOLES"]

#: call signatures :class:`PlannedBackend` keeps checked (cleared when full: a model calls
#: with a few kinds of input)
CHECKED_CALLS = 64


class PlannedBackend(Backend):
    """``backend="auto"``: the pattern run as :func:`patterngen.plan.plan` chooses.

    The plan is made at compile time for ``device``, ``dtype`` and the sizes given (or
    ``head_dim=32, heads=4, batch=1``): declare the sizes the calls will have and the first
    call does not plan. A call whose inputs have another device, dtype or sizes, or that
    needs gradients when the plan was for inference, is planned again for them (once per
    kind of call, kept), so e.g. bfloat16 inputs on CPU run on an executor that takes them.

    Args:
        ir: the lowered pattern.
        device, dtype: what the inputs will be.
        head_dim, heads, batch: the sizes to plan for.
        backward: plan for forward + backward.
        scale: default score scale; ``None`` means ``head_dim ** -0.5``.
        strategy: force a strategy (``"terms"``, ``"numba"``, ``"sdpa"``, ``"flex"``).
        terms: in the term-wise strategy, force ``"dense"`` or ``"gather"`` terms.
        rates: planner rates (:class:`patterngen.calibrate.Rates`); default this machine's.
        autotune: time the strategies predicted close to the chosen one on a call's own
            inputs, once per kind of call, and run the fastest (:mod:`patterngen.autotune`).

    Attributes:
        plan: the :class:`~patterngen.plan.Plan` the last call ran (before any call, the
            compile-time one); :attr:`plans` lists every plan made.
    """

    name = "auto"
    SUPPORTED_DEVICES = ("cpu", "cuda")
    SUPPORTED_DTYPES = ("float32", "float64", "float16", "bfloat16")
    SUPPORTS_REL_POS_BIAS = True
    SUPPORTS_SOFTCAP = True
    SUPPORTS_ADDITIONAL_KEYS = True
    SUPPORTS_KEY_GRID = True

    def __init__(self, ir_, device="cpu", dtype="float32", head_dim=32, heads=4, batch=1,
                 backward=False, scale=None, strategy=None, rates=None, terms=None,
                 softcap=None, autotune=False):
        self.ir = ir_
        self.shape = ir_.grid.require_numeric("the auto backend")
        self.key_shape = None if ir_.key_grid is None else ir_.key_grid.require_numeric(
            "the auto backend")
        self.scale = scale
        self.softcap = check_softcap(softcap)
        self._strategy = strategy
        self._rates = rates
        self._terms = terms
        self._autotune = bool(autotune)
        self._tuned = {}
        self._plans = {}
        self._runs = {}
        #: call signatures (:func:`_signature`) that passed the input checks: their flat
        #: shapes and plan key, so that a repeated kind of call skips the checks
        self._checked = {}
        self._order = None
        self.plan = self._plans[self._plan(str(device).split(":")[0],
                                           str(dtype).rsplit(".", 1)[-1], head_dim, heads,
                                           batch, backward)]

    def _plan(self, device, dtype, head_dim, heads, batch, backward, strategy=None,
              bias=False, contiguous=True, kv_heads=None, extra_keys=0, bias_grad=None):
        """The key of the plan for these inputs, planned (for the first ``batch`` seen: the
        costs scale with it alike) and built on first use; ``strategy`` (a name or a tuple
        of names) restricts the strategies beyond the constructor's. The call's softcap,
        ``bias`` (and whether it needs a gradient, ``bias_grad``), extra keys and layout go
        to the planner, whose executors say whether they take them and what they cost."""
        strategy = strategy or self._strategy
        bias_grad = bias_trains(bias, backward, bias_grad)
        key = (device, dtype, head_dim, heads, backward, strategy, bias, contiguous,
               kv_heads or heads, extra_keys, bias_grad)
        if key not in self._plans:
            allowed = (strategy,) if isinstance(strategy, str) else strategy
            chosen = plan(self.ir, None, executors=allowed, terms=self._terms,
                          head_dim=head_dim, heads=heads, batch=batch, device=device,
                          dtype=dtype, backward=backward, rates=self._rates,
                          contiguous=contiguous, kv_heads=kv_heads, bias=bias,
                          softcap=self.softcap is not None, extra_keys=extra_keys,
                          bias_grad=bias_grad)
            self._runs[key] = self._build(chosen)
            self._plans[key] = chosen
        return key

    def prepare(self, device, dtype=None, head_dim=None, heads=None) -> None:
        """Plan and build for inference and for training, with and without a bias table, for
        contiguous and strided inputs, on ``device`` with these sizes, so that traced calls
        (``torch.compile``) only look plans up."""
        import itertools

        import torch

        device = torch.device(device)
        dtype = str(dtype or self.plan.dtype).rsplit(".", 1)[-1]
        for grad, bias, contiguous, bias_grad in itertools.product((False, True), repeat=4):
            key = self._plan(device.type, dtype, head_dim or self.plan.head_dim,
                             heads or self.plan.heads, self.plan.batch, grad, bias=bias,
                             contiguous=contiguous, bias_grad=bias_grad)
            self._runs[key].prepare(device, dtype, head_dim, heads)

    @property
    def plans(self) -> list:
        """Every plan made so far: the compile-time one, then those for other inputs."""
        return list(self._plans.values())

    @property
    def executed_pairs(self) -> tuple[int, ...]:
        return tuple(sum(tp.executed for tp in tps) for tps in self.plan.patterns)

    @property
    def op_key(self) -> str | None:
        """The operator key that runs :attr:`plan` (``patterngen::planned_fwd`` for a term-wise
        plan, the whole-pattern backend's own otherwise); ``None`` when it has none."""
        key = next(k for k, p in self._plans.items() if p is self.plan)
        return getattr(self._runs[key], "op_key", None)

    def __repr__(self):
        return f"PlannedBackend({self.ir.label} on grid {self.ir.grid}: {self.plan.strategy})"

    def _build(self, plan):
        """What runs ``plan``: a term-wise runner (registered for the operators) or the
        whole-pattern backend."""
        if plan.strategy == "terms":
            runner = TermWise(self.ir, plan, self.softcap)
            runner.op_key = register_runner(runner, plan)
            return runner
        options = {} if self.softcap is None else {"softcap": self.softcap}
        return get_backend(plan.strategy)(self.ir, scale=self.scale, **options)

    @property
    def token_order(self) -> TokenOrder:
        """The order of this pattern's dense problems (:class:`TokenOrder`), in which
        ``ordered=True`` calls take q, k, v and return the output.

        Raises:
            PatternError: for a pattern that is not one term dense after a view (a union, a
                window, listed head patterns, keys on another grid), or whose queries and
                keys are viewed in different orders.
        """
        if self._order is None:
            try:
                self._order = self._order_of()
            except PatternError as refusal:  # kept: layers ask on every call
                self._order = str(refusal)
        if isinstance(self._order, str):
            raise PatternError(self._order)
        return self._order

    def _order_of(self) -> TokenOrder:
        why = None
        if len(self.ir.patterns) != 1 or self.ir.key_grid is not None:
            why = "listed head patterns or keys on another grid"
        elif len(self.ir.terms) != 1:
            why = f"a union of {len(self.ir.terms)} terms"
        else:
            [term] = self.ir.terms
            shape = dense_form(term, self.shape)
            if isinstance(shape, str):
                why = shape
            elif any((ax.coords("q").shape != ax.coords("k").shape)
                     or (ax.coords("q") != ax.coords("k")).any() for ax in shape.axes):
                why = "its queries and keys are viewed in different orders"
        if why is not None:
            raise PatternError(
                f"auto: {self.ir.label} on grid {self.shape} has no token order: it is not one "
                f"term that is dense after a view ({why}). ordered=True needs such a pattern "
                f"(pg.block, a grid window as pg.window(G, dilation=n // G), pg.axis).")
        from patterngen.bias import reach

        adds = self.ir.patterns[0].key_counts() > 0
        return TokenOrder(DenseTerm(term, shape, (), self.shape, adds, self.softcap,
                                    reach(self.ir)))

    def _ordered(self, q, k, v, scale, additional_keys, additional_values, rel_bias):
        """A call with q, k, v ``(batch, heads, positions, head_dim)`` in
        :attr:`token_order`: the dense term on them as they are where
        :meth:`DenseTerm.autograd_forward` applies and nothing is padding (in the fused
        kernel where :meth:`DenseTerm.ordered_fused` applies), else the tokens put back on
        the grid, the call as planned, and its output put in order (exact, one copy each
        way). A repeated kind of call skips the shape checks, as :meth:`__call__` does, and
        runs the fused kernel's function kept for it (:meth:`DenseTerm.ordered_inference`)
        where there is one."""
        order = self.token_order
        term = order.term
        grad = torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad for t in (q, k, v, rel_bias))
        alone = additional_keys is None and additional_values is None
        tensor_table = rel_bias is None or isinstance(rel_bias, torch.Tensor)
        seen = None if torch.compiler.is_compiling() or not tensor_table else _signature(
            q, k, v, grad, ("ordered", alone, _table_kind(rel_bias)))
        fused = self._checked.get(seen, _UNSEEN) if seen is not None else _UNSEEN
        if fused is _UNSEEN:
            for name, t in (("q", q), ("k", k), ("v", v)):
                order.check(t, name, "auto (ordered=True)",
                            "(batch, heads, {positions}, head_dim)")
            flatten_qkv(q, k, v, (order.positions,), "auto (ordered=True)")
            fused = None
            # a table of q's dtype passes its checks the same way for every call of this
            # kind (its shape, dtype and device are in the signature; autocast casts others)
            if (alone and not grad and not order.padded and term.autograd_applies(q)
                    and tensor_table and (rel_bias is None or rel_bias.dtype == q.dtype)):
                fused = term.ordered_inference(q, k, v, self.check_rel_bias(rel_bias, q))
            if seen is not None:
                self._remember(seen, fused)
        if fused is not None:
            out = fused(q, k, v, self._scale(scale, q), rel_bias)
            if out is not None:
                return out
        if alone and not order.padded and term.autograd_applies(q):
            table = self.check_rel_bias(rel_bias, q)
            scale = self._scale(scale, q)
            b, h, t, d = q.shape
            out = None if fused is not None else term.ordered_fused(q, k, v, scale, table)
            if out is not None:
                return out
            out = term.problems_forward(*(x.reshape(x.shape[0] * x.shape[1], term.problems,
                                                    -1, d) for x in (q, k, v)),
                                        h, scale, table)
            if out is not None:
                return out.reshape(b, h, t, d)
        out = self(order.on_grid(q), order.on_grid(k), order.on_grid(v), scale,
                   additional_keys, additional_values, rel_bias)
        return order.in_order(out)

    def _scale(self, scale, q) -> float:
        """The call's score scale: its own, else the constructor's, else ``head_dim ** -0.5``."""
        scale = scale if scale is not None else self.scale
        return float(q.shape[-1] ** -0.5 if scale is None else scale)

    def _remember(self, seen, checked) -> None:
        """Keep a call signature that passed the input checks (cleared when full)."""
        if len(self._checked) >= CHECKED_CALLS:
            self._checked.clear()
        self._checked[seen] = checked

    def __call__(self, q, k, v, scale=None, additional_keys=None, additional_values=None,
                 rel_bias=None, ordered: bool = False):
        """Attention of ``q`` over ``k, v`` under the compiled pattern, as planned.

        Args:
            q, k, v: ``(batch, heads, *grid, head_dim)`` or ``(batch, heads, tokens,
                head_dim)`` tensors of one dtype on one CPU or CUDA device.
            scale: score scale; default the constructor's, else ``head_dim ** -0.5``.
            additional_keys, additional_values: ``(batch, heads, n_extra, head_dim)`` tokens
                outside the grid that every query attends besides its pattern, in the same
                softmax (NATTEN's ``additional_keys``); they get gradients too.
            rel_bias: a relative position bias table (:mod:`patterngen.bias`), added by
                every part (the gather group's numba kernels read it around its centre).
            ordered: q, k, v are ``(batch, heads, positions, head_dim)`` in
                :attr:`token_order`, and so is the output.

        Raises:
            PatternError: for a wrong type, shape, grid, device or dtype, naming the values.
        """
        if ordered:
            return self._ordered(q, k, v, scale, additional_keys, additional_values, rel_bias)
        grad = torch.is_grad_enabled() and any(
            isinstance(t, torch.Tensor) and t.requires_grad
            for t in (q, k, v, additional_keys, additional_values, rel_bias))
        seen = None
        if (additional_keys is None and additional_values is None
                and not torch.compiler.is_compiling()):
            seen = _signature(q, k, v, grad, _bias_state(rel_bias))
            hit = self._checked.get(seen)
            if hit is not None:  # these shapes, strides, dtypes and devices passed the checks
                flat_q, flat_kv, key, alone, inference = hit
                out_shape = q.shape
                if alone is not None:
                    # the lone dense term views the caller's tensors itself: no flattening,
                    # no layer between (a third of the Python of a 0.3 ms call); without
                    # gradients or a table its function for these shapes
                    self.plan = self._plans[key]
                    out = (inference(q, k, v, self._scale(scale, q)) if inference is not None
                           else alone.applied_forward(q, k, v, self._scale(scale, q),
                                                      self.check_rel_bias(rel_bias, q),
                                                      out_shape))
                    if out is not None:
                        return out
                return self._run(key, q, k, v, q.reshape(flat_q), k.reshape(flat_kv),
                                 v.reshape(flat_kv), lambda out: out.reshape(out_shape),
                                 scale, None, rel_bias, grad)
        qf, kf, vf, restore = self.flatten_inputs(q, k, v)
        if qf.shape[-1] < 1:
            raise PatternError(f"auto: q has shape {tuple(q.shape)}; expected head_dim >= 1.")
        extra = self.check_extra_keys(additional_keys, additional_values, qf, rel_bias,
                                      kf.shape[1])
        wanted = (qf.device.type, str(qf.dtype).rsplit(".", 1)[-1], qf.shape[-1], qf.shape[1],
                  qf.shape[0], grad)
        sizes = dict(bias=rel_bias is not None, bias_grad=_bias_state(rel_bias) is True,
                     contiguous=all(t.is_contiguous() for t in (qf, kf, vf)),
                     kv_heads=kf.shape[1], extra_keys=0 if extra is None else extra[0].shape[2])
        key = self._plan(*wanted, **sizes)
        if seen is not None and not self._autotune:
            # the lone dense term where its direct path applies to these inputs (their dtype
            # and device are in the signature; a call under torch.compile keeps no signature)
            alone = self._runs[key].alone if self._plans[key].strategy == "terms" else None
            alone = alone if alone is not None and alone.autograd_applies(qf) else None
            inference = (alone.inference(q, k, q.shape) if alone is not None and not grad
                         and rel_bias is None and k.shape[1] == q.shape[1] else None)
            self._remember(seen, (qf.shape, kf.shape, key, alone, inference))
        if self._autotune and self._strategy is None and not torch.compiler.is_compiling():
            key = self._tune(key, wanted, sizes, grad, (q, k, v, scale, additional_keys,
                                                         additional_values, rel_bias))
        return self._run(key, q, k, v, qf, kf, vf, restore, scale, extra, rel_bias, grad)

    def _tune(self, key, wanted, sizes, grad, args):
        """The key of the fastest of the strategies predicted close to ``key``'s, timed once
        on copies of the call's inputs (or read from the autotune file)."""
        import torch

        from patterngen import autotune

        if key in self._tuned:
            return self._tuned[key]
        names = autotune.candidates(self._plans[key])
        if len(names) < 2:
            self._tuned[key] = key
            return key
        entry = autotune.key(self.ir.label, self.shape, self._plans[key].call)
        winner = autotune.cached(entry, names)
        keys = {name: self._plan(*wanted, strategy=name, **sizes) for name in names}
        if winner is None:
            q, k, v, scale, ak, av, table = args
            tensors = [t for t in (q, k, v, ak, av, table) if t is not None]

            def step(name):
                copies = [t.detach().clone().requires_grad_(grad and t.requires_grad)
                          for t in tensors]
                it = iter(copies)
                cq, ck, cv = next(it), next(it), next(it)
                cak, cav = (next(it), next(it)) if ak is not None else (None, None)
                ctable = next(it) if table is not None else None

                def call():
                    with torch.set_grad_enabled(grad):
                        qf, kf, vf, restore = self.flatten_inputs(cq, ck, cv)
                        extra = None if cak is None else (cak, cav)
                        out = self._run(keys[name], cq, ck, cv, qf, kf, vf, restore, scale,
                                        extra, ctable, grad)
                        if grad:
                            torch.autograd.grad(out, [t for t in copies if t.requires_grad],
                                                torch.ones_like(out))
                return call

            times = {name: autotune.time_ms(name, step(name)) for name in names}
            winner = min(times, key=times.get)
            autotune.store(entry, winner, times)
        self._tuned[key] = keys[winner]
        return keys[winner]

    def _run(self, key, q, k, v, qf, kf, vf, restore, scale, extra, rel_bias, grad):
        """Run the plan of ``key`` on the checked inputs."""
        run = self._runs[key]
        self.plan = self._plans[key]
        if self.plan.strategy != "terms":
            options = {} if rel_bias is None else {"rel_bias": rel_bias}
            if extra is not None:
                options.update(additional_keys=extra[0], additional_values=extra[1])
            return run(q, k, v, scale=scale if scale is not None else self.scale, **options)
        rel_bias = self.check_rel_bias(rel_bias, qf)
        scale = self._scale(scale, qf)
        ak, av = extra or (None, None)
        if run.alone is not None and extra is None:
            out = run.alone.autograd_forward(qf, kf, vf, scale, rel_bias)
            if out is not None:
                return restore(out)
        return restore(planned_fwd(qf, kf, vf, ak, av, rel_bias, run.op_key, scale,
                                    grad)[0])


def _bias_state(table):
    """``None`` without a bias table, else whether it needs a gradient (a backward then
    computes the table's)."""
    return None if table is None else bool(getattr(table, "requires_grad", False))


def _table_kind(table):
    """What an ordered call's signature reads of a ``rel_bias`` table: its shape, dtype and
    device (``None`` without one)."""
    return None if table is None else (table.shape, table.dtype, table.device)


#: what :class:`PlannedBackend`'s kept signatures hold for a kind of call not seen yet
_UNSEEN = object()


def _signature(q, k, v, grad, bias):
    """What the input checks and the plan key of a call read from ``q, k, v`` (types,
    shapes, strides, dtypes, devices), whether it needs gradients and has a bias table
    (or what else tells the calls apart): a call with the same signature passes the same
    checks and runs the same plan."""
    import torch

    if not (type(q) is type(k) is type(v) is torch.Tensor):
        return None
    return (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype,
            v.dtype, q.device, k.device, v.device, grad, bias)


register_backend("auto", PlannedBackend)
