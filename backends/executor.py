"""Executors: every way patterngen runs attention, behind one protocol the planner asks.

An executor answers, for a lowered pattern (or the part of it it would run) and a frozen
:class:`patterngen.call.Call`:

- :meth:`Executor.can_run`: ``None``, or why not, in words;
- :meth:`Executor.work`: the exact work it would launch, as :class:`patterngen.call.Op` s
  (dense problems and their shapes on their kernel, numba pairs with the lane plan, copies in
  bytes, launches), which :meth:`patterngen.calibrate.Rates.price` turns into milliseconds;
- :meth:`Executor.prepare`: the executor's run of ``lowered`` (a pattern, or the terms of it
  a part runs) for calls like ``call``, one object per (executor, part, call), as xformers
  prepares an op for its ``Inputs``: ``forward(q, k, v, scale, need_lse=True, table=None) ->
  (out, lse)`` and ``backward(q, k, v, out, lse, dout, scale, table=None) -> (dq, dk, dv,
  dtable)`` from the *merged* ``out``/``lse`` (:mod:`.merge`), so that any executor's run
  merges with any other's (:class:`Part`);
- :meth:`Executor.compile`: an ``attn(q, k, v, ...)`` that runs the pattern on it (the
  conformance test runs every executor through this and through :meth:`Executor.prepare`).

*Whole* executors (``numba``, ``sdpa``, ``flex``) run a pattern alone: each is one strategy of
:func:`patterngen.plan.plan`. *Parts* (``dense``: one term as a batch of dense problems;
``gather``: the window terms, by the numba kernels; ``extra``: keys outside the grid) are
merged by log-sum-exp in the term-wise strategy (``terms``, :mod:`.planned`), which runs each
through :meth:`Executor.prepare`. :data:`TOLERANCES` are what each executor is held to against
the dense oracle, by dtype.
"""

from __future__ import annotations

import math

from patterngen import ir
from patterngen.backends import get_backend
from patterngen.backends.merge import acc_dtype
from patterngen.call import Call, Op, spilled
from patterngen.errors import PatternError
from patterngen.plan import COPYING, DenseShape, gather_first, has_mask

__all__ = ["Executor", "Part", "AutogradPart", "TOLERANCES", "WHOLE", "PARTS", "RESIDENT",
           "numba_work", "dense_work"]

#: ``{dtype: (atol, rtol)}`` against the float64 oracle, outputs and gradients
TOLERANCES = {"float64": (1e-9, 1e-7), "float32": (1e-4, 1e-4), "bfloat16": (4e-2, 4e-2),
              "float16": (4e-3, 4e-3)}


class Executor:
    """The protocol. Subclasses set :attr:`name`, :attr:`backend` (the registry name of the
    backend that runs them) and implement :meth:`work`."""

    name = "?"
    backend = "?"
    whole = True
    tolerances = TOLERANCES
    #: devices where the planner considers it unasked (it can run elsewhere when named)
    planned_devices = ("cpu", "cuda")
    #: the planner compares predictions times this: an executor whose predictions spread
    #: wider is chosen over another only when predicted that much cheaper
    margin = 1.0

    def _backend(self):
        from . import get_backend

        return get_backend(self.backend)

    def can_run(self, lowered, call: Call) -> str | None:
        """``None`` when this executor can run ``lowered`` for ``call``, else why not."""
        cls = self._backend()
        reasons = cls.not_supported_reasons(lowered, call.device, call.dtype)
        if call.backward and call.device not in cls.BACKWARD_DEVICES:
            reasons.append(f"no backward on {call.device}")
        for wanted, flag, what in ((call.bias, "SUPPORTS_REL_POS_BIAS", "a bias table"),
                                   (call.softcap, "SUPPORTS_SOFTCAP", "a softcap"),
                                   (call.extra_keys, "SUPPORTS_ADDITIONAL_KEYS", "extra keys")):
            if wanted and not getattr(cls, flag, False):
                reasons.append(f"no {what}")
        return "; ".join(reasons) or None

    def work(self, lowered, call: Call) -> list:
        """The ops this executor launches for ``call`` (see :class:`patterngen.call.Op`)."""
        raise NotImplementedError

    def compile(self, lowered, call: Call, **options):
        """``attn(q, k, v, ...)`` running ``lowered`` on this executor for calls like
        ``call``."""
        return self._backend()(lowered, **options)

    def prepare(self, lowered, call: Call, softcap=None, **part) -> "Part":
        """The :class:`Part` that runs ``lowered`` on this executor for calls like ``call``,
        scores capped at ``softcap`` (``None``: off). ``part``: what it needs besides
        (``dense``: ``earlier``, ``reach``, ``dense``; ``numba``, ``sdpa``: their backend's
        options)."""
        raise NotImplementedError

    def __repr__(self):
        return f"<executor {self.name}>"


