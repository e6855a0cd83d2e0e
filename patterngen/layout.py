"""Block-sparse layouts: which (query block, key block) tiles a pattern touches, never n x n.

Tokens are put in a *layout order* (row-major, or tiled: each tile contiguous), cut into query
blocks of ``Bq`` and key blocks of ``Bk`` consecutive positions, and every (query block, key
block) tile is classified as *empty* (no attended pair), *full* (every pair attended: no mask
needed) or *partial*. Full and partial tiles are kept apart, as in FlexAttention's ``BlockMask``.

How it is computed, without a tokens x tokens array: in a row-major grid (the tiled order is
row-major on the grid ``(T_1, .., T_k, t_1, .., t_k)`` of tile indices then in-tile offsets) a
run of consecutive positions is a union of at most ``2k - 1`` *boxes* (products of per-axis
intervals). For one separable term, the pairs between a query box and a key box factor into a
product of per-axis counts ``G_a = sum over q in [a, b) of |keys_a(q) & [c, d)|``, and a union of
terms counts exactly by inclusion-exclusion over :meth:`IR.pieces`. So each candidate tile's
attended-pair count is a handful of O(1) lookups: per-axis prefix tables for axes up to
:data:`TABLE_MAX_AXIS` long, binary searches over the per-query bounds on longer axes. Candidate
tiles come from each query box's reachable key box (per-axis unions of the query bounds), so the
work is proportional to the number of non-empty tiles plus O(tokens).

Example:
    >>> import patterngen as pg
    >>> lay = layout(pg.window(3), grid=8, block=(4, 4))
    >>> lay.to_dense()
    array([[1, 1],
           [1, 1]], dtype=int8)
    >>> lay.attended_pairs, lay.executed_pairs
    (24, 64)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import ir as _ir
from . import limits
from .errors import PatternError
from .grid import MAX_SIZE
from .spec import as_ir

__all__ = ["layout", "Layout", "HeadsLayout", "aligned_tiles", "ORDERS", "TABLE_MAX_AXIS"]

#: token orders :func:`layout` accepts
ORDERS = ("row-major", "tiled", "auto")
#: axes up to this length get an exact (n + 1) x (n + 1) prefix table of per-axis pair counts
TABLE_MAX_AXIS = 1024
#: elements per chunk when a long axis must be summed query by query (dilated long axes)
_CHUNK = 1 << 22
#: tiled candidates tried by ``order="auto"`` (and ``"tiled"`` without a tile)
_MAX_TILE_CANDIDATES = 4


# --------------------------------------------------------------------------------------------
# argument checks


def _check_block(block) -> tuple[int, int]:
    values = block if isinstance(block, (tuple, list)) else (block, block)
    if len(values) != 2 or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 1 <= v <= MAX_SIZE
            for v in values):
        raise PatternError(
            f"Invalid block={block!r}; block sizes must be positive integers up to "
            f"{MAX_SIZE}, given as one integer or (query_block, key_block), e.g. "
            f"block=(128, 128).")
    return int(values[0]), int(values[1])


def _check_tile(tile, shape: tuple) -> tuple:
    values = tile if isinstance(tile, (tuple, list)) else (tile,) * len(shape)
    if len(values) != len(shape) or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1
            for v in values):
        raise PatternError(
            f"Invalid tile={tile!r} for grid {'x'.join(map(str, shape))}; expected "
            f"{len(shape)} positive integer tile sides, e.g. tile={(8,) * len(shape)}.")
    for a, (t, n) in enumerate(zip(values, shape)):
        if n % t:
            raise PatternError(
                f"Invalid tile={tuple(values)} for grid {'x'.join(map(str, shape))}: "
                f"tile[{a}]={t} does not divide grid[{a}]={n}; the tiled order needs every "
                f"tile side to divide its axis (ragged edge tiles are not supported).")
    return tuple(int(v) for v in values)


# --------------------------------------------------------------------------------------------
# token orders: a row-major "virtual grid" whose boxes are boxes of the token grid


@dataclass(frozen=True)
class _Order:
    """A token order as row-major order on ``vshape``.

    Row-major: ``vshape`` is the grid. Tiled with tile ``t``: ``vshape`` is
    ``(n_1 / t_1, .., n_k / t_k, t_1, .., t_k)``, tile indices first, then in-tile offsets.
    """

    shape: tuple
    tile: tuple | None

    @property
    def vshape(self) -> tuple:
        if self.tile is None:
            return self.shape
        return tuple(n // t for n, t in zip(self.shape, self.tile)) + self.tile

    def permutation(self) -> np.ndarray:
        """Row-major token index of every layout position."""
        tokens = np.arange(math.prod(self.shape), dtype=np.int64)
        if self.tile is None:
            return tokens
        k = len(self.shape)
        split = tokens.reshape(tuple(v for n, t in zip(self.shape, self.tile)
                                     for v in (n // t, t)))
        return split.transpose([2 * a for a in range(k)] + [2 * a + 1 for a in range(k)]).ravel()

    def vbox_to_box(self, lo, hi):
        """Grid boxes of virtual boxes from :func:`_range_boxes` (always proper boxes)."""
        if self.tile is None:
            return lo, hi
        k = len(self.shape)
        t = np.asarray(self.tile)
        return lo[:, :k] * t + lo[:, k:], (hi[:, :k] - 1) * t + hi[:, k:]

    def box_to_vboxes(self, lo, hi):
        """Split grid boxes into virtual boxes: ``(owner, vlo, vhi)``, at most 3**k each."""
        if self.tile is None:
            return np.arange(len(lo)), lo, hi
        k = len(self.shape)
        t = np.asarray(self.tile)
        t0, t1 = lo // t, (hi - 1) // t
        u0, u1 = lo % t, (hi - 1) % t + 1
        # per axis: head (partial first tile), middle (whole tiles), tail (partial last tile)
        head_partial = (u0 != 0) | (t0 == t1)
        tail_partial = (u1 != t) & (t1 > t0)
        mid_lo = np.where(head_partial, t0 + 1, t0)
        mid_hi = np.where(tail_partial, t1, t1 + 1)
        mid_ok = (mid_hi > mid_lo) & ~((t0 == t1) & head_partial)
        head_u1 = np.where(t0 == t1, u1, t)
        pieces = np.stack([  # (m, k, 3 pieces, 4 values: tlo, thi, ulo, uhi)
            np.stack([t0, t0 + 1, u0, head_u1], -1),
            np.stack([mid_lo, mid_hi, np.zeros_like(t0), np.broadcast_to(t, t0.shape)], -1),
            np.stack([t1, t1 + 1, np.zeros_like(t0), u1], -1)], axis=2)
        valid = np.stack([head_partial, mid_ok, tail_partial], axis=2)
        combos = np.array(np.meshgrid(*[np.arange(3)] * k, indexing="ij")).reshape(k, -1).T
        ax = np.arange(k)
        sel = pieces[:, ax[None, :], combos]  # (m, combos, k, 4)
        ok = valid[:, ax[None, :], combos].all(-1)
        owner, which = np.nonzero(ok)
        chosen = sel[owner, which]
        vlo = np.concatenate([chosen[..., 0], chosen[..., 2]], axis=1)
        vhi = np.concatenate([chosen[..., 1], chosen[..., 3]], axis=1)
        return owner, vlo, vhi


def _strides(shape) -> np.ndarray:
    return np.array([math.prod(shape[j + 1:]) for j in range(len(shape))], dtype=np.int64)


def _range_boxes(vshape, starts, stops):
    """Split position ranges ``[starts, stops)`` of a row-major grid into boxes.

    Returns ``(owner, lo, hi)`` sorted by owner: at most ``2 * len(vshape) - 1`` boxes a range.
    A range first climbs (``[cur, next multiple of a coarser stride)``) and then descends.
    """
    d = len(vshape)
    strides = _strides(vshape)
    total = math.prod(vshape)
    vs = np.asarray(vshape, dtype=np.int64)
    cur = starts.astype(np.int64).copy()
    stops = stops.astype(np.int64)
    owners, los, his, order_keys = [], [], [], []

    def emit(mask, length, level, seq):
        idx = np.nonzero(mask & (length > 0))[0]
        if not len(idx):
            return
        p = cur[idx]
        coords = (p[:, None] // strides) % vs
        lo = coords.copy()
        hi = coords + 1
        hi[:, level] = coords[:, level] + length[idx] // strides[level]
        lo[:, level + 1:] = 0
        hi[:, level + 1:] = vs[level + 1:]
        owners.append(idx)
        los.append(lo)
        his.append(hi)
        order_keys.append(np.full(len(idx), seq))

    climbing = cur < stops
    broke = np.full(len(cur), d, dtype=np.int64)
    seq = 0
    for level in range(d - 1, -1, -1):
        upper = strides[level - 1] if level > 0 else total
        boundary = -(-cur // upper) * upper
        ok = climbing & (boundary <= stops)
        emit(ok, np.where(ok, boundary - cur, 0), level, seq)
        seq += 1
        cur = np.where(ok, boundary, cur)
        stop_here = climbing & ~ok
        broke[stop_here] = level
        climbing &= ok
    broke[climbing] = 0  # aligned to the whole grid (a start at 0): descend from the top
    for level in range(d):
        active = (broke <= level) & (cur < stops)
        amount = np.where(active, (stops - cur) // strides[level] * strides[level], 0)
        emit(active, amount, level, seq)
        seq += 1
        cur = cur + amount
    owner = np.concatenate(owners) if owners else np.zeros(0, np.int64)
    lo = np.concatenate(los) if los else np.zeros((0, d), np.int64)
    hi = np.concatenate(his) if his else np.zeros((0, d), np.int64)
    keys = np.concatenate(order_keys) if order_keys else np.zeros(0, np.int64)
    perm = np.lexsort((keys, owner))
    return owner[perm], lo[perm], hi[perm]


def _block_boxes(order: _Order, tokens: int, size: int):
    """Grid boxes of every block of ``size`` positions: ``(ptr, lo, hi)`` in CSR form."""
    nblocks = -(-tokens // size)
    starts = np.arange(nblocks, dtype=np.int64) * size
    owner, vlo, vhi = _range_boxes(order.vshape, starts, np.minimum(starts + size, tokens))
    lo, hi = order.vbox_to_box(vlo, vhi)
    ptr = np.zeros(nblocks + 1, dtype=np.int64)
    np.add.at(ptr, owner + 1, 1)
    return np.cumsum(ptr), lo, hi


# --------------------------------------------------------------------------------------------
# per-axis counting


class _AxisCount:
    """``G(a, b, c, d) = sum over q in [a, b) of |keys(q) & [c, d)|`` for one relation."""

    def __init__(self, rel: _ir.Rel, n: int):
        q = np.arange(n, dtype=np.int64)
        start, stop = rel.bounds(q, n, _ir.NUMPY_OPS)
        start = np.broadcast_to(np.asarray(start, dtype=np.int64), (n,))
        stop = np.broadcast_to(np.asarray(stop, dtype=np.int64), (n,))
        self.step = int(rel.step)
        self.n = n
        self.start = start
        self.length = np.maximum(stop - start + self.step - 1, 0) // self.step
        self.stop = np.maximum(stop, start)  # empty rows normalised to [s, s)
        nonempty = self.length > 0
        self.reach_lo = np.where(nonempty, start, n)   # for reachable-key bounding boxes
        self.reach_hi = np.where(nonempty, stop, 0)
        if n <= TABLE_MAX_AXIS:
            c = np.arange(n + 1, dtype=np.int64)
            below = np.clip(-(-(c[None, :] - start[:, None]) // self.step), 0,
                            self.length[:, None])
            self.table = np.zeros((n + 1, n + 1), dtype=np.int64)
            np.cumsum(below, axis=0, out=self.table[1:])
            self.mode = "table"
        elif self.step == 1 and (np.diff(start) >= 0).all() and (np.diff(self.stop) >= 0).all():
            self.prefix_start = np.concatenate([[0], np.cumsum(start)])
            self.prefix_stop = np.concatenate([[0], np.cumsum(self.stop)])
            self.mode = "monotone"
        else:
            self.mode = "direct"

    def __call__(self, a, b, c, d) -> np.ndarray:
        if self.mode == "table":
            t = self.table
            return t[b, d] - t[a, d] - t[b, c] + t[a, c]
        if self.mode == "monotone":
            # |[s, e) & [c, d)| = clip(e, c, d) - clip(s, c, d) for s <= e
            return (_sum_clip(self.stop, self.prefix_stop, a, b, c, d)
                    - _sum_clip(self.start, self.prefix_start, a, b, c, d))
        return self._direct(a, b, c, d)

    def _direct(self, a, b, c, d):
        out = np.zeros(len(a), dtype=np.int64)
        lengths = b - a
        bounds = np.concatenate([[0], np.cumsum(lengths)])
        begin = 0
        while begin < len(a):
            end = int(np.searchsorted(bounds, bounds[begin] + _CHUNK, "right")) - 1
            end = max(end, begin + 1)
            rows = np.arange(begin, end)
            reps = lengths[rows]
            owner = np.repeat(rows, reps)
            q = a[owner] + np.arange(reps.sum()) - np.repeat(bounds[rows] - bounds[begin], reps)
            s, ln = self.start[q], self.length[q]
            below_d = np.clip(-(-(d[owner] - s) // self.step), 0, ln)
            below_c = np.clip(-(-(c[owner] - s) // self.step), 0, ln)
            out[begin:end] = np.bincount(owner - begin, below_d - below_c, end - begin)
            begin = end
        return out


def _sum_clip(x, prefix, a, b, c, d):
    """``sum(clip(x[q], c, d) for q in [a, b))`` for non-decreasing ``x``, vectorised."""
    lo = np.clip(np.searchsorted(x, c, "left"), a, b)   # x[q] < c before lo
    hi = np.clip(np.searchsorted(x, d, "right"), a, b)  # x[q] > d from hi
    hi = np.maximum(hi, lo)
    return c * (lo - a) + d * (b - hi) + prefix[hi] - prefix[lo]


def _range_reduce(ufunc, x, lo, hi):
    """``ufunc.reduce(x[lo:hi])`` for many non-empty intervals, O(len(x) + intervals)."""
    pairs, inverse = np.unique(np.stack([lo, hi], 1), axis=0, return_inverse=True)
    ext = np.concatenate([x, x[-1:]])  # hi may equal len(x)
    res = ufunc.reduceat(ext, pairs.reshape(-1))[::2]
    return res[inverse.reshape(-1)]


# --------------------------------------------------------------------------------------------
# the layout of one pattern


def _candidates(head: _ir.IR, shape, order: _Order, qptr, qlo, qhi, bk: int, counters):
    """Sorted unique ``qblock * kv_blocks + kblock`` codes of tiles that may be non-empty."""
    tokens = math.prod(shape)
    nkb = -(-tokens // bk)
    qowner = np.repeat(np.arange(len(qptr) - 1), np.diff(qptr))
    codes = []
    for term in head.terms:
        klo = np.empty_like(qlo)
        khi = np.empty_like(qhi)
        for a, (rel, n) in enumerate(zip(term.rels, shape)):
            cnt = counters(rel, n)
            klo[:, a] = _range_reduce(np.minimum, cnt.reach_lo, qlo[:, a], qhi[:, a])
            khi[:, a] = _range_reduce(np.maximum, cnt.reach_hi, qlo[:, a], qhi[:, a])
        ok = (khi > klo).all(1)
        owner, vlo, vhi = order.box_to_vboxes(klo[ok], khi[ok])
        owner = qowner[ok][owner]
        codes.append(_touched_blocks(order.vshape, owner, vlo, vhi, bk, nkb))
    return _sorted_unique(np.concatenate(codes)) if codes else np.zeros(0, np.int64)


def _sorted_unique(x):
    """``np.unique`` for codes that usually arrive sorted (one pass, no hashing then)."""
    step = np.diff(x)
    if (step < 0).any():
        x = np.sort(x)
        step = np.diff(x)
    return x[np.concatenate([[True], step != 0])]


def _touched_blocks(vshape, owner, vlo, vhi, bk, nkb):
    """Codes ``owner * nkb + kblock`` of the key blocks that virtual boxes overlap."""
    vs = np.asarray(vshape, dtype=np.int64)
    strides = _strides(vshape)
    d = len(vshape)
    full = (vlo == 0) & (vhi == vs)
    # run axis: the first axis after which every axis is whole (those merge into one run)
    trailing_full = np.flip(np.cumprod(np.flip(full, 1), axis=1), 1)  # all axes >= a full
    after = np.concatenate([trailing_full[:, 1:], np.ones((len(vlo), 1), bool)], 1)
    run_axis = np.argmax(after, axis=1)
    ext = vhi - vlo
    outer = np.arange(d)[None, :] < run_axis[:, None]
    radix = np.where(outer, ext, 1)
    nruns = radix.prod(1)
    item = np.repeat(np.arange(len(vlo)), nruns)
    r = np.arange(nruns.sum()) - np.repeat(np.cumsum(nruns) - nruns, nruns)
    start = np.zeros(len(item), dtype=np.int64)
    for a in range(d - 1, -1, -1):
        rad = radix[item, a]
        start += (vlo[item, a] + np.where(outer[item, a], r % rad, 0)) * strides[a]
        r //= rad
    ra = run_axis[item]
    length = ext[item, ra] * strides[ra]
    first = start // bk
    last = (start + length - 1) // bk
    span = last - first + 1
    base = np.repeat(owner[item] * nkb + first, span)
    return base + np.arange(span.sum()) - np.repeat(np.cumsum(span) - span, span)


def _count_tiles(head, shape, codes, nkb, qptr, qlo, qhi, kptr, klo, khi, counters):
    """Exact attended pairs in each candidate tile (inclusion-exclusion over box pairs)."""
    qb, kb = codes // nkb, codes % nkb
    nq = qptr[qb + 1] - qptr[qb]
    nk = kptr[kb + 1] - kptr[kb]
    tot = nq * nk
    owner = np.repeat(np.arange(len(codes)), tot)
    local = np.arange(tot.sum()) - np.repeat(np.cumsum(tot) - tot, tot)
    qi = qptr[qb][owner] + local // nk[owner]
    ki = kptr[kb][owner] + local % nk[owner]
    pairs = np.zeros(len(owner), dtype=np.int64)
    for sign, term in head.pieces():
        prod = np.ones(len(owner), dtype=np.int64)
        for a, (rel, n) in enumerate(zip(term.rels, shape)):
            prod *= counters(rel, n)(qlo[qi, a], qhi[qi, a], klo[ki, a], khi[ki, a])
        pairs += sign * prod
    return np.bincount(owner, pairs, len(codes)).astype(np.int64) if len(codes) else pairs


def _build(head: _ir.IR, shape, block, tile) -> "Layout":
    bq, bk = block
    tokens = math.prod(shape)
    order = _Order(shape, tile)
    cache = {}

    def counters(rel, n):
        key = (rel, n)
        if key not in cache:
            cache[key] = _AxisCount(rel, n)
        return cache[key]

    qptr, qlo, qhi = _block_boxes(order, tokens, bq)
    kptr, klo, khi = _block_boxes(order, tokens, bk)
    nkb = len(kptr) - 1
    codes = _candidates(head, shape, order, qptr, qlo, qhi, bk, counters)
    counts = _count_tiles(head, shape, codes, nkb, qptr, qlo, qhi, kptr, klo, khi, counters)
    qb, kb = codes // nkb, codes % nkb
    area = np.minimum(bq, tokens - qb * bq) * np.minimum(bk, tokens - kb * bk)
    if (counts > area).any() or (counts < 0).any():  # an internal invariant, not user input
        raise PatternError(f"Layout counting failed for {head.label} on {shape}; please report.")
    full = counts == area
    partial = (counts > 0) & ~full
    nqb = len(qptr) - 1
    return Layout(
        ir=head, shape=tuple(shape), block=(bq, bk), tile=tile,
        full_ptr=_ptr(qb[full], nqb), full_idx=kb[full],
        partial_ptr=_ptr(qb[partial], nqb), partial_idx=kb[partial],
        partial_pairs=counts[partial], attended_pairs=int(counts.sum()))


def _ptr(rows, nrows):
    return np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=nrows))]).astype(np.int64)


# --------------------------------------------------------------------------------------------
# public objects


@dataclass(frozen=True, eq=False)
class Layout:
    """The block-sparse layout of one pattern: full and partial tiles per query block.

    Positions ``0 .. tokens-1`` are the tokens in layout order (:attr:`permutation` gives the
    row-major token at each position). Query block ``i`` holds positions
    ``[i * Bq, min((i + 1) * Bq, tokens))``, key block ``j`` likewise with ``Bk``; the last block
    of each may be short (ragged). A tile is *full* when every one of its (true, unpadded)
    pairs is attended, *partial* when some are, and absent when none are. The format is CSR
    per query block, full and partial kept apart (FlexAttention's ``BlockMask`` pairs):

    - ``full_ptr`` (query blocks + 1,), ``full_idx``: key blocks of query block ``i`` that are
      full are ``full_idx[full_ptr[i]:full_ptr[i + 1]]``, ascending;
    - ``partial_ptr``, ``partial_idx``: the same for partial tiles, and ``partial_pairs`` their
      attended-pair counts.

    To reconstruct :meth:`to_dense` (0 empty, 1 partial, 2 full)::

        dense = np.zeros((lay.q_blocks, lay.kv_blocks), dtype=np.int8)
        for i in range(lay.q_blocks):
            dense[i, lay.partial[i]] = 1
            dense[i, lay.full[i]] = 2

    Attributes:
        ir: the lowered pattern (one head).
        shape: the numeric grid.
        block: ``(Bq, Bk)``.
        tile: tile shape for the tiled order, ``None`` for row-major.
        full_ptr, full_idx, partial_ptr, partial_idx, partial_pairs: the CSR arrays above.
        attended_pairs: exact attended (query, key) pairs.

    Example:
        >>> import patterngen as pg
        >>> lay = layout(pg.block(2), grid=(4, 4), block=4, order="tiled", tile=(2, 2))
        >>> lay.full[0], lay.partial[0], lay.waste
        (array([0]), array([], dtype=int64), 1.0)
    """

    ir: _ir.IR
    shape: tuple
    block: tuple
    tile: tuple | None
    full_ptr: np.ndarray = field(repr=False)
    full_idx: np.ndarray = field(repr=False)
    partial_ptr: np.ndarray = field(repr=False)
    partial_idx: np.ndarray = field(repr=False)
    partial_pairs: np.ndarray = field(repr=False)
    attended_pairs: int = 0

    @property
    def order(self) -> str:
        return "row-major" if self.tile is None else "tiled"

    @property
    def tokens(self) -> int:
        return math.prod(self.shape)

    @property
    def q_blocks(self) -> int:
        return len(self.full_ptr) - 1

    @property
    def kv_blocks(self) -> int:
        return -(-self.tokens // self.block[1])

    @property
    def permutation(self) -> np.ndarray:
        """Row-major token index at each layout position (``arange`` for row-major)."""
        return _Order(self.shape, self.tile).permutation()

    @property
    def full(self) -> list[np.ndarray]:
        """Per query block, the key blocks whose every pair is attended."""
        return np.split(self.full_idx, self.full_ptr[1:-1])

    @property
    def partial(self) -> list[np.ndarray]:
        """Per query block, the key blocks with some but not all pairs attended."""
        return np.split(self.partial_idx, self.partial_ptr[1:-1])

    def _rows(self, ptr):
        return np.repeat(np.arange(self.q_blocks), np.diff(ptr))

    def _area(self, rows, cols):
        bq, bk = self.block
        return (np.minimum(bq, self.tokens - rows * bq).astype(np.int64)
                * np.minimum(bk, self.tokens - cols * bk))

    @property
    def executed_pairs(self) -> int:
        """Pairs a block-sparse kernel computes: every non-empty tile's true (ragged) area."""
        return int(self._area(self._rows(self.full_ptr), self.full_idx).sum()
                   + self._area(self._rows(self.partial_ptr), self.partial_idx).sum())

    @property
    def waste(self) -> float:
        """``executed_pairs / attended_pairs`` (1.0 is perfect; ``nan`` for no pairs)."""
        return self.executed_pairs / self.attended_pairs if self.attended_pairs else math.nan

    @property
    def num_full(self) -> int:
        return len(self.full_idx)

    @property
    def num_partial(self) -> int:
        return len(self.partial_idx)

    def to_dense(self) -> np.ndarray:
        """``(q_blocks, kv_blocks)`` int8 array: 0 empty, 1 partial, 2 full."""
        dense = np.zeros((self.q_blocks, self.kv_blocks), dtype=np.int8)
        dense[self._rows(self.partial_ptr), self.partial_idx] = 1
        dense[self._rows(self.full_ptr), self.full_idx] = 2
        return dense

    def tiles(self, pad_ragged: bool = False):
        """All non-empty tiles as ``(rows, cols, is_full)`` arrays, row by row.

        Args:
            pad_ragged: count a ragged edge tile as partial, as FlexAttention's
                ``create_block_mask`` does (it pads the mask with ``False`` to whole blocks).
        """
        rows = np.concatenate([self._rows(self.full_ptr), self._rows(self.partial_ptr)])
        cols = np.concatenate([self.full_idx, self.partial_idx])
        is_full = np.arange(len(rows)) < self.num_full
        if pad_ragged:
            bq, bk = self.block
            is_full &= ((rows + 1) * bq <= self.tokens) & ((cols + 1) * bk <= self.tokens)
        order = np.lexsort((cols, rows))
        return rows[order], cols[order], is_full[order]

    def masks(self, rows, cols) -> np.ndarray:
        """Boolean ``(len(rows), Bq, Bk)`` masks of the given tiles (padding positions False).

        Evaluated from the IR on the tiles' own tokens: memory is per requested tile.
        """
        bq, bk = self.block
        perm = self.permutation
        tokens = self.tokens
        qpos = np.asarray(rows, dtype=np.int64)[:, None] * bq + np.arange(bq)
        kpos = np.asarray(cols, dtype=np.int64)[:, None] * bk + np.arange(bk)
        qtok = perm[np.minimum(qpos, tokens - 1)]
        ktok = perm[np.minimum(kpos, tokens - 1)]
        qc = np.unravel_index(qtok, self.shape)
        kc = np.unravel_index(ktok, self.shape)
        out = np.zeros((len(qpos), bq, bk), dtype=bool)
        for term in self.ir.terms:
            out |= term.contains([c[:, :, None] for c in qc], [c[:, None, :] for c in kc],
                                 self.shape, _ir.NUMPY_OPS)
        out &= (qpos < tokens)[:, :, None] & (kpos < tokens)[:, None, :]
        return out

    def summary(self) -> str:
        """One line: blocks, full / partial counts, executed vs attended pairs, waste."""
        order = self.order + (f" {'x'.join(map(str, self.tile))}" if self.tile else "")
        cells = self.q_blocks * self.kv_blocks
        return (f"{self.ir.label or 'pattern'} on {'x'.join(map(str, self.shape))}, "
                f"block={self.block}, order={order}: {self.q_blocks}x{self.kv_blocks} blocks, "
                f"{self.num_full} full, {self.num_partial} partial "
                f"(block density {100 * (self.num_full + self.num_partial) / cells:.2f}%); "
                f"executed {self.executed_pairs} pairs for {self.attended_pairs} attended "
                f"(waste {self.waste:.2f}x)")

    def picture(self, max_cells: int = 32) -> str:
        """ASCII picture: ``█`` full, ``░`` partial, blank empty; big layouts are summarised.

        A character cell covering several tiles is ``█`` when all are full, blank when all are
        empty and ``░`` otherwise (FlexAttention's ``BlockMask.to_string`` convention).
        """
        nq, nk = self.q_blocks, self.kv_blocks
        rs, cs = -(-nq // max_cells), -(-nk // max_cells)
        rows_, cols_ = -(-nq // rs), -(-nk // cs)
        fr, pr = self._rows(self.full_ptr), self._rows(self.partial_ptr)
        full = np.bincount((fr // rs) * cols_ + self.full_idx // cs, minlength=rows_ * cols_)
        part = np.bincount((pr // rs) * cols_ + self.partial_idx // cs, minlength=rows_ * cols_)
        r, c = np.divmod(np.arange(rows_ * cols_), cols_)
        size = (np.minimum(rs, nq - r * rs) * np.minimum(cs, nk - c * cs))
        chars = np.where(full == size, "██", np.where(full + part == 0, "  ", "░░"))
        return "\n".join("".join(row) for row in chars.reshape(rows_, cols_))

    def __str__(self) -> str:
        return self.summary() + "\n" + self.picture()


@dataclass(frozen=True, eq=False)
class HeadsLayout:
    """Layouts of a :func:`heads` pattern: one :class:`Layout` per listed pattern.

    Head ``h`` uses ``heads[h % len(heads)]``; pair counts add up over the listed patterns
    (one head each).

    Attributes:
        heads: one layout per listed pattern, all with the same block size and order.
    """

    heads: tuple

    def _sum(self, name):
        return sum(getattr(h, name) for h in self.heads)

    @property
    def executed_pairs(self) -> int:
        return self._sum("executed_pairs")

    @property
    def attended_pairs(self) -> int:
        return self._sum("attended_pairs")

    @property
    def waste(self) -> float:
        return self.executed_pairs / self.attended_pairs if self.attended_pairs else math.nan

    @property
    def full(self) -> tuple:
        return tuple(h.full for h in self.heads)

    @property
    def partial(self) -> tuple:
        return tuple(h.partial for h in self.heads)

    @property
    def permutation(self) -> np.ndarray:
        return self.heads[0].permutation

    def __getattr__(self, name):
        # shared geometry (block, tile, order, shape, q_blocks, ...) comes from the first head
        if name in ("block", "tile", "order", "shape", "tokens", "q_blocks", "kv_blocks"):
            return getattr(self.heads[0], name)
        raise AttributeError(name)

    def to_dense(self) -> np.ndarray:
        """``(patterns, q_blocks, kv_blocks)``: 0 empty, 1 partial, 2 full."""
        return np.stack([h.to_dense() for h in self.heads])

    def __str__(self) -> str:
        return "\n".join(f"head {i}: {h}" for i, h in enumerate(self.heads))


def _partition_side(rel: _ir.Rel, n: int, strided: bool):
    """Tile side on one axis of a term that partitions it, or ``None``: a whole axis, ``Eq``
    (1), an offset-0 ``Block`` (its size) and, with ``strided``, an undilated ``Window`` (its
    stride: the queries of a group share their keys)."""
    atoms = rel.atoms
    if not atoms:
        return n
    if atoms == (_ir.Eq(),):
        return 1
    if len(atoms) == 1 and isinstance(atoms[0], _ir.Block) and atoms[0].offset == 0:
        return int(atoms[0].size)
    if strided and len(atoms) == 1 and isinstance(atoms[0], _ir.Window) \
            and atoms[0].dilation == 1:
        return int(atoms[0].stride)
    return None


def _term_tiles(heads, shape, strided: bool) -> list[tuple]:
    found = []
    for head in heads:
        for term in head.terms:
            sides = [_partition_side(rel, n, strided) for rel, n in zip(term.rels, shape)]
            if None in sides or tuple(sides) in found:
                continue
            if strided and not any(isinstance(a, _ir.Window) and a.stride != 1
                                   for r in term.rels for a in r.atoms):
                continue  # no strided window: aligned_tiles already has it
            if all(n % t == 0 for n, t in zip(shape, sides)):
                found.append(tuple(sides))
    return found


def aligned_tiles(heads, shape) -> list[tuple]:
    """Tiles of the partitions a pattern is made of (Swin windows, areas, stripes).

    A term whose every axis is a whole axis, ``Eq`` or an offset-0 ``Block`` dividing its axis
    is block-diagonal in the tiled order with that tile: every non-empty tile is full.

    Example:
        >>> import patterngen as pg
        >>> aligned_tiles(pg.lower(pg.block(7), (56, 56)).per_head, (56, 56))
        [(7, 7)]
    """
    return _term_tiles(heads, shape, strided=False)


def _group_tiles(heads, shape) -> list[tuple]:
    """Tiles of strided windows' query groups (NATTEN's stride): a tile's queries share keys.

    Where the groups' windows also start on tile boundaries (sliding-tile attention, e.g.
    size ``3 * stride`` on a divisible axis), every non-empty tile in this order is full.

    Example:
        >>> import patterngen as pg
        >>> _group_tiles(pg.lower(pg.window((3, 24, 24), stride=(1, 8, 8)), (6, 48, 48))
        ...              .per_head, (6, 48, 48))
        [(1, 8, 8)]
    """
    return _term_tiles(heads, shape, strided=True)


def _tile_candidates(heads, shape, bq) -> list[tuple]:
    """Tiles worth trying: the pattern's own aligned partitions and strided windows' query
    groups, then near-cubic tiles of about ``Bq`` tokens (every side dividing its axis)."""
    k = len(shape)
    if k == 1:
        return []
    found = aligned_tiles(heads, shape) + _group_tiles(heads, shape)
    divisors = [[t for t in range(1, n + 1) if n % t == 0] for n in shape]
    cubic = []
    for combo in np.array(np.meshgrid(*divisors, indexing="ij")).reshape(k, -1).T:
        vol = int(np.prod(combo))
        if vol <= 1 or vol == math.prod(shape):
            continue
        spread = math.log(max(combo) / min(combo))
        cubic.append((abs(math.log(vol / bq)), spread, tuple(int(t) for t in combo)))
    cubic.sort()
    out = []
    for t in found + [c[2] for c in cubic]:
        if t not in out and tuple(t) != tuple(shape):
            out.append(t)
    return out[:_MAX_TILE_CANDIDATES]


def layout(pattern, grid=None, block=(128, 128), order="row-major", tile=None):
    """Block-sparse layout of ``pattern`` on ``grid``: full and partial tiles per query block.

    Args:
        pattern: a spec or a lowered IR (numeric grid).
        grid: the token grid, e.g. ``(256, 256)``.
        block: ``(Bq, Bk)`` positions per query / key block, or one integer for both.
        order: ``"row-major"``; ``"tiled"`` (each ``tile`` contiguous, tiles and in-tile
            positions row-major; every tile side must divide its axis); or ``"auto"``, which
            keeps whichever of row-major and a few tiled orders executes the fewest pairs.
        tile: tile shape for ``"tiled"``/``"auto"`` (checked, then unused by ``"row-major"``);
            ``None`` tries the pattern's own aligned partitions (e.g. Swin's windows) and
            near-cubic tiles of about ``Bq`` tokens.

    Returns:
        :class:`Layout`, or :class:`HeadsLayout` for :func:`heads` patterns.

    Raises:
        PatternError: for non-positive block sizes, an unknown order, a tile that does not
            divide the grid, or a symbolic grid.

    Example:
        >>> import patterngen as pg
        >>> lay = layout(pg.window(7), grid=(256, 256), block=(128, 128))
        >>> lay.q_blocks, round(lay.waste, 2)
        (512, 36.57)
    """
    lowered = as_ir(pattern, grid)
    shape = lowered.grid.require_numeric("layout")
    limits.check("PATTERNGEN_MAX_TOKENS", math.prod(shape),
                 f"layout: grid {lowered.grid}'s tokens")
    block = _check_block(block)
    if order not in ORDERS:
        raise PatternError(f"Unknown order={order!r}; expected one of {ORDERS}.")
    if tile is not None:
        tile = _check_tile(tile, shape)
    heads = lowered.per_head

    def build(t):
        built = tuple(_build(h, shape, block, t) for h in heads)
        return built[0] if isinstance(lowered, _ir.IR) else HeadsLayout(built)

    if order == "row-major":
        return build(None)
    tiles = [tile] if tile is not None else _tile_candidates(heads, shape, block[0])
    if order == "tiled" and not tiles:
        raise PatternError(
            f"order='tiled' found no tile for grid {'x'.join(map(str, shape))}; pass tile=..., "
            f"with every side dividing its axis.")
    options = ([build(None)] if order == "auto" else []) + [build(t) for t in tiles]
    return min(options, key=lambda lay: lay.executed_pairs)
