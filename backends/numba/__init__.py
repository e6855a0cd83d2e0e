"""Numba CPU backend: attention kernels generated as Python source from the IR, then compiled.

The stages, one module each:

- :mod:`.tiling`: lanes (tiles of queries that share keys), work items, the order of terms;
- :mod:`.source`: IR -> the text of one module (pure and deterministic), only what is
  specific to the pattern: loops over each term's key progression, bounds, skip tests;
- :mod:`.runtime`: the helpers every kernel calls (scores, online softmax, backward chunk),
  real numba functions compiled once per dtype and head_dim and cached;
- :mod:`.module`: text -> a module in the disk cache -> ``cfunc`` kernels compiled on first use;
- :mod:`.launch`: the packed-argument protocol between a kernel and its launcher, torch's
  OpenMP team or a thread pool;
- :mod:`.autograd`: the kernels as ``torch.library`` operators with an autograd formula
  (``torch.compile`` and ``torch.export`` see one operator).

Forward is an online softmax over chunks of keys that saves the log-sum-exp; backward
recomputes the probabilities from it (FlashAttention-2: ``D = rowsum(dO * O)``,
``dS = P * (dP - D)``). No tokens x tokens buffer is ever built. A relative position bias
table and a softcap are variants of the generated module (their own kernels; the plain ones
are unchanged): each buffered key carries its flat table position, and the backward sums
``dS`` into one table copy per thread.

Example:
    >>> import torch, patterngen as pg
    >>> attn = pg.compile(pg.window(3), grid=(8,), backend="numba")
    >>> q = k = v = torch.randn(1, 2, 8, 4)
    >>> attn(q, k, v).shape
    torch.Size([1, 2, 8, 4])
"""

from __future__ import annotations

import functools
import math

from patterngen import bias, ir
from patterngen.backends import Backend, ops, register_backend
from patterngen.errors import PatternError

from . import launch, tiling
from .autograd import WIDENED, numba_fwd
from .module import cache_dir, kernel, load
from .tiling import executed, lane_pairs, plan_lanes
from .source import DTYPES, SPECIALISED_HEAD_DIM, bounds_table, generate, kernels

__all__ = ["NumbaBackend", "generate", "load", "cache_dir", "plan_lanes", "lane_pairs", "executed",
           "SPECIALISED_HEAD_DIM"]