class Part:
    """What :meth:`Executor.prepare` returns: one executor's run of one lowered pattern or
    part, on flattened, checked inputs ``q`` ``(batch, heads, tokens, head_dim)``, ``k``,
    ``v`` ``(batch, kv heads, keys, head_dim)``, a checked bias ``table`` for these heads (or
    ``None``) and a float ``scale``."""

    def forward(self, q, k, v, scale, need_lse: bool = True, table=None):
        """``(out, lse)``: ``out`` in q's dtype, ``lse`` ``(batch, heads, tokens)`` in
        :func:`.merge.acc_dtype`, the natural log-sum-exp of each query's scores, ``-inf``
        where this part gives it no key (``None`` when not ``need_lse``, where a part may
        skip it)."""
        raise NotImplementedError

    def backward(self, q, k, v, out, lse, dout, scale, table=None):
        """``(dq, dk, dv, dtable)``: this part's share of the gradients, from the *merged*
        ``out`` and ``lse`` of every part (``dtable`` ``None`` without a table)."""
        raise NotImplementedError

    def autograd_forward(self, q, k, v, scale, table=None):
        """For a part that runs alone (its out is the merged one): its output through torch's
        autograd where its executor has a faster path so, else ``None`` (then
        :meth:`forward` and :meth:`backward` run it)."""
        return None


class AutogradPart(Part):
    """A part whose forward ``run(q, k, v, scale, table) -> (out, lse)`` is differentiable by
    torch in both outputs (block-sparse sdpa, FlexAttention), and which has no kernel that
    takes a merged log-sum-exp back. Its backward runs the forward again under autograd and
    back-propagates the merged gradient's share: with ``w = exp(lse_t - lse)``, ``out``'s
    cotangent ``w * dout`` and ``lse_t``'s ``w * rowsum(dout * (out_t - out))``, whose sum
    over the parts is exactly ``dS = P (dout v^T - rowsum(dout * out))`` of the merged
    softmax."""

    def __init__(self, run, alone=None):
        self.run, self.alone = run, alone

    def autograd_forward(self, q, k, v, scale, table=None):
        """``alone(q, k, v, scale=, rel_bias=)``: the backend's own call (its fused kernels,
        torch's autograd), where given."""
        if self.alone is None:
            return None
        return self.alone(q, k, v, scale=scale, **({} if table is None else
                                                   {"rel_bias": table}))

    def forward(self, q, k, v, scale, need_lse=True, table=None):
        import torch

        with torch.no_grad():
            out, lse = self.run(q, k, v, scale, table)
        return out, lse.to(acc_dtype(q.dtype))

    def backward(self, q, k, v, out, lse, dout, scale, table=None):
        import torch

        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        if table is not None:
            leaves.append(table.detach().requires_grad_())
        with torch.enable_grad():
            out_t, lse_t = self.run(*leaves[:3], scale, None if table is None else leaves[3])
        acc = acc_dtype(q.dtype)
        part = lse_t.detach().to(acc)
        w = torch.where(part > float("-inf"), torch.exp(part - lse.to(acc)), 0.0)
        spread = (dout.to(acc) * (out_t.detach().to(acc) - out.to(acc))).sum(-1)
        grads = torch.autograd.grad(
            (out_t, lse_t), leaves,
            ((w[..., None] * dout.to(acc)).to(out_t.dtype),
             torch.where(w > 0, w * spread, 0.0).to(lse_t.dtype)), allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]
        return (*grads[:3], grads[3] if table is not None else None)


