"""Executors: every way patterngen runs attention, behind one protocol the planner asks.

An executor answers, for a lowered pattern (or the part of it it would run) and a frozen
:class:`patterngen.call.Call`:

- :meth:`Executor.can_run`: ``None``, or why not, in words;
- :meth:`Executor.work`: the exact work it would launch, as :class:`patterngen.call.Op` s
  (dense problems and their shapes on their kernel, numba pairs with the lane plan, copies in
  bytes, launches), which :meth:`patterngen.calibrate.Rates.price` turns into milliseconds;
- :meth:`Executor.compile`: an ``attn(q, k, v, ...)`` that runs the pattern on it (the
  conformance test runs every executor through this).

*Whole* executors (``numba``, ``sdpa``, ``flex``) run a pattern alone: each is one strategy of
:func:`patterngen.plan.plan`. *Parts* (``dense``: one term as a batch of dense problems;
``gather``: the window terms, by the numba kernels; ``extra``: keys outside the grid) are
merged by log-sum-exp in the term-wise strategy (``terms``, :mod:`.planned`), whose
``forward -> (out, lse)`` and ``backward`` from the merged ``out``/``lse`` they implement
there. :data:`TOLERANCES` are what each executor is held to against the dense oracle, by dtype.
"""

from __future__ import annotations

import math

from patterngen import ir
from patterngen.call import Call, Op
from patterngen.plan import COPYING, DenseShape, gather_first

__all__ = ["Executor", "TOLERANCES", "WHOLE", "PARTS", "numba_work", "dense_work"]

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

    def __repr__(self):
        return f"<executor {self.name}>"


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
    and the keys their forward buffers one at a time (:mod:`.numba.counts`), and one call of
    the ``launch`` path."""
    from .numba import executed, plan_lanes
    from .numba.counts import kernel_counts
    from .numba.tiling import runs_first

    lowered = runs_first(lowered)  # the kernels' order of terms, as the backend runs them
    shape = lowered.grid.shape
    lanes, shared = plan_lanes(lowered, shape)
    work = _heads_per_pattern(lowered, call)
    pairs = sum(n * w for n, w in zip(executed(lowered, shape, lanes, shared)[0], work))
    counts = kernel_counts(lowered, shape, lanes, shared)
    kind, d = "tiles" if lanes else "one", (call.head_dim,)
    return [Op("launch", 1, kernel=launch), Op("numba", pairs, d, kind),
            *(Op(what, sum(getattr(c, what) * w for c, w in zip(counts, work)), d, kind)
              for what in ("queries", "rows", "loose"))]


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


def dense_work(shape: DenseShape, tokens: int, call: Call, alone: bool = False) -> list:
    """A term as ``shape``'s problems for every (batch, kv head), the query heads of a kv head
    folded into rows; the views of q, k, v and the output's inverse view copy unless they
    are pure views. ``alone``: the term is the whole plan and gives every query a key, so it
    runs through torch's autograd where it takes the matmul path (:func:`alone_kernel`)."""
    group = call.heads // call.kv_heads
    rows = shape.queries * group
    kernel = (alone_kernel if alone else attend_kernel)(call, shape.keys)
    ops = [Op("launch", 1, kernel="kernel"),
           Op("attend", shape.batch * call.batch * call.kv_heads,
              (rows, shape.keys, call.head_dim), kernel)]
    if shape.copied:
        per = call.batch * call.kv_heads * call.head_dim * call.itemsize
        elements = shape.batch * (rows + 2 * shape.keys) + tokens * group
        ops.append(Op("copy", elements * per))
        if call.backward and not (alone and kernel == "kept"):
            # the merge's backward views q, k and v again (autograd keeps the forward's)
            ops.append(Op("recopy", shape.batch * (rows + 2 * shape.keys) * per))
    return ops + _restride("dense", tokens, call)


