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

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from patterngen import ir
from patterngen.backends import Backend, get_backend, register_backend
from patterngen.backends import dense, ops
from patterngen.backends.dense import Holes, ScoreMod
from patterngen.backends.inputs import flatten_qkv, kv_heads_of, non_finite, take_heads
from patterngen.backends.merge import acc_dtype, merge
from patterngen.bias import check_softcap
from patterngen.errors import PatternError
from patterngen.plan import TermPlan, dense_form, dense_mask, plan

__all__ = ["PlannedBackend", "DenseTerm", "GatherGroup", "ExtraKeys", "TermsPart", "TokenOrder",
           "covered"]

#: largest share of excluded entries for which the matmul path fills them in after the GEMM
#: instead of adding a dense mask (CCNet's diagonal: 1/64 of a 64 x 64 problem)
HOLES = 1 / 16

#: call signatures :class:`PlannedBackend` keeps checked (cleared when full: a model calls
#: with a few kinds of input)
CHECKED_CALLS = 64


class _ViewRecipe(NamedTuple):
    """How a :class:`DenseTerm` views ``(B, H, N, d)`` as its problems, for one side."""

    #: ``(dim, start, length, pad)``: a narrow to the term's query or key range (``pad``
    #: ``None``), or the padding ``(left, right)`` that makes tiles whole
    cuts: list
    #: the grid's axes split into (tiles, positions, residue) or kept whole
    split: tuple
    #: the permutation that puts batch dimensions before problem dimensions
    order: tuple
    #: rows of one problem (its queries or keys)
    rows: int
    #: the permutation back, and the split sizes in the permuted order
    inverse: tuple
    ordered: tuple
    #: the padded sizes of the grid's axes
    whole: tuple


