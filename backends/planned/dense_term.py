"""Dense problems of a term-wise plan: one term as a batch of dense problems after a view
(:class:`DenseTerm`; its token order, for callers that partition their tokens once, is
:class:`.token_order.TokenOrder`), and the keys outside the grid (:class:`ExtraKeys`).

Each returns ``(out, lse)`` over the whole grid and takes the merged ``out`` and ``lse`` back
in its backward (:mod:`.termwise` merges them).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from patterngen.backends import dense
from patterngen.backends.dense import Holes, ScoreMod
from patterngen.backends.inputs import flat_gather, flat_rows, non_finite, select_rows
from patterngen.backends.merge import acc_dtype
from patterngen.errors import PatternError
from patterngen.plan import dense_mask, open_padding

__all__ = ["DenseTerm", "ExtraKeys", "HOLES", "ORDERED_ADD_BYTES", "ORDERED_TABLES",
           "ROW_INDEXES", "INFERENCE_KINDS"]


#: largest share of excluded entries for which the matmul path fills them in after the GEMM
#: instead of adding a dense mask (CCNet's diagonal: 1/64 of a 64 x 64 problem)
HOLES = 1 / 16

#: most bytes of the bias plus mask that an ordered call keeps expanded over the batch
#: (:meth:`DenseTerm._ordered_add`); larger batches run in chunks (Swin's 56x56 stage, 3
#: heads, batch 8: 14.8 MB)
ORDERED_ADD_BYTES = 16 << 20

#: most tables (and batch sizes) an ordered call keeps what it adds for
#: (:meth:`DenseTerm._ordered_add`): Swin-T's 14x14 stage has three shifted blocks
ORDERED_TABLES = 8

#: most row indexes a rolled term keeps, one per side, direction and count of ``(tokens, d)``
#: blocks (:meth:`DenseTerm._select`), so that a model's varying batch sizes keep few
ROW_INDEXES = 8

#: most kinds of inference call (shapes of q, k and the output, dtype, device) a term keeps a
#: function for (:meth:`DenseTerm.inference`)
INFERENCE_KINDS = 16


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
        #: the mask with the rows of padded queries all True, for :meth:`problems_forward`:
        #: a row with a key keeps torch's softmax and its gradient finite (an all-masked row
        #: gives NaN, which sent every call to the merge after the work was done)
        self.open_mask = open_padding(self.mask, shape)
        self.adds_keys = adds_keys
        self.problems, self.keys = shape.batch, shape.keys
        #: a key for every query and no softcap: :meth:`autograd_forward` may run it
        self.plain = bool(adds_keys.all()) and softcap is None
        #: an axis rolled as Swin rolls (:attr:`patterngen.plan.DenseAxis.roll`): the views
        #: are one gather each (:meth:`_gather`)
        self.rolled = any(ax.roll for ax in shape.axes)
        self._cache = {}
        self._inference = {}

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
        ``(index, padding, inverse, missing)``, ``index`` the token of each view position
        and ``inverse`` the view position of each token; ``padding`` lists the view positions
        that are padding and ``missing`` the tokens the view lacks (``None`` when there are
        none): they read token or position 0, then are filled (zeros, or ``fill``)."""
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
            inverse = np.full(math.prod(self.grid), -1, dtype=np.int64)
            inverse[index[index >= 0]] = np.flatnonzero(index >= 0)

            def where_missing(ix):  # filled after the gather: no padded copy of the input
                return torch.as_tensor(np.flatnonzero(ix < 0), device=device) \
                    if (ix < 0).any() else None

            self._cache[key] = (torch.as_tensor(np.maximum(index, 0), device=device),
                                where_missing(index),
                                torch.as_tensor(np.maximum(inverse, 0), device=device),
                                where_missing(inverse))
        return self._cache[key]

    def _gathered(self, x, side: str):
        """:meth:`_view` of a rolled shape: ``(B, H, N, d)`` -> ``(B * H, problems, rows,
        d)`` by one gather (padding zero)."""
        _, padding, _, _ = self._gather(side, x.device)
        b, h, n, d = x.shape
        y = self._select(x.reshape(b * h, n, d), side, 0)
        if padding is not None:
            y.index_fill_(1, padding, 0.0)
        return y.view(b * h, self.problems, -1, d)

    def _scattered(self, y, b: int, h: int, fill: float, side: str):
        """:meth:`_unview` of a rolled shape, by the inverse gather (tokens the view lacks
        get ``fill``)."""
        _, _, _, missing = self._gather(side, y.device)
        y = self._select(y.reshape(b * h, -1, y.shape[-1]), side, 2)
        if missing is not None:
            y.index_fill_(1, missing, fill)
        return y.view(b, h, -1, y.shape[-1])

    def _select(self, x3, side: str, which: int):
        """``x3`` ``(blocks, n, d)`` gathered along ``n`` by :meth:`_gather`'s ``index``
        (``which`` 0) or ``inverse`` (2), rows copied whole, by
        :func:`~patterngen.backends.inputs.select_rows`: along dim 0 of ``(blocks * n, d)``
        where it runs on every thread, by one index into all its rows, kept per block count
        (Swin's roll and partition of 56x56, 96 channels, batch 2: 0.13 ms against 0.23 at
        two threads)."""
        index = self._gather(side, x3.device)[which]
        flat = None
        if flat_gather(x3):
            key = ("rows", side, which, str(x3.device), x3.shape[0])
            flat = self._cache.get(key)
            if flat is None:
                kept = [k for k in self._cache if k[0] == "rows"]
                if len(kept) >= ROW_INDEXES:
                    for k in kept:
                        del self._cache[k]
                flat = self._cache[key] = flat_rows(index, x3.shape[0], x3.shape[1])
        return select_rows(x3, index, flat=flat)

    def _view(self, x, side: str, flat: bool = False):
        """``(B, H, N, d)`` or ``(B, H, *grid, d)`` -> ``(B * H, problems, rows, d)`` in the
        problems' order (``flat``, a term that is not rolled: ``(B * H * problems, rows, d)``,
        what a bmm takes)."""
        if self.rolled:
            b, h = x.shape[:2]
            x = x.reshape(b, h, -1, x.shape[-1])
            return _moved(x, lambda t: self._gathered(t, side),
                          lambda g: self._scattered(g, b, h, 0.0, side))
        cuts = self._recipe(side).cuts
        b, h, d = x.shape[0], x.shape[1], x.shape[-1]
        split, order, problems = self._view_shapes(side, b, h, d, flat)
        # the split refines the grid's row-major axes: without cuts, one reshape does both
        t = x.reshape(b, h, *self.grid, d) if cuts else x
        for dim, start, length, pad in cuts:
            if pad is None:
                t = t.narrow(dim, start, length)
            else:
                t = F.pad(t, [0, 0] * (t.dim() - 1 - dim) + list(pad))
        return t.reshape(split).permute(order).reshape(problems)

    def _view_shapes(self, side: str, b: int, h: int, d: int, flat: bool) -> tuple:
        """:meth:`_view`'s reshape, permutation and problems' shape (after any cuts)."""
        r = self._recipe(side)
        return ((b, h, *r.split, d), r.order,
                (-1, r.rows, d) if flat else (b * h, self.problems, r.rows, d))

    def _unview_shapes(self, b: int, h: int, e: int, side: str = "q") -> tuple:
        """:meth:`_unview`'s reshape and permutation (before any cuts)."""
        r = self._recipe(side)
        return (b, h, *r.ordered, e), r.inverse

    def _unview(self, y, b: int, h: int, fill: float, side: str = "q", shape=None):
        """Inverse of :meth:`_view`: ``(B * H, problems, rows, e)`` (or flat) -> ``(B, H,
        N, e)``, or ``shape`` (the caller's gridded shape). Tokens outside the term's query
        (``side="q"``) or key (``"k"``) range get ``fill``; padding is dropped. Every token
        appears at most once in a view, so for gradients (``fill=0``) this is also the
        view's adjoint."""
        e = y.shape[-1]
        if self.rolled:
            t = _moved(y, lambda t: self._scattered(t, b, h, fill, side),
                       lambda g: self._gathered(g, side).view(y.shape))
            return t if shape is None else t.reshape(shape)
        shape = shape or (b, h, math.prod(self.grid), e)
        recipe = self._recipe(side)
        cuts, whole = recipe.cuts, recipe.whole
        split, inverse = self._unview_shapes(b, h, e, side)
        t = y.reshape(split).permute(inverse)
        if not cuts:
            return t.reshape(shape)
        t = t.reshape(b, h, *whole, e)
        for dim, start, length, pad in cuts:
            if pad is not None:
                t = t.narrow(dim, start, length)
            else:
                n = self.grid[dim - 2]
                t = F.pad(t, [0, 0] * (t.dim() - 1 - dim) + [start, n - start - length],
                          value=fill)
        return t.reshape(shape)

    def in_order(self, x):
        """``(B, H, tokens, C)`` -> ``(B, H, positions, C)`` in the problems' order
        (:class:`TokenOrder`), with autograd (the inverse gather as its adjoint). Without a
        rolled axis it is the term's own view, one permuting copy: 0.45x the time of the
        gather at 56x56, 96 channels (Swin's ``window_partition``)."""
        b, h = x.shape[:2]
        if not self.rolled:
            return self._view(x, "q").reshape(b, h, -1, x.shape[-1])
        return _moved(x, lambda t: self._gathered(t, "q").reshape(b, h, -1, t.shape[-1]),
                      lambda g: self._scattered(g, b, h, 0.0, "q"))

    def on_grid(self, y):
        """Inverse of :meth:`in_order`: ``(B, H, positions, C)`` -> ``(B, H, tokens, C)``."""
        b, h = y.shape[:2]
        if not self.rolled:
            return self._unview(y.reshape(b * h, self.problems, -1, y.shape[-1]), b, h, 0.0)
        return _moved(y, lambda t: self._scattered(t, b, h, 0.0, "q"),
                      lambda g: self._gathered(g, "q").reshape(b, h, -1, g.shape[-1]))

    def _mask(self, group: int, open_rows: bool = False):
        """The mask over folded problems (:func:`_fold`): each problem's rows once per query
        head of a key/value head (``open_rows``: :attr:`open_mask`)."""
        mask = self.open_mask if open_rows else self.mask
        return mask if group == 1 else np.tile(mask, (1, group, 1))

    def _additive_mask(self, dtype, device, group: int = 1, open_rows: bool = False):
        if self.mask is None:
            return None
        key = (dtype, str(device), group, open_rows)
        if key not in self._cache:
            import torch

            m = torch.as_tensor(self._mask(group, open_rows), device=device)
            # CUDA's memory-efficient kernel wants the bias rows 16-element aligned
            width = m.shape[-1] + (-m.shape[-1] % 16 if torch.device(device).type == "cuda"
                                   else 0)
            bias = torch.zeros(*m.shape[:-1], width, dtype=dtype, device=device)
            bias = bias[..., :m.shape[-1]]
            self._cache[key] = bias.masked_fill_(~m, float("-inf"))[None]
        return self._cache[key]

    def _matmul_mask(self, dtype, device, group: int = 1, open_rows: bool = False):
        """The mask for the matmul path: its excluded entries when they are at most
        ``HOLES`` of it, else the additive tensor."""
        if self.mask is None:
            return None
        key = ("holes", str(device), group, open_rows)
        if key not in self._cache:
            import torch

            excluded = ~self._mask(group, open_rows)
            holes = None
            if excluded.sum() <= HOLES * excluded.size:
                index = torch.as_tensor(np.flatnonzero(excluded), device=device)
                holes = Holes(index, shared=excluded.shape[0] == 1)
            self._cache[key] = holes
        return self._cache[key] or self._additive_mask(dtype, device, group, open_rows)

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
        tile = None if table is None else self._tile(table, group)
        return ScoreMod(self.softcap, tile, heads // group)

    def _tile(self, table, group: int = 1):
        """``table`` gathered to ``(heads, 1 or problems, rows, keys)``, folded by ``group``.
        Without a gradient for the table the gather is kept for the next call, keyed by the
        table itself and its version counter, which every in-place write (an optimiser's
        step) moves: 25 us of a 0.3 ms Swin call."""
        kept = (not (table.requires_grad and torch.is_grad_enabled())
                and not table.is_inference())
        key = ("tile", group, table.dtype, str(table.device))
        if kept:
            hit = self._cache.get(key)
            if _current(hit, table):
                return hit[2]
        # index_select, not advanced indexing: 40 us against 270 us for Swin-T's last
        # stage (24 heads), about half of that call's time
        index = self._offsets(table.device)
        tile = table.reshape(table.shape[0], -1).index_select(1, index.view(-1)).view(
            table.shape[0], *index.shape)
        tile = tile.repeat(1, 1, group, 1) if tile.shape[0] == 1 else _fold(tile, group)
        if kept:
            self._cache[key] = (table, table._version, tile)
        return tile

    def autograd_forward(self, q, k, v, scale, table=None, shape=None):
        """The output ``(B, H, N, d)`` through torch's autograd, as a model's partitioned
        attention runs it (views, bmm, the bias and mask added, softmax, bmm; its backward
        keeps the probabilities instead of recomputing them from the log-sum-exp: one batched
        matmul and one exp less, and the bias's gradient is the kept score gradient summed),
        or ``None`` where that does not apply. It applies to a term that runs alone on the
        matmul path with a key for every query and no softcap, in eager mode, when its output
        is finite (a row whose scores are all ``-inf`` gives NaN here where the merge gives 0;
        the caller then runs the merge). ``table``: a relative position bias table; without
        gradients, it runs in the fused kernel (:meth:`_fused_with_bias`). ``shape``: the
        output's shape, the caller's gridded one (default ``(B, H, N, d)``)."""
        return self.applied_forward(q, k, v, scale, table, shape) \
            if self.autograd_applies(q) else None

    def applied_forward(self, q, k, v, scale, table=None, shape=None):
        """:meth:`autograd_forward` for inputs that :meth:`autograd_applies` to (a caller
        that checked a kind of call once); inference with a table on inputs whose heads lie
        inside each token runs :meth:`_token_major_forward`."""
        b, h = q.shape[:2]
        if self._heads_inside(q, k, v, table):
            return self._token_major_forward(q, k, v, scale, table, shape)
        if table is None and k.shape[1] == h:
            # as a model's partitioned attention writes it and no more: each torch call, a
            # view included, costs about 1 us of a 0.2 ms call (14x14, batch 2), more with
            # autograd recording it
            grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                or v.requires_grad)
            if not grad:
                return self.inference(q, k, shape)(q, k, v, scale)
            mask = self._lone_mask(q, grad)
            # a mask is added per problem: (B * H, problems, rows, keys) scores then
            flat = mask is None and not self.rolled
            out = dense.KeptAttention.apply(self._view(q, "q", flat), self._view(k, "k", flat),
                                            self._view(v, "k", flat), None, mask, scale, 1)
            if not _finite(out.detach()):
                return None
            return self._unview(out, b, h, 0.0, shape=shape)
        if self.rolled and table is not None:
            out = self._fused_in_order(q, k, v, scale, table)
            if out is not None:
                return out if shape is None else out.reshape(shape)
        out = self.problems_forward(self._view(q, "q"), self._view(k, "k"), self._view(v, "k"),
                                    h, scale, table)
        return None if out is None else self._unview(out, b, h, 0.0, shape=shape)

    def inference(self, q, k, shape=None):
        """:meth:`applied_forward` without gradients or a table, for q and k shaped like these
        (the output ``shape``, default ``(B, H, N, d)``), as a function ``(q, k, v, scale)``
        that returns the output, or ``None`` where it is not finite. Kept per shape: its views'
        shapes are worked out once, and a repeated call runs as a model's partitioned
        attention writes it and no more (the Python between the torch calls had cost 30 us of
        a 0.27 ms call, MaxViT's 14x14 grid attention at batch 2, two threads)."""
        key = (q.shape, k.shape, shape, q.dtype, q.device)  # its mask is built for the last two
        run = self._inference.get(key)
        if run is not None:
            return run
        b, h, d = q.shape[0], q.shape[1], q.shape[-1]
        mask = self._lone_mask(q, False)
        # a mask is added per problem: (B * H, problems, rows, keys) scores then
        flat = mask is None and not self.rolled
        recipes = self._recipe("q"), self._recipe("k")
        if self.rolled or any(r.cuts for r in recipes):
            def view_q(x):
                return self._view(x, "q", flat)

            def view_k(x):
                return self._view(x, "k", flat)

            def unview(y):
                return self._unview(y, b, h, 0.0, shape=shape)
        else:
            views = [self._view_shapes(side, b, h, d, flat) for side in ("q", "k")]
            (sq, oq, pq), (sk, ok, pk) = views
            so, io = self._unview_shapes(b, h, d)
            out = shape or (b, h, math.prod(self.grid), d)

            def view_q(x):
                return x.reshape(sq).permute(oq).reshape(pq)

            def view_k(x):
                return x.reshape(sk).permute(ok).reshape(pk)

            def unview(y):
                return y.reshape(so).permute(io).reshape(out)

        def run(q, k, v, scale):
            # one nested call, no name holding a buffer: each is freed once read (q's and k's
            # copies after the scores, the scores after softmax, v's copy made then), so the
            # peak is two score-sized buffers and not every copy at once, memory the C
            # allocator keeps for the next call rather than handing back to the system (with
            # every buffer alive, the rolled W3-shift forward faulted 4.6 MB a call: 1.6x
            # the time)
            y = torch.bmm(_batched(torch.softmax(dense.score_matrix(
                view_q(q), view_k(k), mask, scale), -1)), _batched(view_k(v)))
            return unview(y) if _finite(y) else None

        if len(self._inference) >= INFERENCE_KINDS:
            self._inference.clear()
        self._inference[key] = run
        return run

    def _lone_mask(self, q, grad: bool, group: int = 1):
        """The mask of a lone term's forward (padded query rows open): additive with a
        gradient, else the matmul path's (holes where few)."""
        return (self._additive_mask(q.dtype, q.device, group, True) if grad
                else self._matmul_mask(q.dtype, q.device, group, True))

    def _heads_inside(self, q, k, v, table) -> bool:
        """Whether a call runs :meth:`_token_major_forward`: inference on CPU with a bias
        table the same in every problem, q's heads inside each token (q a ``(b, h, *grid,
        d)`` view of a projection's ``(b, *grid, [3,] h, d)`` output), a term of aligned
        tiles or whole axes without a mask, queries and keys viewed alike. (Without a table
        the matmul path and its copies measured as fast, MaxViT's 4 heads, 14x14 to 56x56.)"""
        if table is None or not q.stride(1) < q.stride(-2):  # the common cases first
            return False
        key = ("heads inside",)
        if key not in self._cache:
            rq, rk = self._recipe("q"), self._recipe("k")
            self._cache[key] = (self.mask is None and not self.rolled and not rq.cuts
                                and rq == rk and self._offsets("cpu").shape[0] == 1)
        return (self._cache[key] and 1 < q.shape[1] == k.shape[1] and q.device.type == "cpu"
                and not (torch.is_grad_enabled() and any(
                    x.requires_grad for x in (q, k, v, table))))

    def _token_major_forward(self, q, k, v, scale, table, shape):
        """Inference with a bias ``table`` on inputs whose heads lie inside each token, in
        the fused kernel on ``(b * problems, h, rows, d)`` problems, the bias ``(1, h, rows,
        keys)`` broadcast over them (Swin's SDPA call): one copy into problems when q, k, v
        are views of one projection's output (:func:`_stacked`), reading whole tokens, and
        the output returned in the inputs' layout, ``(b, h, *grid, d)`` over memory ``(b,
        *grid, h, d)``, so that the output projection reads it without a copy. ``None``
        where the log-sum-exp is not finite: every row attends all keys of its problem, so a
        non-finite value of an attended key already gives the rule's output, and the rest (a
        NaN or infinite score, a row whose scores are all ``-inf``) shows in the
        log-sum-exp."""
        b, h, d = q.shape[0], q.shape[1], q.shape[-1]
        split, ordered, there, back = self._token_recipe()
        stacked = _stacked(q, k, v)
        parts = (stacked,) if stacked is not None else (q[None], k[None], v[None])
        n = self.shape.queries
        # each problem's rows contiguous per head: the fused kernel reads them in 0.9x the
        # time of rows a token's width apart, more than the copy's scattered writes add
        rows = [t.reshape(len(t), b, h, *split, d).permute(there).reshape(
            len(t), b * self.problems, h, n, d) for t in parts]
        qkv = [r[i] for r in rows for i in range(len(r))]
        out, lse = dense.fused_forward(*qkv, self._tile(table).transpose(0, 1).to(q.dtype),
                                       scale)
        del rows, qkv  # freed before the output's copy, which may take their memory
        if not math.isfinite(float(lse.sum())):
            return None
        out = out.transpose(1, 2).reshape(b, *ordered, h, d).permute(back).contiguous()
        out = out.view(b, -1, h, d) if shape is None or len(shape) == 4 else out.view(
            b, *self.grid, h, d)
        return out.movedim(-2, 1)

    def _token_recipe(self):
        """For :meth:`_token_major_forward`: the split of the grid's axes, the split sizes
        in the problems' order, the permutation of ``(3, b, h, *split, d)`` into ``(3, b,
        *problems' dims, h, rows' dims, d)``, and the one of the output ``(b, *problems'
        dims, rows' dims, h, d)`` back to ``(b, *split, h, d)``."""
        key = ("token recipe",)
        if key not in self._cache:
            r = self._recipe("q")
            inner = [i + 1 for i in r.order[2:-1]]  # the split's dims in (3, b, h, *split, d)
            # the problems' dims lead (sizes above 1: the first prefix whose product is theirs)
            cut = next(i for i in range(len(inner) + 1)
                       if math.prod(r.ordered[:i]) == self.problems)
            there = (0, 1, *inner[:cut], 2, *inner[cut:], len(r.order))
            back = (0, *(int(i) + 1 for i in np.argsort(inner)), len(inner) + 1,
                    len(inner) + 2)
            self._cache[key] = (r.split, r.ordered, there, back)
        return self._cache[key]

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
                                        self._additive_mask(qp.dtype, qp.device, group, True))
        else:
            mask = self._lone_mask(qp, grad, group)
            mod = self._mod(table, heads, group)
            if grad:
                out = dense.KeptAttention.apply(qp, kp, vp, None if mod is None else mod.bias,
                                                mask, scale, heads // group)
            else:
                scores = dense.score_matrix(qp, kp, mask, scale, mod).view(bp * p, n, -1)
                out = torch.softmax(scores, dim=-1) @ vp.reshape(bp * p, -1, d)
        if not _finite(out.detach() if grad else out):
            return None
        return _unfold(out.view(bp, p, n, d), group)

    def ordered_fused(self, q, k, v, scale, table):
        """Inference on q, k, v ``(B, H, positions, d)`` in the token order, with or without
        a bias ``table`` and a mask, in the fused kernel on ``(B * problems, H, rows, d)``
        views: the layout a projection of ordered tokens gives, so q, k, v are read where
        they are (Swin's fused path) and the output is a view of the kernel's; copying them
        into ``(B * H, problems, ...)`` for the matmul path took 1.3-2.8x its time (MaxViT's
        14x14 to 56x56, 4 heads; 1.4x at 28x28, 6 heads, with a table). The bias
        ``(1, H, rows, keys)`` is broadcast over windows; with a mask (Swin's shifted
        windows), what the kernel adds is kept expanded over the batch
        (:meth:`_ordered_add`), so that one call runs it all: a call per batch element joined
        by a copy of the output took 1.47x the time of the unmasked call (56x56, 3 heads,
        batch 2, one thread), one call 1.15x. ``None`` where that does not apply (grouped
        key/value heads, a bias that differs per problem, a softcap, gradients, CUDA, a
        non-finite output)."""
        b, h, t, d = q.shape
        if not self._fuses_in_order(q, k, v, table):
            return None
        add, chunk = self._ordered_add(table, q.dtype, q.device, b)
        qv, kv, vv = (_problems_view(x, self.problems) for x in (q, k, v))
        if chunk >= b:
            out, lse = dense.fused_forward(qv, kv, vv, add, scale)
        else:  # the kernel's output is (problems, rows, H, d) in memory: joined so, a view
            n = chunk * self.problems
            parts = [dense.fused_forward(*(x[i:i + n] for x in (qv, kv, vv)),
                                         add[:min(n, b * self.problems - i)], scale)
                     for i in range(0, b * self.problems, n)]
            out = torch.cat([o.transpose(1, 2) for o, _ in parts]).transpose(1, 2)
            lse = torch.cat([part[1] for part in parts])
        return self._ordered_output(out, lse, q.shape)

    def ordered_inference(self, q, k, v, table):
        """:meth:`ordered_fused` as a function ``(q, k, v, scale, table)`` for inputs shaped,
        strided and typed like these and a table like ``table``, or ``None`` where it does
        not apply to them (the general path then: half precision, a layout that is not one
        strided view of the problems, a mask repeated in chunks of the batch). The caller
        keeps it per kind of call, so that a repeated call runs the kernel on views whose
        shapes and strides were worked out once: each line of Python between the kernels
        costs several times its own time right after a layer's kernels have taken the
        caches. Swin's unshifted step, 28x28 and 56x56 at batch 2, two threads: the call
        took 0.08-0.11 ms more than its torch calls written out, 0.04-0.06 ms more kept."""
        b = q.shape[0]
        if q.dtype not in (torch.float32, torch.float64) or not self._fuses_in_order(
                q, k, v, table):
            return None
        views = [_problems_strides(x, self.problems) for x in (q, k, v)]
        if any(view is None or view[1][-1] != 1 for view in views):
            return None
        (sq, tq), (sk, tk), (sv, tv) = views
        # the fused kernel's rule for short rows (dense.fused_forward)
        zero = q.new_zeros(1, 1, 1, self.keys) if self.keys < dense.SHORT_ROWS else None
        kernel = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu

        def run(q, k, v, scale, table):
            add, chunk = self._ordered_add(table, q.dtype, q.device, b)
            if chunk < b:
                return self.ordered_fused(q, k, v, scale, table)
            out, lse = kernel(q.as_strided(sq, tq), k.as_strided(sk, tk), v.as_strided(sv, tv),
                              0.0, False, attn_mask=zero if add is None else add, scale=scale)
            return self._ordered_output(out, lse, q.shape)

        return run

    def _ordered_output(self, out, lse, shape):
        """The ``(B, H, positions, d)`` view of the fused kernel's ``out`` on the problems of
        q, k, v of ``shape``, or ``None`` where not finite."""
        b, h, t, d = shape
        # sums: a NaN or an infinity anywhere (a fully masked row, a non-finite input) sends
        # the call to the exact path. The log-sum-exp of a row is not finite where its
        # scores are all -inf, or one is NaN or +inf (a masked key's too); a key the row
        # attends with a non-finite value makes its output so already (the rule of tests/
        # test_nonfinite.py), a masked one only where a problem has masked pairs: the
        # output of those problems is summed too (15 of 64 windows at 56x56)
        total = lse.sum()
        if self.mask is not None:
            rows = out.transpose(1, 2).reshape(b, self.problems, -1)
            for start, length in self._masked_runs():
                total = total + rows.narrow(1, start, length).sum()
        if not math.isfinite(float(total)):
            return None
        return out.view(b, self.problems, h, -1, d).transpose(1, 2).reshape(b, h, t, d)

    def _fuses_in_order(self, q, k, v, table) -> bool:
        """Whether :meth:`ordered_fused` applies to a call like this one."""
        return not (self.softcap is not None or k.shape[1] != q.shape[1]
                    or q.device.type != "cpu"
                    or table is not None and self._offsets(q.device).shape[0] != 1
                    or torch.is_grad_enabled() and any(
                        x is not None and x.requires_grad for x in (q, k, v, table)))

    def _fused_in_order(self, q, k, v, scale, table):
        """Inference on q, k, v ``(B, H, *grid, d)`` whose heads and head_dim are adjacent
        in memory (a projection's output, ``(B, *grid, H, d)`` permuted), as an ordered
        call: each put in the token order by rows of ``H * d`` elements (:meth:`in_order`),
        :meth:`ordered_fused`, and its output put back the same way, a ``(B, H, N, d)`` view
        of ``(B, N, H, d)`` memory, the layout the output projection reads; q, k and v that
        are views of one ``qkv`` projection's output move by its whole rows, once. The
        problems' views by rows of d elements copy each of them (a rolled view twice:
        ``index_select`` copies a strided input whole first), and the caller's projection
        then copies the output again (56x56, 3 heads, batch 2, one thread: a rolled view
        0.45 ms a tensor, 0.66 ms for the three at once). Taken for rolled terms: for
        Swin's unshifted windows, whose views are one copy each, it measured 0.99-1.08x
        the time of the problems' views (the kernel reads the ordered layout's strided
        rows 6% slower). ``None`` where that does not apply (padding, other layouts, and
        as :meth:`ordered_fused`)."""
        if not self._fuses_in_order(q, k, v, table) or self._gather("q", q.device)[1] is not None:
            return None
        rows = [_token_rows(x) for x in (q, k, v)]
        if any(r is None for r in rows):
            return None
        b, h, d = q.shape[0], q.shape[1], q.shape[-1]
        joint = _joint(q, k, v)
        if joint is not None:
            t = self.in_order(joint[:, None]).view(b, -1, 3, h, d)
            ins = [t[:, :, i].transpose(1, 2) for i in range(3)]
        else:
            ins = [self.in_order(r[:, None]).view(b, -1, h, d).transpose(1, 2) for r in rows]
        out = self.ordered_fused(*ins, scale, table)
        if out is None:
            return None
        return self.on_grid(out.transpose(1, 2).reshape(b, 1, -1, h * d)).view(
            b, -1, h, d).transpose(1, 2)

    def _masked_runs(self) -> list:
        """``(start, length)`` runs of the problems whose mask excludes a pair."""
        key = ("masked runs",)
        if key not in self._cache:
            masked = ~self.mask.reshape(self.mask.shape[0], -1).all(1)
            if masked.shape[0] == 1:
                masked = np.repeat(masked, self.problems)
            edges = np.flatnonzero(np.diff(np.concatenate([[0], masked.astype(np.int8), [0]])))
            self._cache[key] = [(int(a), int(z - a)) for a, z in zip(edges[::2], edges[1::2])]
        return self._cache[key]

    def _ordered_add(self, table, dtype, device, batch: int):
        """What :meth:`ordered_fused` adds to the scores of ``batch`` inputs, and in chunks
        of how many batch elements: nothing (``None``), the bias ``(1, H, rows, keys)`` (a
        ``table`` the same for every problem) for the whole batch, or the mask, or bias and
        mask added, ``(problems, H or 1, rows, keys)`` repeated for a chunk of the batch (at
        most :data:`ORDERED_ADD_BYTES`). Kept per table, batch and dtype while the table is
        unchanged (its version counter, as :meth:`_tile`), for up to
        :data:`ORDERED_TABLES` of them: the blocks of a model stage that share one compiled
        pattern each have their own table."""
        kept = table is None or not table.is_inference()
        key = ("ordered add", dtype, batch, id(table))
        hit = self._cache.get(key) if kept else None
        if _current(hit, table):
            return hit[2], hit[3]
        add, chunk = None, batch
        if table is not None:
            add = self._tile(table).transpose(0, 1).to(dtype)
        if self.mask is not None:
            mask = self._additive_mask(dtype, device)[0][:, None]
            add = mask if add is None else add + mask
            chunk = max(1, min(batch, ORDERED_ADD_BYTES // (add.numel() * add.element_size())))
            add = add.repeat(chunk, 1, 1, 1)
        if kept:
            adds = [k for k in self._cache if k[0] == "ordered add"]
            if len(adds) >= ORDERED_TABLES:
                for k in adds:
                    del self._cache[k]
            self._cache[key] = (table, None if table is None else table._version, add, chunk)
        return add, chunk

    def _fused_with_bias(self, qp, kp, vp, scale, bias, mask):
        """Inference with a bias ``(heads, 1, rows, keys)`` (and a mask ``(1, problems, rows,
        keys)``) in the fused kernel, the bias broadcast over batch (the mask's problems
        over heads) by the kernel: in the call, 0.84-0.93x the matmul path's time on Swin-T's
        stages (its scores never leave the cache), where without a bias the matmul path is
        the faster (:data:`dense.MATMUL_KEYS`). What the kernel adds is kept while the bias
        is the same gather (see :meth:`_tile`) and the batch the same: adding it took 0.2 ms
        of a 4 ms call (56x56, 3 heads, batch 2, shifted, one thread)."""
        bp, p, n, d = qp.shape
        heads = bias.shape[0]
        key = ("fused add", qp.dtype)
        hit = self._cache.get(key)
        if hit is None or hit[0] is not bias or hit[1] is not mask or hit[2] != bp:
            if mask is None:
                add = bias.expand(bp // heads, heads, 1, n, -1).reshape(bp, 1, n, -1)
            else:  # the heads' problems become one axis, so that one tensor holds both
                add = (bias + mask).view(1, heads * p, n, -1)
            hit = self._cache[key] = (bias, mask, bp, add.to(qp.dtype))
        if mask is not None:
            qp, kp, vp = (t.view(bp // heads, heads * p, -1, d) for t in (qp, kp, vp))
        return dense.fused_forward(qp, kp, vp, hit[3], scale)[0].reshape(bp, p, n, d)

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
        # that are not finite, the exact path; with a mask too, a masked key's NaN or
        # infinity must not reach the queries of its problem that do not attend it
        matmul = self._matmul(q, table)
        dirty = (self.mask is not None or not matmul) and non_finite(k, v)
        if dirty and self.mask is not None:
            out, lse = self._masked_exact(qp, kp, vp, scale, table, h, group)
        elif matmul or dirty:
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

    def _masked_exact(self, qp, kp, vp, scale, table, heads: int, group: int):
        """``(out, lse)`` of the problems by :func:`dense.masked_attention`, the rule of SDPA on
        each query's attended keys alone, with the mask and the bias as one additive tensor
        (the bias broadcast over problems as :class:`~patterngen.backends.dense.ScoreMod`
        adds it)."""
        add = self._additive_mask(acc_dtype(qp.dtype), qp.device, group)
        mod = self._mod(table, heads, group)
        if mod is not None and mod.bias is not None:
            shape = (*qp.shape[:-1], kp.shape[-2])
            add = add.expand(shape).clone()
            add.view(-1, mod.heads, *shape[1:]).add_(mod.bias.to(add.dtype))
        return dense.masked_attention(qp, kp, vp, scale, self.softcap, add, need_lse=True)

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


def _current(hit, table) -> bool:
    """Whether a kept entry ``(table, version, ...)`` was made from ``table`` as it is now:
    every in-place write (an optimiser's step) moves a tensor's version counter."""
    return hit is not None and hit[0] is table and (table is None or hit[1] == table._version)


def _finite(out) -> bool:
    """Whether the matmul path's ``out`` may be returned: a row whose scores are all ``-inf``
    gives NaN there where the merge gives 0. One sum: a NaN or an infinity anywhere makes it
    non-finite (a sum that merely overflows only sends the call to the merge, which is exact
    for any input)."""
    return math.isfinite(float(out.sum()))


def _moved(x, there, back):
    """``there(x)`` with :class:`_Moved`'s adjoint where a gradient is recorded; without one,
    ``there(x)`` alone (the Function's apply took 60 us of a 4.5 ms Swin step)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Moved.apply(x, there, back)
    return there(x)


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


def _token_rows(x):
    """``(B, H, *grid, d)`` -> ``(B, tokens, H * d)``, a view where heads and head_dim are
    adjacent in memory, else ``None``."""
    b, h, d = x.shape[0], x.shape[1], x.shape[-1]
    t = x.reshape(b, h, -1, d)
    if t.stride(-1) != 1 or h > 1 and t.stride(1) != d:
        return None
    return t.transpose(1, 2).reshape(b, -1, h * d)


def _joint(q, k, v):
    """``(B, tokens, 3 * H * d)``: the rows of :func:`_token_rows` of q, k and v side by side,
    a view where they are views of one ``(B, tokens, 3, H, d)`` projection output
    (:func:`_stacked`, each ``H * d`` elements after the last), else ``None``."""
    s = _stacked(q, k, v)
    if s is None or s.stride(0) != q.shape[1] * q.shape[-1]:
        return None
    return _token_rows(s.transpose(0, 1).flatten(1, 2))


def _batched(x):
    """``(..., rows, cols)`` as a bmm's operand ``(batch, rows, cols)`` (a view)."""
    return x if x.dim() == 3 else x.flatten(0, -3)


def _stacked(q, k, v):
    """``(3, *q.shape)``: q, k and v as one view where they are equally strided views of one
    storage at equal distances (a ``qkv`` projection's output split in three), else
    ``None``."""
    step = k.storage_offset() - q.storage_offset()
    if (step <= 0 or v.storage_offset() - k.storage_offset() != step
            or not q.shape == k.shape == v.shape or not q.stride() == k.stride() == v.stride()
            or not q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
            == v.untyped_storage().data_ptr()):
        return None
    return q.as_strided((3, *q.shape), (step, *q.stride()))


def _problems_view(x, problems: int):
    """``(B, H, positions, d)`` in the token order -> ``(B * problems, H, rows, d)``: one
    strided view where the batch's stride allows it (a projection's output does), else the
    same through unflatten, transpose and flatten (which may copy)."""
    view = _problems_strides(x, problems)
    if view is not None:
        return x.as_strided(*view)
    return x.unflatten(2, (problems, -1)).transpose(1, 2).flatten(0, 1)


def _problems_strides(x, problems: int):
    """The shape and strides of :func:`_problems_view` as one strided view of ``x``, or
    ``None`` where the batch's stride does not allow one."""
    b, h, t, d = x.shape
    sb, sh, st, sd = x.stride()
    rows = t // problems
    if b == 1 or sb == t * st:
        return (b * problems, h, rows, d), (rows * st, sh, st, sd)
    return None


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