#: the numba kernels' margin: their measured / predicted spread far wider than the torch
#: kernels' (bench_plan.py: 0.44-2.17 against 0.49-1.30 for sdpa), and aligned 7x7 blocks,
#: predicted 2% from a dense batch, measured 1.4-2.7x slower than it
NUMBA_MARGIN = 1.1


class NumbaExecutor(Executor):
    name = backend = "numba"
    margin = NUMBA_MARGIN

    def work(self, lowered, call):
        return numba_work(lowered, call, "numba") + _restride(
            self.name, math.prod(lowered.grid.shape), call)


class SdpaExecutor(Executor):
    """Block-sparse: each group of query blocks with the same number of key blocks is one
    batch of dense problems (``Bq`` rows against ``nk * Bk`` keys) on its kernel; its queries
    and key blocks are views where they are runs or bands and index gathers elsewhere (a band
    of several blocks is copied once, and its backward is ``unfold_backward``), its output
    copied into place, and in the backward every view's gradient is a zero-filled whole
    tensor, added up over the groups; a layout with partial
    blocks scans k and v for non-finite values once, and a token order other than row-major
    copies q, k, v into it and the output back."""

    name = backend = "sdpa"

    def work(self, lowered, call):
        import numpy as np
        import torch

        from .sdpa.calls import DeviceCalls

        backend = self._backend()(lowered)
        ops = [Op("launch", 1, kernel="sdpa")]
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
                # the matmul path for small mask-free groups without autograd, and with a
                # softcap; the fused kernel otherwise, a bias table added as its mask
                plain = c.matmul and not call.backward and not call.bias
                ops += [Op("launch", 1, kernel="kernel"),
                        Op("attend", c.count * work, (calls.bq, keys, d),
                           "matmul" if plain or call.softcap else "fused")]
                if call.bias:  # the table gathered into the group's tiles
                    ops.append(Op("gather", c.count * work * calls.bq * keys * call.itemsize))
                if c.q_slice is None:
                    ops.append(Op("gather", rows * work * per))
                if c.k_band is None:
                    ops.append(Op("gather", 2 * c.count * keys * kv * per))
                elif c.nk > 1 and call.backward:  # a view; its backward is unfold_backward
                    ops.append(Op("band", 2 * c.count * keys * kv * per))
                if len(calls.calls) > 1 or calls.zero_row is not None:
                    ops.append(Op("copy", rows * work * per))
                if call.backward:
                    # each view's backward fills a gradient of the whole q, k or v with zeros,
                    # and the groups' gradients are added up
                    ops.append(Op("fill", 2 * (tokens * work + 2 * key_tokens * kv) * per))
            if any(c.mask is not None for c in calls.calls):
                ops.append(Op("scan", 2 * key_tokens * kv * d))
            if not all((order == np.arange(len(order))).all()
                       for order in (blocks["permutation"], layout.key_permutation)):
                # q, k, v into the layout's token order, the output back
                ops.append(Op("copy", 2 * (tokens * work + key_tokens * kv) * per))
        return ops


class FlexExecutor(Executor):
    """FlexAttention, priced as the block-sparse batch of its 128-blocks. Planned on CUDA
    only: on CPU it compiles for seconds and has no backward (it runs there when named; eager
    here, which materialises every score)."""

    name = backend = "flex"
    planned_devices = ("cuda",)

    def compile(self, lowered, call, **options):
        return self._backend()(lowered, compile=call.device != "cpu", **options)

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

    def work(self, shape: DenseShape, call, tokens: int = 0, alone: bool = False) -> list:
        return dense_work(shape, tokens, call, alone)

    def compile(self, lowered, call, **options):
        return self._backend()(lowered, strategy="terms", terms="dense", **options)


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


#: the whole-pattern executors (strategies beside ``terms``) and the parts, by name
WHOLE = {e.name: e for e in (NumbaExecutor(), SdpaExecutor(), FlexExecutor())}
PARTS = {e.name: e for e in (DenseExecutor(), GatherExecutor(), ExtraKeysExecutor())}