def _numba_part(lowered, softcap, **options):
    """The numba kernels on ``lowered`` as a part (``options``: the backend's): they return
    the log-sum-exp and take the merged one back."""
    from .planned import GatherGroup

    return GatherGroup(lowered, softcap, **options)


def _restride(name: str, tokens: int, call: Call) -> list:
    """A copy of q, k and v when they are not contiguous and executor ``name`` copies them
    (``COPYING``)."""
    if call.contiguous or name not in COPYING:
        return []
    return [Op("restride", 3 * tokens * call.batch * call.heads * call.head_dim)]


def _heads_per_pattern(lowered, call: Call) -> list[int]:
    """(batch, head) pairs each listed pattern serves (heads cycle over the patterns)."""
    npat = len(lowered.patterns)
    return [call.batch * len(ir.heads_of(p, npat, call.heads)) for p in range(npat)]


def numba_work(lowered, call: Call, launch: str) -> list:
    """The numba kernels on ``lowered``: the pairs they compute with their lane plan (tiles of
    queries that share keys compute each tile's union), their queries, the key rows they visit
    (of two keys or more, and of one key or none: ``plain``) and the keys their forward
    buffers one at a time (:mod:`.numba.counts`), and one call of the ``launch`` path. Tiles
    that span rows over a key grid run their own loop (a key-major chunk, one finish for all
    lanes) and are priced as their own lane plan, ``span``."""
    from .numba import executed, plan_lanes
    from .numba.counts import kernel_counts
    from .numba.tiling import plan_groups, runs_first

    lowered = runs_first(lowered)  # the kernels' order of terms, as the backend runs them
    shape = lowered.grid.shape
    lanes, shared = plan_lanes(lowered, shape)
    work = _heads_per_pattern(lowered, call)
    pairs = sum(n * w for n, w in zip(executed(lowered, shape, lanes, shared)[0], work))
    # a bias table runs the tiles one row each (NumbaBackend.source_for)
    groups = () if call.bias else plan_groups(lowered, shape, lanes)
    counts = kernel_counts(lowered, shape, lanes, shared, groups)
    kind, d = "span" if groups else "tiles" if lanes else "one", (call.head_dim,)
    return [Op("launch", 1, kernel=launch), Op("numba", pairs, d, kind),
            *(Op(what, sum(getattr(c, what) * w for c, w in zip(counts, work)), d, kind)
              for what in ("queries", "rows", "loose", "plain"))]


def attend_kernel(call: Call, keys: int) -> str:
    """The kernel a dense term's or the extra keys' problems run on: the matmul path for small
    float32/float64 problems on CPU and for a bias or softcap (the fused kernels give no score
    gradient), the fused kernel otherwise."""
    from .dense import MATMUL_KEYS

    small = (call.device == "cpu" and call.dtype in ("float32", "float64")
             and keys <= MATMUL_KEYS)
    return "matmul" if small or call.bias or call.softcap else "fused"


def alone_kernel(call: Call, keys: int) -> str:
    """The kernel of a dense term that is the whole plan and runs through torch's autograd
    (``DenseTerm.autograd_forward``, taken on the matmul path only): ``kept`` (the
    probabilities kept for the backward, none of the merge's log-sum-exp), or without
    gradients and with a bias table the fused kernel, which adds the table as its mask."""
    kernel = attend_kernel(call, keys)
    if kernel != "matmul":
        return kernel
    return "fused" if call.bias and not call.backward else "kept"


def _spill(kernel: str, problems: int, rows: int, keys: int, call: Call,
           calls: int = 1) -> list:
    """The bytes of scores beyond the caches on the paths that hold a call's scores whole
    (the fused kernel holds a tile of them at a time)."""
    count = spilled(problems, rows, keys, call.itemsize, calls) \
        if kernel in ("matmul", "kept") else 0
    return [Op("spill", count)] if count else []