class NumbaBackend(Backend):
    """Generated Numba CPU kernels, forward and backward, for any IR.

    Call with ``(batch, heads, *grid, head_dim)`` or ``(batch, heads, tokens, head_dim)``
    CPU tensors: float32 or float64, or bfloat16 and float16, which run in float32 and come
    back in their own dtype. Non-contiguous inputs are copied to contiguous ones first. Grid
    extents and each query's key bounds are kernel arguments: the same pattern on another
    grid, or another pattern of the same shape (grid rank, terms and their steps: a window,
    a block or an axis alike), reuses the compiled kernels.

    Args:
        ir: the lowered pattern (numeric grid).
        scale: default score scale; ``None`` means ``head_dim ** -0.5``.
        lanes: queries per tile along the last axis (0: one query at a time); ``None`` lets
            :func:`plan_lanes` pick from the pattern's waste on this grid. With keys on
            another grid (``ir.key_grid``: k and v have its tokens, and each query's keys are
            those of the key coordinate it sits over) a call with a bias table runs one query
            at a time: the tiles' table offsets assume lanes one key apart.
        softcap: ``None``, or ``c > 0``: scores become ``c * tanh(s / c)`` before the bias.

    Attributes:
        source: the generated float32 module for any head_dim (``source_for(dtype, head_dim)``
            for the others: head_dims from ``SPECIALISED_HEAD_DIM`` up get their own kernels),
            after a comment naming this pattern and its terms (the module, shared by every
            pattern of its shape, names neither).
        bounds: the table of each query's key bounds the kernels read
            (:func:`~.source.bounds_table`).
    """

    name = "numba"
    SUPPORTED_DEVICES = ("cpu",)
    SUPPORTED_DTYPES = (*DTYPES, *WIDENED)
    BACKWARD_DEVICES = ("cpu",)
    SUPPORTS_ADDITIONAL_KEYS = True
    SUPPORTS_REL_POS_BIAS = True
    SUPPORTS_SOFTCAP = True
    SUPPORTS_KEY_GRID = True

    def __init__(self, ir_, scale=None, lanes=None, softcap=None):
        self.ir = ir_ = tiling.runs_first(ir_)
        self.shape = ir_.grid.require_numeric("the numba backend")
        #: the key grid's extents, ``None`` when the keys share the queries' grid
        self.key_shape = None if ir_.key_grid is None else ir_.key_grid.require_numeric(
            "the numba backend")
        self.scale = scale
        self.softcap = bias.check_softcap(softcap)
        tiling.check_lanes(lanes, allow_none=True)
        self.lanes, self.shared = plan_lanes(ir_, self.shape, lanes)
        #: rows a tile spans on each axis but the last (:func:`tiling.plan_groups`)
        self.groups = tiling.plan_groups(ir_, self.shape, self.lanes)
        self._head_map = tiling.head_map(ir_) if isinstance(ir_, ir.HeadsIR) else [0]
        #: the kernel of each distinct head pattern: one per distinct shape
        self._kernel_of = kernels(ir_, self.shared if self.lanes else None)[1]
        #: each query's key bounds per kernel, term and axis: what the kernels know of the
        #: pattern beyond its shape (:func:`~.source.bounds_table`)
        self.bounds = bounds_table(ir_, self.shape, self.key_shape)
        #: this compiled pattern's key for the ``patterngen::numba_*`` operators (set here,
        #: not on first call: a traced call must only read it)
        self.op_key = ops.register(self, self.lanes, self.shared)

    @functools.cached_property
    def _with_extra_keys(self):
        """The pattern as one gather group of these kernels, merged with extra keys: the
        ``auto`` backend, found through the registry (it runs these kernels itself)."""
        from patterngen.backends import get_backend

        return get_backend("auto")(self.ir, strategy="terms", terms="gather", scale=self.scale,
                                   softcap=self.softcap)

    @property
    def source(self) -> str:
        terms = [f"#   pattern {k}, term {t}: {term!r}"
                 for k, head in enumerate(tiling.distinct_heads(self.ir))
                 for t, term in enumerate(head.terms)]
        return "\n".join([f"# {self.ir.label or '?'} runs this module, its table `bounds` "
                          f"evaluated from", *terms, self.source_for("float32")])

    @property
    def executed_pairs(self) -> tuple[int, ...]:
        """Pairs computed per listed pattern: exactly the attended ones (unions deduplicated)
        one query at a time; with lanes, each tile's union (:func:`tiling.executed`)."""
        return tiling.executed(self.ir, self.shape, self.lanes, self.shared)[0]

    @property
    def executed_rows(self) -> tuple[int, ...]:
        """Key rows visited per listed pattern (:func:`tiling.executed`)."""
        return tiling.executed(self.ir, self.shape, self.lanes, self.shared)[1]

    def source_for(self, dtype: str, head_dim: int = 0, rel_bias: bool = False,
                   softcap: bool = False) -> str:
        """The module text that runs ``dtype`` (``"float32"`` or ``"float64"``) arrays of
        ``head_dim``: compiled for that head_dim from ``SPECIALISED_HEAD_DIM`` up, else for any
        (``head_dim=0``); with ``rel_bias`` and ``softcap``, the kernels that add them."""
        head_dim = head_dim if head_dim >= SPECIALISED_HEAD_DIM else 0
        return _generate_cached(self.ir, dtype, self.lanes, self.shared, head_dim, rel_bias,
                                softcap, self.key_shape is not None,
                                () if rel_bias else self.groups)

    def __repr__(self):
        return f"NumbaBackend({self.ir.label} on grid {self.ir.grid}, lanes={self.lanes})"

    def __call__(self, q, k, v, scale=None, rel_bias=None, additional_keys=None,
                 additional_values=None):
        """Attention of ``q`` over ``k, v`` under the compiled pattern.

        Args:
            q, k, v: ``(batch, heads, *grid, head_dim)`` or ``(batch, heads, tokens,
                head_dim)`` CPU tensors of one dtype: float32, float64, bfloat16 or float16.
            scale: score scale; default the constructor's, else ``head_dim ** -0.5``.
            rel_bias: ``None`` or a table ``(heads or 1, 2 * reach[0] + 1, ...)`` of q's dtype
                added to the score of each pair by its key-minus-query offset
                (:mod:`patterngen.bias`); its gradient flows.
            additional_keys, additional_values: ``(batch, heads, n_extra, head_dim)`` tokens
                every query attends besides its pattern, in the same softmax: the kernels'
                ``(out, lse)`` merged with them by log-sum-exp (``backend="auto"``'s
                machinery, its pattern run by these kernels).

        Raises:
            PatternError: for a wrong type, shape, grid, device or dtype, naming the values;
                for additional keys with a bias table (they have no grid offset in it).
        """
        if additional_keys is not None or additional_values is not None:
            # checked here too, so that bad extra keys (or extra keys with a bias table) are
            # named as numba's, not auto's
            qf, kf = self.flatten_inputs(q, k, v)[:2]
            self.check_extra_keys(additional_keys, additional_values, qf, rel_bias, kf.shape[1])
            return self._with_extra_keys(q, k, v, scale=scale, additional_keys=additional_keys,
                                         additional_values=additional_values)
        qf, kf, vf, restore = self.flatten_inputs(q, k, v)
        table = self.check_rel_bias(rel_bias, qf)
        if qf.shape[-1] < 1 or qf.shape[0] * qf.shape[1] == 0:
            raise PatternError(f"numba: q has shape {tuple(q.shape)}; expected batch, heads "
                               f"and head_dim of at least 1.")
        scale = scale if scale is not None else self.scale
        scale = float(qf.shape[-1] ** -0.5 if scale is None else scale)
        qf, kf, vf = (t.contiguous() for t in (qf, kf, vf))
        return restore(numba_fwd(qf, kf, vf, self.op_key, scale, table, self.softcap)[0])

    def _kernels(self, dtype: str, head_dim: int, direction: str, groups, table,
                 softcap) -> dict:
        """The compiled ``direction`` kernel of each pattern in ``groups``, the variant that
        adds a ``table`` and a ``softcap`` when they are given."""
        module = load(self.source_for(dtype, head_dim, table is not None, softcap is not None))
        return {i: kernel(module, f"{direction}_{i}") for i, _, _ in groups}

    def _score_args(self, q, scale, softcap, table, shape):
        """The kernels' arguments from the scale to the heads' table: the scale (and cap) in
        q's dtype, the grid's extents (and the table's reach), each tail after ``heads``."""
        real = q.dtype.type
        caps = () if softcap is None else (real(softcap),)
        reach = () if table is None else tuple((n - 1) // 2 for n in table.shape[1:])
        tables = () if table is None else (table.reshape(table.shape[0], -1),)
        return (real(scale), *caps, *shape, *(self.key_shape or ()), *reach), tables

    def _poisoned_lanes(self, v) -> bool:
        """Whether tile lanes would spread a non-finite value: lanes that share a term's keys
        multiply every key's value row by each lane's probability, 0 for a lane that does not
        attend the key, and ``0 * nan`` is NaN. One pass over ``v``, only with shared terms."""
        import numpy as np

        return bool(self.shared and any(map(any, self.shared)) and not np.isfinite(v).all())

    def _lanes_off_table(self, table) -> bool:
        """Whether tiles would misread a bias table: a tile's lanes read it one offset apart,
        which holds for self-attention only (with a key grid, ``key - c(query)`` is not)."""
        return bool(self.lanes and self.key_shape is not None and table is not None)

    @functools.cached_property
    def _one_query(self):
        """The same pattern one query at a time (for values that are not all finite)."""
        return NumbaBackend(self.ir, scale=self.scale, lanes=0, softcap=self.softcap)

    def _head_groups(self, heads: int):
        """``(kernel index, int64 array of heads, int64 array of their rows of the bounds
        table)`` for every kernel some head uses."""
        import numpy as np

        row = np.array([self._head_map[ir.pattern_of_head(h, len(self._head_map))]
                        for h in range(heads)], dtype=np.int64)
        owner = np.array(self._kernel_of, dtype=np.int64)[row]
        return [(int(i), np.flatnonzero(owner == i), row[owner == i]) for i in np.unique(owner)]

    def forward_numpy(self, q, k, v, shape, scale, table=None, softcap=None):
        """``(out, lse)`` for C-contiguous ``(batch, heads, tokens, head_dim)`` float32 or
        float64 arrays (``k``, ``v``: ``heads / group`` key/value heads, query head ``h``
        reading head ``h // group``): ``lse`` is the natural log-sum-exp of each query's
        scores, ``-inf`` for a query without keys (whose output is 0), NaN for a NaN output
        row.

        ``table``: ``None`` or a C-contiguous bias table of q's dtype, ``(heads or 1,
        2 * R[0] + 1, ...)`` for any ``R`` at least :attr:`reach` on every axis: a larger one
        (a whole pattern's, run here in part) is read around its centre. ``softcap``: ``None``
        or a float > 0. Both are checked by the caller (:meth:`check_rel_bias`,
        :func:`patterngen.bias.check_softcap`).
        """
        import numpy as np

        if self._poisoned_lanes(v) or self._lanes_off_table(table):
            return self._one_query.forward_numpy(q, k, v, shape, scale, table, softcap)
        groups = self._head_groups(q.shape[1])
        kernels = self._kernels(q.dtype.name, q.shape[3], "forward", groups, table, softcap)
        out = np.empty_like(q)
        lse = np.empty(q.shape[:3], dtype=q.dtype)
        scalars, tables = self._score_args(q, scale, softcap, table, shape)
        tiles = tiling.work_items(shape, self.lanes, self.groups)
        for i, group, rows in groups:
            launch.run(kernels[i], q.shape[0] * len(group) * tiles,
                       (q, k, v, *scalars, group, rows, self.bounds, *tables, out, lse))
        return out, lse

    def backward_numpy(self, q, k, v, out, dout, lse, shape, scale, table=None, softcap=None):
        """``(dq, dk, dv)`` from :meth:`forward_numpy`'s ``out`` and ``lse`` (or, for a
        pattern split into terms, the merged ones: each term's share of the gradient);
        dk and dv are summed over query splits when heads are few, and over the query heads
        of each key/value head when ``k`` has fewer heads than ``q``. With a ``table`` (as in
        :meth:`forward_numpy`), ``(dq, dk, dv, dtable)``: ``dtable`` of the table's shape,
        summed over batch (and over heads for a table of one row)."""
        import numba
        import numpy as np

        if self._poisoned_lanes(v) or self._lanes_off_table(table):
            return self._one_query.backward_numpy(q, k, v, out, dout, lse, shape, scale, table,
                                                  softcap)
        groups = self._head_groups(q.shape[1])
        kernels = self._kernels(q.dtype.name, q.shape[3], "backward", groups, table, softcap)
        batch, heads = q.shape[:2]
        # dk/dv are scattered from every query: each split owns a copy, so that (batch, head)
        # pairs fewer than the threads still keep every thread busy without atomics
        splits = max(1, -(-2 * numba.get_num_threads() // (batch * heads)))
        splits = min(splits, tiling.work_items(shape, self.lanes, self.groups) if self.lanes
                     else q.shape[2])
        # dq, dk, dv in one block (dk, dv per query head, of the key grid's tokens): numpy
        # advises huge pages from 4 MiB on, and the gradients are fresh memory in every
        # training step (glibc hands freed memory back to the OS), whose page faults, taken by
        # the kernel's threads at once, cost a 7x7 neighbourhood's step on 64x64 a quarter of
        # its time (docs/backends-numba.md)
        kv_shape = (*q.shape[:2], k.shape[2], q.shape[3])
        block = np.empty(q.size + 2 * math.prod(kv_shape), dtype=q.dtype)
        grads = [block[:q.size].reshape(q.shape),
                 *block[q.size:].reshape(2, *kv_shape)]
        dq = grads[0]
        if splits == 1:
            dk, dv = grads[1][None], grads[2][None]
            dk[:] = dv[:] = 0
        else:
            dk = np.zeros((splits, *kv_shape), dtype=q.dtype)
            dv = np.zeros((splits, *kv_shape), dtype=q.dtype)
        scalars, tables = self._score_args(q, scale, softcap, table, shape)
        # the table's gradient: a copy per call of the kernel (one per thread), each call
        # taking its own from a counter, summed after the launch: no race, no atomics
        dtable = () if table is None else np.zeros((launch.threads(), *tables[0].shape),
                                                   dtype=q.dtype)
        for i, group, rows in groups:
            slot = () if table is None else (dtable, np.zeros(1, dtype=np.int64))
            launch.run(kernels[i], batch * len(group) * splits,
                       (q, k, v, out, dout, lse, *scalars, group, rows, self.bounds, *tables, dq,
                        dk, dv, *slot))
        if splits > 1:
            dk.sum(axis=0, out=grads[1])
            dv.sum(axis=0, out=grads[2])
        grads = tuple(grads)
        if k.shape[1] != heads:  # dk, dv per query head, summed over each kv head's group
            group = (batch, k.shape[1], heads // k.shape[1], *kv_shape[2:])
            grads = (dq, *(g.reshape(group).sum(axis=2) for g in grads[1:]))
        if table is None:
            return grads
        return (*grads, dtable.sum(axis=0).reshape(table.shape))


@functools.lru_cache(maxsize=256)
def _generate_cached(node, dtype: str, lanes: int, shared, head_dim: int, rel_bias: bool,
                     softcap: bool, cross: bool = False, groups=()) -> str:
    return generate(node, dtype, lanes, shared, head_dim, rel_bias, softcap, cross, groups)


register_backend("numba", NumbaBackend)
# a loaded exported program's op key compiles its pattern again (``ops.lookup``)
ops.register_rebuild("numba", lambda lowered, options: NumbaBackend(lowered, lanes=options[0]))