class DenseTerm:
    """One term as a batch of dense problems (see :class:`patterngen.plan.DenseShape`).

    Args:
        term: the IR term.
        shape: its :class:`~patterngen.plan.DenseShape`.
        earlier: the terms executed before it (their pairs are masked out here).
        grid: the numeric grid.
        adds_keys: booleans over the grid's tokens (row-major): queries this term adds
            keys to.
        softcap: scores become ``softcap * tanh(s / softcap)`` (``None``: off).
        reach: the pattern's reach, which indexes a relative position bias table.
    """

    def __init__(self, term, shape, earlier, grid, adds_keys, softcap=None, reach=None):
        self.term, self.shape, self.grid = term, shape, tuple(int(n) for n in grid)
        self.softcap, self.reach = softcap, reach
        self.mask = dense_mask(shape, term, earlier)
        self.adds_keys = adds_keys
        self.problems, self.keys = shape.batch, shape.keys
        #: a key for every query and no softcap: :meth:`autograd_forward` may run it
        self.plain = bool(adds_keys.all()) and softcap is None
        #: an axis rolled as Swin rolls (:attr:`patterngen.plan.DenseAxis.roll`): the views
        #: are one gather each (:meth:`_gather`)
        self.rolled = any(ax.roll for ax in shape.axes)
        self._cache = {}

    def _recipe(self, side: str) -> "_ViewRecipe":
        """How :meth:`_view` and :meth:`_unview` reshape for ``side`` ``"q"`` or ``"k"``,
        worked out once."""
        key = ("recipe", side)
        if key not in self._cache:
            ranged = "queries" if side == "q" else "keys"
            cuts, split, batch_dims, prob_dims, whole = [], [], [], [], []
            for a, ax in enumerate(self.shape.axes):
                here = len(split) + 2
                if ax.kind == ranged:
                    cuts.append((2 + a, ax.lo, ax.hi - ax.lo, None))
                if ax.kind == "tiles":
                    if ax.pad_left or ax.pad_right:
                        cuts.append((2 + a, ax.pad_left, ax.n, (ax.pad_left, ax.pad_right)))
                    # (tiles, positions, residue): the residue is a batch dim beside the
                    # tile (a strided view; size 1 for Swin's contiguous tiles)
                    split += [ax.tiles, ax.size, ax.dilation]
                    batch_dims += [here, here + 2]
                    prob_dims.append(here + 1)
                    whole.append(ax.batch * ax.size)
                    continue
                size = ax.n if ax.kind == "batch" else (ax.queries if side == "q" else ax.keys)
                split.append(size)
                whole.append(size)
                (batch_dims if ax.kind == "batch" else prob_dims).append(here)
            # dimensions of size 1 (one tile, residue 1) dropped: a permute of fewer
            # dimensions copies faster (measured: 1 us of 5 on a 14x14 grid's views)
            kept = [i + 2 for i, n in enumerate(split) if n != 1]
            split = [split[i - 2] for i in kept]
            order = (0, 1, *(kept.index(i) + 2 for i in batch_dims + prob_dims if i in kept),
                     len(split) + 2)
            rows = self.shape.queries if side == "q" else self.shape.keys
            inverse = tuple(int(i) for i in np.argsort(order))
            ordered = tuple(split[i - 2] for i in order[2:-1])
            self._cache[key] = _ViewRecipe(cuts, tuple(split), order, rows, inverse, ordered,
                                           tuple(whole))
        return self._cache[key]

    def _gather(self, side: str, device):
        """For a shape with a rolled axis, one gather in place of roll, pad and permute:
        ``(index, padded, inverse, missing)``, ``index`` the token of each view position
        (``N``, a zero row appended when ``padded``, for padding) and ``inverse`` the view
        position of each token (one past the last, a ``fill`` row, when ``missing``)."""
        key = ("gather", side, str(device))
        if key not in self._cache:
            import torch

            index = np.zeros((1, 1), dtype=np.int64)
            for ax, n in zip(self.shape.axes, self.grid):
                c = ax.coords(side)
                b, r = index.shape
                index = np.where((index[:, None, :, None] < 0) | (c[None, :, None, :] < 0), -1,
                                 index[:, None, :, None] * n + c[None, :, None, :]
                                 ).reshape(b * c.shape[0], r * c.shape[1])
            index = index.reshape(-1)
            tokens = math.prod(self.grid)
            inverse = np.full(tokens, index.size, dtype=np.int64)
            inverse[index[index >= 0]] = np.flatnonzero(index >= 0)
            padded, missing = bool((index < 0).any()), bool((inverse == index.size).any())
            index = np.where(index < 0, tokens, index)
            self._cache[key] = (torch.as_tensor(index, device=device), padded,
                                torch.as_tensor(inverse, device=device), missing)
        return self._cache[key]

    def _gathered(self, x, side: str):
        """:meth:`_view` of a rolled shape: ``(B, H, N, d)`` -> ``(B * H, problems, rows,
        d)`` by one gather (padding reads an appended zero row)."""
        index, padded, _, _ = self._gather(side, x.device)
        if padded:
            x = F.pad(x, (0, 0, 0, 1))
        b, h, _, d = x.shape
        return x.index_select(2, index).view(b * h, self.problems, -1, d)

    def _scattered(self, y, b: int, h: int, fill: float, side: str):
        """:meth:`_unview` of a rolled shape, by the inverse gather (tokens the view lacks
        read an appended ``fill`` row)."""
        _, _, inverse, missing = self._gather(side, y.device)
        y = y.reshape(b, h, -1, y.shape[-1])
        if missing:
            y = F.pad(y, (0, 0, 0, 1), value=fill)
        return y.index_select(2, inverse)

    def _view(self, x, side: str):
        """``(B, H, N, d)`` -> ``(B * H, problems, rows, d)`` in the problems' order."""
        if self.rolled:
            b, h = x.shape[:2]
            return _Moved.apply(x, lambda t: self._gathered(t, side),
                                lambda g: self._scattered(g, b, h, 0.0, side))
        recipe = self._recipe(side)
        cuts, split, order, rows = recipe.cuts, recipe.split, recipe.order, recipe.rows
        b, h, _, d = x.shape
        # the split refines the grid's row-major axes: without cuts, one reshape does both
        t = x.reshape(b, h, *self.grid, d) if cuts else x
        for dim, start, length, pad in cuts:
            if pad is None:
                t = t.narrow(dim, start, length)
            else:
                t = F.pad(t, [0, 0] * (t.dim() - 1 - dim) + list(pad))
        t = t.reshape(b, h, *split, d).permute(order)
        return t.reshape(b * h, self.problems, rows, d)

    def _unview(self, y, b: int, h: int, fill: float, side: str = "q"):
        """Inverse of :meth:`_view`: ``(B * H, problems, rows, e)`` -> ``(B, H, N, e)``.
        Tokens outside the term's query (``side="q"``) or key (``"k"``) range get ``fill``;
        padding is dropped. Every token appears at most once in a view, so for gradients
        (``fill=0``) this is also the view's adjoint."""
        e = y.shape[-1]
        if self.rolled:
            return _Moved.apply(y, lambda t: self._scattered(t, b, h, fill, side),
                                lambda g: self._gathered(g, side))
        recipe = self._recipe(side)
        cuts, inverse, ordered, whole = (recipe.cuts, recipe.inverse, recipe.ordered,
                                         recipe.whole)
        t = y.reshape(b, h, *ordered, e).permute(inverse)
        if not cuts:
            return t.reshape(b, h, math.prod(self.grid), e)
        t = t.reshape(b, h, *whole, e)
        for dim, start, length, pad in cuts:
            if pad is not None:
                t = t.narrow(dim, start, length)
            else:
                n = self.grid[dim - 2]
                t = F.pad(t, [0, 0] * (t.dim() - 1 - dim) + [start, n - start - length],
                          value=fill)
        return t.reshape(b, h, math.prod(self.grid), e)

    def _mask(self, group: int):
        """The mask over folded problems (:func:`_fold`): each problem's rows once per query
        head of a key/value head."""
        return self.mask if group == 1 else np.tile(self.mask, (1, group, 1))

    def _additive_mask(self, dtype, device, group: int = 1):
        if self.mask is None:
            return None
        key = (dtype, str(device), group)
        if key not in self._cache:
            import torch

            m = torch.as_tensor(self._mask(group), device=device)
            # CUDA's memory-efficient kernel wants the bias rows 16-element aligned
            width = m.shape[-1] + (-m.shape[-1] % 16 if torch.device(device).type == "cuda"
                                   else 0)
            bias = torch.zeros(*m.shape[:-1], width, dtype=dtype, device=device)
            bias = bias[..., :m.shape[-1]]
            self._cache[key] = bias.masked_fill_(~m, float("-inf"))[None]
        return self._cache[key]

    def _matmul_mask(self, dtype, device, group: int = 1):
        """The mask for the matmul path: its excluded entries when they are at most
        ``HOLES`` of it, else the additive tensor."""
        if self.mask is None:
            return None
        key = ("holes", str(device), group)
        if key not in self._cache:
            import torch

            excluded = ~self._mask(group)
            holes = None
            if excluded.sum() <= HOLES * excluded.size:
                index = torch.as_tensor(np.flatnonzero(excluded), device=device)
                holes = Holes(index, shared=self.mask.shape[0] == 1)
            self._cache[key] = holes
        return self._cache[key] or self._additive_mask(dtype, device, group)

    def _adds_keys(self, device):
        key = ("adds_keys", str(device))
        if key not in self._cache:
            import torch

            self._cache[key] = torch.as_tensor(self.adds_keys, device=device)
        return self._cache[key]

    def _matmul(self, q, table=None) -> bool:
        """Matmul-softmax-matmul rather than the fused kernel: small float32/float64 problems
        on CPU, and always with a softcap or bias (the fused kernels give no score gradient)."""
        return (table is not None or self.softcap is not None
                or dense.matmul_is_faster(q, self.keys))

    def _offsets(self, device):
        """``(1, rows, keys)`` flat positions in a bias table of each pair (key minus query
        plus reach per axis), the same for every problem: read from the positions before
        padding and the roll's wrap (:meth:`patterngen.plan.DenseAxis.coords`), so that the
        table is gathered once per call and broadcast over problems, batch and heads, and
        its gradient is summed over them before one scatter. Pairs beyond the reach (padding,
        the roll's wrapped pairs) are clipped into the table; the mask removes them."""
        key = ("offsets", str(device))
        if key not in self._cache:
            import torch

            parts = []
            for ax, r in zip(self.shape.axes, self.reach):
                qc, kc = ax.coords("q", unrolled=True), ax.coords("k", unrolled=True)
                part = np.clip(kc[:, None, :] - qc[:, :, None] + r, 0, 2 * r)
                parts.append(part[:1] if (part == part[:1]).all() else part)
            index = parts[0]
            for part, r in zip(parts[1:], self.reach[1:]):
                b, q, k = index.shape
                c, u, w = part.shape
                index = (index[:, None, :, None, :, None] * (2 * r + 1)
                         + part[None, :, None, :, None, :]).reshape(b * c, q * u, k * w)
            self._cache[key] = torch.as_tensor(np.ascontiguousarray(index), device=device)
        return self._cache[key]

    def _mod(self, table, heads: int, group: int = 1):
        """The score modifier of a call: softcap and the table gathered to this term's
        problems (folded by ``group``, see :func:`_fold`), or ``None``."""
        if table is None and self.softcap is None:
            return None
        tile = None
        if table is not None:
            # index_select, not advanced indexing: 40 us against 270 us for Swin-T's last
            # stage (24 heads), about half of that call's time
            index = self._offsets(table.device)
            tile = table.reshape(table.shape[0], -1).index_select(1, index.view(-1)).view(
                table.shape[0], *index.shape)
            tile = tile.repeat(1, 1, group, 1) if tile.shape[0] == 1 else _fold(tile, group)
        return ScoreMod(self.softcap, tile, heads // group)

    def autograd_forward(self, q, k, v, scale, table=None):
        """The output ``(B, H, N, d)`` through torch's autograd, as a model's partitioned
        attention runs it (views, bmm, the bias and mask added, softmax, bmm; its backward
        keeps the probabilities instead of recomputing them from the log-sum-exp: one batched
        matmul and one exp less, and the bias's gradient is the kept score gradient summed),
        or ``None`` where that does not apply. It applies to a term that runs alone on the
        matmul path with a key for every query and no softcap, in eager mode, when its output
        is finite (a row whose scores are all ``-inf`` gives NaN here where the merge gives 0;
        the caller then runs the merge). ``table``: a relative position bias table; without
        gradients, it runs in the fused kernel (:meth:`_fused_with_bias`)."""
        if not self.autograd_applies(q):
            return None
        b, h = q.shape[:2]
        out = self.problems_forward(self._view(q, "q"), self._view(k, "k"), self._view(v, "k"),
                                    h, scale, table)
        return None if out is None else self._unview(out, b, h, 0.0)

    def autograd_applies(self, q) -> bool:
        """Whether :meth:`autograd_forward` may run for queries like ``q``."""
        return self.plain and self._matmul(q) and not torch.compiler.is_compiling()

    def problems_forward(self, qp, kp, vp, heads: int, scale, table=None):
        """The core of :meth:`autograd_forward` on the problems ``(B * H, problems, rows,
        d)`` (``kp, vp`` of the key/value heads): the output in their shape, or ``None``
        where it is not finite."""
        group = qp.shape[0] // kp.shape[0]
        qp = _fold(qp, group)
        bp, p, n, d = qp.shape
        grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (qp, kp, vp, table))
        if table is not None and not grad:
            out = self._fused_with_bias(qp, kp, vp, scale, self._mod(table, heads, group).bias,
                                        self._additive_mask(qp.dtype, qp.device, group))
        else:
            mask = (self._additive_mask(qp.dtype, qp.device, group) if grad
                    else self._matmul_mask(qp.dtype, qp.device, group))
            scores = dense.score_matrix(qp, kp, mask, scale, self._mod(table, heads, group),
                                        autograd=grad).view(bp * p, n, -1)
            out = torch.softmax(scores, dim=-1) @ vp.reshape(bp * p, -1, d)
        # one sum: a NaN or an infinity anywhere makes it non-finite (a sum that merely
        # overflows only sends the call to the merge, which is exact for any input)
        if not math.isfinite(float((out.detach() if grad else out).sum())):
            return None
        return _unfold(out.view(bp, p, n, d), group)

    def ordered_with_bias(self, q, k, v, scale, table):
        """Inference on q, k, v ``(B, H, positions, d)`` in the token order with a bias
        ``table`` and no mask, in the fused kernel on ``(B * problems, H, rows, d)`` views:
        the layout a projection of ordered tokens gives, so q, k, v are read where they are
        (Swin's fused path; 0.7x the time of copying them into ``(B * H, problems, ...)``
        at 28x28, 6 heads, measured), the bias ``(1, H, rows, keys)`` broadcast over
        windows. ``None`` where that does not apply (a mask, grouped key/value heads, a bias
        that differs per problem, a softcap, gradients, CUDA, a non-finite output)."""
        b, h, t, d = q.shape
        if (self.mask is not None or self.softcap is not None or k.shape[1] != h
                or q.device.type != "cpu" or table is None or torch.is_grad_enabled() and any(
                    x.requires_grad for x in (q, k, v, table))):
            return None
        tile = self._mod(table, h).bias
        if tile.shape[1] != 1:
            return None
        qv, kv, vv = (x.unflatten(2, (self.problems, -1)).transpose(1, 2).flatten(0, 1)
                      for x in (q, k, v))
        out = dense.fused_forward(qv, kv, vv, tile.transpose(0, 1).to(q.dtype), scale)[0]
        if not math.isfinite(float(out.sum())):
            return None
        return out.view(b, self.problems, h, -1, d).transpose(1, 2).reshape(b, h, t, d)

    @staticmethod
    def _fused_with_bias(qp, kp, vp, scale, bias, mask):
        """Inference with a bias ``(heads, 1, rows, keys)`` (and a mask ``(1, problems, rows,
        keys)``) in the fused kernel, the bias broadcast over batch (the mask's problems
        over heads) by the kernel: in the call, 0.84-0.93x the matmul path's time on Swin-T's
        stages (its scores never leave the cache), where without a bias the matmul path is
        the faster (:data:`dense.MATMUL_KEYS`)."""
        bp, p, n, d = qp.shape
        heads = bias.shape[0]
        if mask is None:
            add = bias.expand(bp // heads, heads, 1, n, -1).reshape(bp, 1, n, -1)
        else:  # the heads' problems become one axis, so that one tensor holds both
            add = (bias + mask).view(1, heads * p, n, -1)
            qp, kp, vp = (t.view(bp // heads, heads * p, -1, d) for t in (qp, kp, vp))
        return dense.fused_forward(qp, kp, vp, add.to(qp.dtype), scale)[0].reshape(bp, p, n, d)

    def forward(self, q, k, v, scale, need_lse: bool = True, table=None):
        """``(out_t, lse_t)``: ``(B, H, N, d)`` in q's dtype and ``(B, H, N)`` float32 (float64
        for float64), ``lse_t = -inf`` for queries this term adds no key to; ``lse_t`` is
        ``None`` when not ``need_lse`` (a lone part without gradients). ``table``: a relative
        position bias table for these heads."""
        b, h = q.shape[:2]
        group = h // k.shape[1]
        qp = _fold(self._view(q, "q"), group)
        kp, vp = self._view(k, "k"), self._view(v, "k")
        # the fused kernels give a row whose keys all score -inf lse 0, not -inf: with keys
        # that are not finite, the exact path
        if self._matmul(q, table) or non_finite(k, v):
            out, lse = dense.softmax_attention(qp, kp, vp,
                                               self._matmul_mask(q.dtype, q.device, group),
                                               scale, need_lse, self._mod(table, h, group))
            if lse is None:
                return self._unview(_unfold(out, group), b, h, 0.0), None
        else:
            out, lse = dense.fused_forward(qp, kp, vp,
                                           self._additive_mask(q.dtype, q.device, group), scale)
            lse = lse.unsqueeze(-1)
        out = self._unview(_unfold(out, group), b, h, 0.0)
        if not need_lse:
            return out, None
        lse = self._unview(_unfold(lse.to(acc_dtype(q.dtype)), group), b, h,
                           float("-inf")).squeeze(-1)
        if self.adds_keys.all():
            return out, lse
        # queries this term adds no key to: their rows were fully masked (NaN or 0 by kernel)
        none = ~self._adds_keys(q.device)
        return out.masked_fill(none[:, None], 0.0), lse.masked_fill(none, float("-inf"))

    def backward(self, q, k, v, out, lse, dout, scale, table=None):
        """``(dq, dk, dv, dtable)`` of this term's share, from the merged ``out`` and ``lse``
        (``dtable`` ``None`` without a table)."""
        import torch

        b, h = q.shape[:2]
        kv, group = k.shape[1], h // k.shape[1]
        kp, vp = self._view(k, "k"), self._view(v, "k")
        qp, lp, dp = (_fold(self._view(t, "q"), group) for t in (q, lse.unsqueeze(-1), dout))
        dtable = None
        if self._matmul(q, table):
            # rowsum(dout * out) on the grid and viewed, rather than a view of all of out
            delta = _fold(self._view((dout * out).sum(-1, keepdim=True), "q"), group)
            dq, dk, dv, dtile = dense.matmul_backward(
                qp, kp, vp, None, lp, dp, self._matmul_mask(q.dtype, q.device, group), scale,
                self._mod(table, h, group), delta)
            if table is not None:  # each pair's score gradient lands on its table entry
                dtile = (_unfold(dtile, group) if table.shape[0] > 1 else
                         dtile.unflatten(2, (group, -1)).sum(2))
                # accumulated in float32 at least: each entry sums many pairs' gradients
                flat = torch.zeros(table.shape[0], table[0].numel(),
                                   dtype=acc_dtype(dtile.dtype), device=dtile.device)
                flat.index_add_(1, self._offsets(table.device).reshape(-1),
                                dtile.reshape(table.shape[0], -1).to(flat.dtype))
                dtable = flat.view(table.shape).to(table.dtype)
        else:
            op = _fold(self._view(out, "q"), group)
            dq, dk, dv = dense.fused_backward(qp, kp, vp, op, lp.squeeze(-1), dp,
                                              self._additive_mask(q.dtype, q.device, group),
                                              scale)
        return (self._unview(_unfold(dq, group), b, h, 0.0, "q"),
                self._unview(dk, b, kv, 0.0, "k"), self._unview(dv, b, kv, 0.0, "k"), dtable)


class TokenOrder:
    """The order of a pattern's dense problems (one term, :class:`DenseTerm`): problem by
    problem, each problem's rows in order, padding included. A caller that partitions its
    tokens into this order once before the q, k, v projection (:meth:`to_order`, a linear
    layer commutes with it) and calls ``attn(q, k, v, ordered=True)`` runs the attention on
    its inputs as they are, and reverses the order once after the output projection
    (:meth:`from_order`): Swin's ``window_partition`` (with its roll) and
    ``window_reverse``, MaxViT's ``grid_partition``.

    Attributes:
        grid: the grid's sizes.
        positions: length of the order (the grid's tokens, plus padding where tiles do not
            divide an axis).
        padded: whether some positions are padding (zero in :meth:`to_order`, dropped by
            :meth:`from_order`).
        index: ``(positions,)`` int64: the grid token (row-major) at each position, the
            number of tokens for padding.
    """

    def __init__(self, term: DenseTerm):
        self.term, self.grid = term, term.grid
        index, self.padded, _, _ = term._gather("q", "cpu")
        self.index = index.clone()
        self.positions = int(index.numel())

    def __repr__(self):
        return (f"TokenOrder({self.term.shape!r} on grid {self.grid}, {self.positions} "
                f"positions)")

    def to_order(self, x):
        """``(batch, *grid, C)`` or ``(batch, tokens, C)`` -> ``(batch, positions, C)``.

        Raises:
            PatternError: for a tensor of another shape.
        """
        tokens = math.prod(self.grid)
        if not (isinstance(x, torch.Tensor) and x.dim() >= 3 and (
                tuple(x.shape[1:-1]) == self.grid or tuple(x.shape[1:-1]) == (tokens,))):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise PatternError(
                f"to_order: x has shape {got}; the order is of grid {self.grid}, so expected "
                f"(batch, {', '.join(map(str, self.grid))}, C) or (batch, {tokens}, C).")
        b, c = x.shape[0], x.shape[-1]
        return self.in_order(x.reshape(b, 1, tokens, c)).reshape(b, self.positions, c)

    def from_order(self, y):
        """``(batch, positions, C)`` -> ``(batch, *grid, C)`` (padding dropped).

        Raises:
            PatternError: for a tensor of another shape.
        """
        self.check(y, "y", "from_order", "(batch, {positions}, C)")
        b, c = y.shape[0], y.shape[-1]
        return self.on_grid(y.reshape(b, 1, self.positions, c)).reshape(b, *self.grid, c)

    def direct(self, x) -> bool:
        """Whether an ordered call with inputs of ``x``'s device and dtype runs the term on
        them as they are (no padding, and :meth:`DenseTerm.autograd_forward` applies):
        otherwise it puts the tokens back on the grid, and ordering gains nothing."""
        return not self.padded and self.term.autograd_applies(x)

    def check(self, t, name: str, where: str, layout: str) -> None:
        """Raise unless ``t`` is a tensor with :attr:`positions` in its second last
        dimension (``layout`` names the expected shape)."""
        if not (isinstance(t, torch.Tensor) and t.dim() == layout.count(",") + 1
                and t.shape[-2] == self.positions):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise PatternError(
                f"{where}: {name} has shape {got}; the token order has {self.positions} "
                f"positions (attn.token_order.positions), so expected "
                f"{layout.format(positions=self.positions)}.")

    def in_order(self, x):
        """``(B, H, tokens, C)`` -> ``(B, H, positions, C)``, with autograd (the inverse
        gather as its adjoint)."""
        b, h = x.shape[:2]
        term = self.term
        return _Moved.apply(x, lambda t: term._gathered(t, "q").reshape(b, h, -1, t.shape[-1]),
                            lambda g: term._scattered(g, b, h, 0.0, "q"))

    def on_grid(self, y):
        """Inverse of :meth:`in_order`: ``(B, H, positions, C)`` -> ``(B, H, tokens, C)``."""
        b, h = y.shape[:2]
        term = self.term
        return _Moved.apply(y, lambda t: term._scattered(t, b, h, 0.0, "q"),
                            lambda g: term._gathered(g, "q").reshape(b, h, -1, g.shape[-1]))


class _Moved(torch.autograd.Function):
    """``there(x)``, a gather that moves each token to at most one place, whose adjoint is
    the inverse gather ``back``: index_select's own backward would fill a zero tensor and
    scatter-add into it (measured: a third of the backward's copies on Swin's shifted
    windows)."""

    @staticmethod
    def forward(ctx, x, there, back):
        ctx.back = back
        return there(x)

    @staticmethod
    def backward(ctx, grad):
        return ctx.back(grad), None, None


def _fold(x, group: int):
    """``(batch * heads, P, rows, e)`` -> ``(batch * heads / group, P, group * rows, e)``:
    the ``group`` query heads that read one key/value head become more rows of its problems
    (grouped key/value heads without repeating k and v; dk and dv come out summed over the
    group)."""
    if group == 1:
        return x
    bh, p, rows, e = x.shape
    return x.view(bh // group, group, p, rows, e).transpose(1, 2).reshape(
        bh // group, p, group * rows, e)


def _unfold(y, group: int):
    """Inverse of :func:`_fold`."""
    if group == 1:
        return y
    b, p, rows, e = y.shape
    return y.view(b, p, group, rows // group, e).transpose(1, 2).reshape(
        b * group, p, rows // group, e)


class ExtraKeys:
    """Keys outside the grid that every query attends besides its pattern (NATTEN's
    ``additional_keys``/``additional_values``: text tokens, registers): one dense problem of
    all queries against them, merged with the pattern's parts in the same softmax; with a
    ``softcap``, their scores are capped like the pattern's."""

    def __init__(self, softcap=None):
        self.softcap = softcap

    def _matmul(self, q, keys: int) -> bool:
        """The matmul path: small float32/float64 problems on CPU, and always with a softcap
        (the fused kernels have none)."""
        return self.softcap is not None or dense.matmul_is_faster(q, keys)

    def _mod(self, heads: int):
        return None if self.softcap is None else ScoreMod(self.softcap, None, heads)

    def forward(self, q, ak, av, scale):
        """``(out, lse)``; ``ak, av`` may have fewer heads than ``q`` (each key/value head's
        query heads run as more rows of its one problem)."""
        shape, kv = q.shape, ak.shape[1]
        q = q.reshape(shape[0], kv, -1, shape[3])
        if self._matmul(q, ak.shape[2]):
            out, lse = dense.softmax_attention(q, ak, av, None, scale, True, self._mod(kv))
            lse = lse.squeeze(-1)
        else:
            out, lse = dense.fused_forward(q, ak, av, None, scale)
        return out.reshape(shape), lse.to(acc_dtype(q.dtype)).reshape(shape[:3])

    def backward(self, q, ak, av, out, lse, dout, scale):
        shape, kv = q.shape, ak.shape[1]
        q, out, dout = (t.reshape(shape[0], kv, -1, shape[3]) for t in (q, out, dout))
        lse = lse.reshape(shape[0], kv, -1)
        if self._matmul(q, ak.shape[2]):
            dq, dak, dav = dense.matmul_backward(q, ak, av, out, lse[..., None], dout, None,
                                                 scale, self._mod(kv))[:3]
        else:
            dq, dak, dav = dense.fused_backward(q, ak, av, out, lse, dout, None, scale)
        return dq.reshape(shape), dak, dav


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


class _TermWise:
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
        self.runner = _TermWise(lowered, plan, softcap)

    def forward(self, q, k, v, scale, need_lse=True, table=None):
        return _merged_forward(self.runner, q, k, v, scale, True, None, table)

    def backward(self, q, k, v, out, lse, dout, scale, table=None):
        grads = _merged_backward(self.runner, q, k, v, out, lse, dout, scale, None, table)
        return (*grads[:3], grads[3] if table is not None else None)

    def autograd_forward(self, q, k, v, scale, table=None):
        """A plan that is one dense term: :meth:`DenseTerm.autograd_forward`, else ``None``."""
        alone = self.runner.alone
        return None if alone is None else alone.autograd_forward(q, k, v, scale, table)


def _register_runner(runner, plan) -> str:
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
    runner = _TermWise(lowered, plan, softcap)
    runner.op_key = _register_runner(runner, plan)


# defined when the backend module loads (get_backend("auto")), so a graph or exported program
# that calls them finds them once the pattern is compiled
_planned_fwd = _define_ops()
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
              bias=False, contiguous=True, kv_heads=None, extra_keys=0):
        """The key of the plan for these inputs, planned (for the first ``batch`` seen: the
        costs scale with it alike) and built on first use; ``strategy`` (a name or a tuple
        of names) restricts the strategies beyond the constructor's. The call's softcap,
        ``bias``, extra keys and layout go to the planner, whose executors say whether they
        take them and what they cost."""
        strategy = strategy or self._strategy
        key = (device, dtype, head_dim, heads, backward, strategy, bias, contiguous,
               kv_heads or heads, extra_keys)
        if key not in self._plans:
            allowed = (strategy,) if isinstance(strategy, str) else strategy
            chosen = plan(self.ir, None, executors=allowed, terms=self._terms,
                          head_dim=head_dim, heads=heads, batch=batch, device=device,
                          dtype=dtype, backward=backward, rates=self._rates,
                          contiguous=contiguous, kv_heads=kv_heads, bias=bias,
                          softcap=self.softcap is not None, extra_keys=extra_keys)
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
        for grad, bias, contiguous in itertools.product((False, True), repeat=3):
            key = self._plan(device.type, dtype, head_dim or self.plan.head_dim,
                             heads or self.plan.heads, self.plan.batch, grad, bias=bias,
                             contiguous=contiguous)
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
            runner = _TermWise(self.ir, plan, self.softcap)
            runner.op_key = _register_runner(runner, plan)
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
        :meth:`DenseTerm.autograd_forward` applies and nothing is padding, else the tokens
        put back on the grid, the call as planned, and its output put in order (exact, one
        copy each way)."""
        order = self.token_order
        for name, t in (("q", q), ("k", k), ("v", v)):
            order.check(t, name, "auto (ordered=True)", "(batch, heads, {positions}, head_dim)")
        term = order.term
        if (additional_keys is None and additional_values is None and not order.padded
                and term.autograd_applies(q)):
            qf, kf, vf, _ = flatten_qkv(q, k, v, (order.positions,), "auto (ordered=True)")
            table = self.check_rel_bias(rel_bias, qf)
            scale = scale if scale is not None else self.scale
            scale = float(qf.shape[-1] ** -0.5 if scale is None else scale)
            b, h, t, d = qf.shape
            out = term.ordered_with_bias(qf, kf, vf, scale, table)
            if out is not None:
                return out
            out = term.problems_forward(*(x.reshape(x.shape[0] * x.shape[1], term.problems,
                                                    -1, d) for x in (qf, kf, vf)),
                                        h, scale, table)
            if out is not None:
                return out.reshape(b, h, t, d)
        out = self(order.on_grid(q), order.on_grid(k), order.on_grid(v), scale,
                   additional_keys, additional_values, rel_bias)
        return order.in_order(out)

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
            seen = _signature(q, k, v, grad, rel_bias is not None)
            hit = self._checked.get(seen)
            if hit is not None:  # these shapes, strides, dtypes and devices passed the checks
                flat_q, flat_kv, key = hit
                out_shape = q.shape
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
        sizes = dict(bias=rel_bias is not None,
                     contiguous=all(t.is_contiguous() for t in (qf, kf, vf)),
                     kv_heads=kf.shape[1], extra_keys=0 if extra is None else extra[0].shape[2])
        key = self._plan(*wanted, **sizes)
        if seen is not None and not self._autotune:
            if len(self._checked) >= CHECKED_CALLS:
                self._checked.clear()
            self._checked[seen] = (qf.shape, kf.shape, key)
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
        scale = scale if scale is not None else self.scale
        scale = float(qf.shape[-1] ** -0.5 if scale is None else scale)
        ak, av = extra or (None, None)
        if run.alone is not None and extra is None:
            out = run.alone.autograd_forward(qf, kf, vf, scale, rel_bias)
            if out is not None:
                return restore(out)
        return restore(_planned_fwd(qf, kf, vf, ak, av, rel_bias, run.op_key, scale,
                                    grad)[0])


def _signature(q, k, v, grad: bool, bias: bool):
    """What the input checks and the plan key of a call read from ``q, k, v`` (types,
    shapes, strides, dtypes, devices), whether it needs gradients and has a bias table:
    a call with the same signature passes the same checks and runs the same plan."""
    import torch

    if not (type(q) is type(k) is type(v) is torch.Tensor):
        return None
    return (q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), q.dtype, k.dtype,
            v.dtype, q.device, k.device, v.device, grad, bias)


register_backend("auto", PlannedBackend)