def dense_work(shape: DenseShape, tokens: int, call: Call, alone: bool = False,
               masked: bool = False) -> list:
    """A term as ``shape``'s problems for every (batch, kv head), the query heads of a kv head
    folded into rows; the views of q, k, v and the output's inverse view copy unless they
    are pure views. ``alone``: the term is the whole plan and gives every query a key, so it
    runs through torch's autograd where it takes the matmul path (:func:`alone_kernel`);
    ``masked``: its problems have a mask (``plan.has_mask``)."""
    group = call.heads // call.kv_heads
    rows = shape.queries * group
    kernel = (alone_kernel if alone else attend_kernel)(call, shape.keys)
    problems = shape.batch * call.batch * call.kv_heads
    ops = [Op("launch", 1, kernel="kernel"),
           Op("attend", problems, (rows, shape.keys, call.head_dim), kernel),
           *_spill(kernel, problems, rows, shape.keys, call)]
    # the lone term with a bias in inference, in the fused kernel, checks its output
    # instead (DenseTerm.applied_forward), and its mask is one per problem, read for each
    # batch and head
    lone_fused = alone and kernel == "fused" and attend_kernel(call, shape.keys) == "matmul"
    if not lone_fused and (attend_kernel(call, shape.keys) == "fused"
                           or masked and kernel != "kept"):
        # k and v checked for non-finite values first: the fused kernels give a row whose
        # keys all score -inf a log-sum-exp of 0, and a masked key's NaN or infinity must
        # not reach the queries that do not attend it (DenseTerm.forward); the lone term's
        # autograd path checks its output instead
        ops.append(Op("scan", 2 * tokens * call.batch * call.kv_heads * call.head_dim))
    if lone_fused and masked:
        ops.append(Op("blockmask", problems * rows * shape.keys))
    # the lone term's bias table in training is one more pass over its scores, before its
    # mask (dense.KeptAttention)
    adds = masked + (alone and kernel == "kept" and call.bias)
    if adds and kernel in ("matmul", "kept"):
        # added to the scores after the GEMM (the fused kernel takes it inside); a few holes
        # are filled in instead, measured no cheaper per problem (48 x 48, 3 of 48 keys)
        ops.append(Op("mask", adds * problems * rows * shape.keys, kernel=kernel))
    if shape.copied:
        per = call.batch * call.kv_heads * call.head_dim * call.itemsize
        elements = shape.batch * (rows + 2 * shape.keys) + tokens * group
        # a rolled view is an index_select each way (DenseTerm._gathered), which torch runs
        # on one thread where a permuted copy runs on all (1.6 MB at two threads: 101 us
        # against 30): priced at the gather's rate
        how = "roll" if shape.rolled else ""
        ops.append(Op("copy", elements * per, kernel=how))
        if call.backward and not (alone and kernel == "kept"):
            # the merge's backward views q, k and v again (autograd keeps the forward's)
            ops.append(Op("recopy", shape.batch * (rows + 2 * shape.keys) * per, kernel=how))
        # the views' copies read q, k and v where they lie: strided inputs are not copied
        # twice (measured: a projection's strided q, k, v cost a Swin window term 8-12% more
        # time, where a restride priced 30% more)
        return ops
    return ops + _restride("dense", tokens, call)


#: the numba kernels' margin: their measured / predicted spread far wider than the torch
#: kernels' (bench_plan.py: 0.44-2.17 against 0.49-1.30 for sdpa), and aligned 7x7 blocks,
#: predicted 2% from a dense batch, measured 1.4-2.7x slower than it
NUMBA_MARGIN = 1.1


class NumbaExecutor(Executor):
    name = backend = "numba"
    margin = NUMBA_MARGIN

    def prepare(self, lowered, call, softcap=None, **options):
        return _numba_part(lowered, softcap, **options)

    def work(self, lowered, call):
        return numba_work(lowered, call, "numba") + _restride(
            self.name, math.prod(lowered.grid.shape), call)


#: bytes of freed memory the C allocator keeps for reuse: glibc returns the top of its heap
#: to the system beyond twice its largest mmap threshold (32 MiB on 64-bit), and maps larger
#: blocks afresh each time, so a backward's buffers beyond this are on new pages, each
#: zeroed by the system on first touch (``fault``: W1's whole-input gradients of 16 MiB
#: zero-filled at 0.31 ns per byte, those of R12, 0.75 MiB, at 0.07)
RESIDENT = 64 << 20


class SdpaExecutor(Executor):
    """Block-sparse: each group of query blocks with the same number of key blocks is one
    batch of dense problems (``Bq`` rows against ``nk * Bk`` keys) on its kernel; its queries
    and key blocks are views where they are runs or bands and index gathers elsewhere (a band
    of several blocks is copied once, and its backward is ``unfold_backward``), its output
    copied into place, and in the backward every view's gradient is a zero-filled whole
    tensor, added up over the groups; a layout with partial
    blocks scans k and v for non-finite values once, a group with a mask per query block has
    the kernel read it for every batch and head (``blockmask``), a token order other than
    row-major copies q, k, v into it and the output back, and groups whose rows are not in
    token order have their output gathered back. Without gradients a gathered group runs on
    CPU in chunks of ``sdpa.calls.CHUNK_BYTES`` of keys, a kernel launch each. The fused
    kernel's backward writes the key and value gradients into new buffers whose layout a
    gathered group's ``index_add`` copies first, and rebuilds a bias table's gradient from the
    saved log-sum-exp (``dense.FlashBias``); what a backward allocates beyond
    :data:`RESIDENT` is on pages new to the process (``fault``)."""

    name = backend = "sdpa"

    def prepare(self, lowered, call, softcap=None, **options):
        """The block-sparse calls returning the log-sum-exp (``SdpaBackend.forward_lse``),
        backward through autograd (:class:`AutogradPart`): no fused kernel takes a merged
        log-sum-exp of gathered blocks back. ``options``: the backend's (block, order)."""
        backend = self._backend()(lowered, softcap=softcap, **options)
        return AutogradPart(backend.forward_lse, backend)

    def work(self, lowered, call):
        import numpy as np
        import torch

        from .sdpa.calls import DeviceCalls, spans
        from .sdpa.scores import Scores

        backend = self._backend()(lowered)
        ops = [Op("launch", 1, kernel="sdpa")]
        allocated = 0  # bytes of the backward's new gradient buffers
        d, per = call.head_dim, call.head_dim * call.itemsize
        tokens = math.prod(lowered.grid.shape)
        for blocks, work in zip(backend.block_sparse(), _heads_per_pattern(lowered, call)):
            layout = blocks["layout"]
            calls = DeviceCalls(layout, blocks["groups"], "cpu", torch)
            kv = work * call.kv_heads // call.heads
            key_tokens = layout.key_tokens  # the key grid's, where keys live on another
            for c in calls.calls:
                keys = c.nk * calls.bk
                rows = c.count * calls.bq
                # small mask-free float32/float64 groups without autograd: baddbmm, softmax,
                # bmm and no log-sum-exp (dense.matmul_attention, a bias table copied into
                # the scores first), kept's forward; with a softcap the matmul path; the fused
                # kernel otherwise, a bias table added as its mask
                plain = (c.matmul and not call.backward
                         and call.dtype in ("float32", "float64"))
                kernel = "matmul" if call.softcap else "kept" if plain else "fused"
                # a gathered group without a graph runs in chunks on CPU, a launch each
                runs = spans(c.count, kv * keys * per, c.k_band is None and not call.backward
                             and call.device == "cpu")
                ops += [Op("launch", len(runs), kernel="kernel"),
                        Op("attend", c.count * work, (calls.bq, keys, d), kernel),
                        *_spill(kernel, c.count * work, calls.bq, keys, call, len(runs))]
                # the fused backward's key and value gradients, per query head
                kv_grads = 2 * c.count * work * keys * per
                fused_backward = call.backward and kernel == "fused"
                if call.bias:
                    # the table gathered into the group's tiles, per head; one block's where
                    # every block has the same offsets (Swin's windows), broadcast over them
                    Scores(None, None, calls, layout, backend.reach).bias_index(c)
                    ops.append(Op("gather", c.bias_blocks * call.heads * calls.bq * keys
                                  * call.itemsize))
                    if kernel == "kept":  # and copied into the scores, which the GEMM adds to
                        ops.append(Op("mask", c.count * work * calls.bq * keys, kernel=kernel))
                    if fused_backward and call.bias_grad:
                        # the table's gradient: the scores and their gradient rebuilt from
                        # the log-sum-exp, two batched matmuls and a softmax's elementwise
                        # work, the matmul path's forward (dense.FlashBias); a table that
                        # needs none is a plain mask to the fused kernel
                        ops.append(Op("rebuild", c.count * work, (calls.bq, keys, d), "matmul"))
                if c.mask is not None and c.mask.shape[1] > 1:
                    # a mask per query block, read by the kernel for every (batch, head); one
                    # shared by the blocks stays in cache
                    ops.append(Op("blockmask", c.count * work * calls.bq * keys))
                if c.q_slice is None:
                    ops.append(Op("gather", rows * work * per))
                if c.k_band is None:
                    ops.append(Op("gather", 2 * c.count * keys * kv * per))
                    if fused_backward:  # made contiguous for index_add
                        ops.append(Op("recopy", kv_grads))
                elif c.nk > 1 and call.backward:  # a view; its backward is unfold_backward
                    ops.append(Op("band", 2 * c.count * keys * kv * per))
                if len(calls.calls) > 1 or calls.zero_row is not None or len(runs) > 1:
                    # the group's output, or each chunk's, copied into its rows
                    ops.append(Op("copy", rows * work * per))
                if c.empty is not None and call.backward and not call.extra_keys:
                    # its queries without keys zeroed in a copy: the kernel's output is saved
                    ops.append(Op("copy", rows * work * per))
                if call.backward:
                    # each view's backward fills a gradient of the whole q, k or v with zeros,
                    # and the groups' gradients are added up
                    ops.append(Op("fill", 2 * (tokens * work + 2 * key_tokens * kv) * per))
                    allocated += (tokens * work + 2 * key_tokens * kv) * per
                    allocated += kv_grads if fused_backward else 0
            if any(c.mask is not None for c in calls.calls):
                ops.append(Op("scan", 2 * key_tokens * kv * d))
            if not all((order == np.arange(len(order))).all()
                       for order in (blocks["permutation"], layout.key_permutation)):
                # q, k, v into the layout's token order, the output back
                ops.append(Op("copy", 2 * (tokens * work + key_tokens * kv) * per))
            elif not (calls.rows == tokens and (calls.row_of_pos == np.arange(tokens)).all()):
                # the groups' output rows, in group order, gathered back into token order
                ops.append(Op("gather", tokens * work * per))
        if call.device == "cpu" and allocated > RESIDENT:  # CUDA's allocator keeps its blocks
            ops.append(Op("fault", allocated - RESIDENT))
        return ops


class FlexExecutor(Executor):
    """FlexAttention, priced as the block-sparse batch of its 128-blocks. Planned on CUDA
    only: on CPU it compiles for seconds and has no backward (it runs there when named; eager
    here, which materialises every score)."""

    name = backend = "flex"
    planned_devices = ("cuda",)

    def compile(self, lowered, call, **options):
        return self._backend()(lowered, compile=call.device != "cpu", **options)

    def prepare(self, lowered, call, softcap=None, **part):
        """FlexAttention returning the log-sum-exp; its backward through autograd
        (:class:`AutogradPart`: flex has no backward that takes a log-sum-exp), on devices
        with a FlexAttention backward (not CPU).

        Raises:
            PatternError: for a call its :meth:`can_run` refuses (gradients on CPU), rather
                than torch's error inside the backward.
        """
        reason = self.can_run(lowered, call)
        if reason is not None:
            raise PatternError(f"flex: cannot prepare {lowered.label} for this call: "
                               f"{reason}.")
        options = {} if softcap is None else {"softcap": softcap}
        backend = self._backend()(lowered, compile=call.device != "cpu", **options)
        return AutogradPart(backend.forward_lse, backend)

    def work(self, lowered, call):
        backend = self._backend()(lowered, compile=False)
        pairs = sum(n * w for n, w in zip(backend.executed_pairs,
                                          _heads_per_pattern(lowered, call)))
        bq, bk = backend.layout.block
        return [Op("launch", 1, kernel="sdpa"),
                Op("attend", max(pairs // (bq * bk), 1), (bq, bk, call.head_dim), "fused"),
                *_restride(self.name, math.prod(lowered.grid.shape), call)]


class DenseExecutor(Executor):
    """One term as a batch of dense problems (:class:`patterngen.plan.DenseShape`); runs a
    pattern whole by putting every term that has a dense form there."""

    name = "dense"
    backend = "auto"
    whole = False

    def can_run(self, lowered, call):
        gather, _ = gather_first(lowered.patterns[0], lowered.grid.shape)
        if gather:
            return f"no dense form for {gather[0]!r}"
        return None

    def work(self, shape: DenseShape, call, tokens: int = 0, alone: bool = False,
             masked: bool = False) -> list:
        return dense_work(shape, tokens, call, alone, masked)

    def compile(self, lowered, call, **options):
        return self._backend()(lowered, strategy="terms", terms="dense", **options)

    def prepare(self, lowered, call, softcap=None, earlier=(), reach=None, dense=None):
        """:class:`.planned.DenseTerm` of ``lowered``'s one term, the pairs of the
        ``earlier`` terms masked out, a bias table indexed by ``reach`` (default the term's
        own); ``dense``: its :class:`~patterngen.plan.DenseShape` when the caller has it.

        Raises:
            PatternError: for more than one term, or a term without a dense form.
        """
        from patterngen.bias import reach as reach_of
        from patterngen.plan import dense_form

        from .planned import DenseTerm, covered

        if len(lowered.terms) != 1:
            raise PatternError(f"dense: {lowered.label} has {len(lowered.terms)} terms; "
                               f"expected one (each term is its own dense part).")
        term, grid = lowered.terms[0], lowered.grid
        shape = dense if dense is not None else dense_form(term, grid.shape, earlier)
        if isinstance(shape, str):
            raise PatternError(f"dense: {term!r} has no dense form ({shape}).")
        adds = (covered(grid, [*earlier, term], lowered.key_grid)
                > covered(grid, list(earlier), lowered.key_grid))
        return DenseTerm(term, shape, list(earlier), grid.shape, adds, softcap,
                         reach if reach is not None else reach_of(lowered))


class GatherExecutor(Executor):
    """The gather terms of a pattern as one group, by the numba kernels, which return the
    log-sum-exp and take the merged one back."""

    name = "gather"
    backend = "numba"
    whole = False
    margin = NUMBA_MARGIN

    def work(self, lowered, call):
        return numba_work(lowered, call, "kernel") + _restride(
            self.name, math.prod(lowered.grid.shape), call)

    def compile(self, lowered, call, **options):
        from . import get_backend

        return get_backend("auto")(lowered, strategy="terms", terms="gather", **options)

    def prepare(self, lowered, call, softcap=None, **part):
        return _numba_part(lowered, softcap)


class ExtraKeysExecutor(Executor):
    """Keys outside the grid: every query against them, one dense problem per (batch, kv
    head), merged like a term."""

    name = "extra"
    backend = "auto"
    whole = False

    def can_run(self, lowered, call):
        return None if call.extra_keys else "no extra keys in this call"

    def work(self, lowered, call):
        tokens = math.prod(lowered.grid.shape) * call.heads // call.kv_heads
        return [Op("launch", 1, kernel="kernel"),
                Op("attend", call.batch * call.kv_heads, (tokens, call.extra_keys,
                                                          call.head_dim),
                   attend_kernel(call, call.extra_keys))]

    def compile(self, lowered, call, **options):
        return self._backend()(lowered, strategy="terms", **options)

    def prepare(self, lowered, call, softcap=None, **part):
        """Every query against the keys and values passed as ``k`` and ``v`` (the extra
        ones), whatever ``lowered`` is; takes no bias table (they have no grid offset)."""
        from .planned import ExtraKeys

        return _ExtraPart(ExtraKeys(softcap))


class _ExtraPart(Part):
    """:class:`.planned.ExtraKeys` on the protocol's signature."""

    def __init__(self, keys):
        self.keys = keys

    def forward(self, q, k, v, scale, need_lse=True, table=None):
        return self.keys.forward(q, k, v, scale)

    def backward(self, q, k, v, out, lse, dout, scale, table=None):
        return (*self.keys.backward(q, k, v, out, lse, dout, scale), None)


class LocalExecutor(Executor):
    """A distributed rank's local problem (:class:`patterngen.distributed.local.LocalProblem`):
    the K/V halo it exchanges and its queries over its local keys, run on its local backend
    (``auto``: the planner, among its strategies; ``sdpa``; ``numba``) as that executor's
    part. Not a strategy of the planner: ``patterngen.distributed`` asks it."""

    name = "local"
    backend = "auto"
    whole = False
    #: the local backends that read a rank's line tables (flex makes them inside its traced
    #: ``mask_mod``, where inductor fails on them)
    BACKENDS = ("auto", "sdpa", "numba")

    def can_run(self, problem, call):
        if problem.backend not in self.BACKENDS:
            return (f"backend={problem.backend!r}: the local part runs on one of "
                    f"{self.BACKENDS}; flex traces its mask and cannot read a rank's line "
                    f"tables")
        reasons = [f"no {what} on a rank's local problem" for wanted, what in (
            (call.bias, "bias table"), (call.softcap, "softcap"), (call.extra_keys, "extra keys"))
            if wanted]
        if problem.backend != "auto":
            reasons.append(WHOLE[problem.backend].can_run(problem.lowered, call))
        return "; ".join(r for r in reasons if r) or None

    def compile(self, problem, call, **options):
        """The local backend on the local problem (``attn(q, k, v)`` on the local grid)."""
        first = {} if problem.strategies is None else {"strategy": problem.strategies}
        return get_backend(problem.backend)(problem.lowered,
                                            **{**first, **problem.options, **options})

    def _plan(self, problem, call):
        """``auto``'s plan of the local problem for ``call``."""
        from patterngen.plan import plan

        options = problem.options
        allowed = options.get("strategy", problem.strategies)
        return plan(problem.lowered,
                    executors=(allowed,) if isinstance(allowed, str) else allowed,
                    terms=options.get("terms"), rates=options.get("rates"),
                    head_dim=call.head_dim, heads=call.heads, batch=call.batch,
                    device=call.device, dtype=call.dtype, backward=call.backward,
                    kv_heads=call.kv_heads)

    def work(self, problem, call):
        """The halo's K and V rows packed and unpacked (priced as copies; the transfer itself
        is not calibrated), then the local backend's work (``auto``: its plan's executors)."""
        lowered = problem.lowered
        ops = [Op("copy", 2 * problem.exchanged_rows * call.batch * call.kv_heads
                  * call.head_dim * call.itemsize)]
        if problem.backend != "auto":
            return ops + WHOLE[problem.backend].work(lowered, call)
        chosen = self._plan(problem, call)
        if chosen.strategy != "terms":
            return ops + WHOLE[chosen.strategy].work(lowered, call)
        tokens = math.prod(lowered.grid.shape)
        for tps in chosen.patterns:
            gather = tuple(tp.term for tp in tps if tp.executor == "gather")
            if gather:
                ops += PARTS["gather"].work(ir.IR(lowered.grid, gather), call)
            ops += [op for i, tp in enumerate(tps) if tp.executor == "dense"
                    for op in dense_work(tp.dense, tokens, call, masked=has_mask(
                        tp.dense, tp.term, [u.term for u in tps[:i]]))]
        return ops

    def prepare(self, problem, call, softcap=None, **part):
        """The local backend's part for ``call`` (``auto``: planned for it; a term-wise plan
        is one part, :class:`.planned.TermsPart`); its ``plan`` attribute is the plan."""
        from .planned import TermsPart

        if problem.backend != "auto":
            return WHOLE[problem.backend].prepare(problem.lowered, call, softcap,
                                                  **problem.options)
        chosen = self._plan(problem, call)
        if chosen.strategy == "terms":
            prepared = TermsPart(problem.lowered, chosen, softcap)
        else:
            prepared = WHOLE[chosen.strategy].prepare(problem.lowered, call, softcap)
        prepared.plan = chosen
        return prepared


#: the whole-pattern executors (strategies beside ``terms``) and the parts, by name
WHOLE = {e.name: e for e in (NumbaExecutor(), SdpaExecutor(), FlexExecutor())}
PARTS = {e.name: e for e in (DenseExecutor(), GatherExecutor(), ExtraKeysExecutor(),
                             LocalExecutor())}
