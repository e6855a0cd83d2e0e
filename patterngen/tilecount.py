"""Attended pairs of (query block, key block) tiles, counted per axis from a pattern's per-query
key bounds, in time proportional to the non-empty tiles, never with a tokens x tokens array."""

from __future__ import annotations

import math

import numpy as np

from . import ir
from .orders import TokenOrder, row_strides

__all__ = ["TABLE_MAX_AXIS", "AxisCount", "candidate_tiles", "count_tiles"]

#: axes up to this length get an exact (n + 1) x (n + 1) prefix table of per-axis pair counts
TABLE_MAX_AXIS = 1024
#: elements per chunk when a long axis must be summed query by query (dilated long axes)
_CHUNK = 1 << 22


class AxisCount:
    """``G(a, b, c, d) = sum over q in [a, b) of |keys(q) & [c, d)|`` for one relation.

    Keys lie on an axis of ``n``; the queries on one of ``nq`` (default ``n``), each with the
    keys of the key coordinate it sits over (:func:`patterngen.ir.center`).
    """

    def __init__(self, rel: ir.Rel, n: int, nq: int | None = None):
        nq = n if nq is None else nq
        q = np.arange(nq, dtype=np.int64)
        start, stop = rel.bounds(q, n, ir.NUMPY_OPS, nq)
        start = np.broadcast_to(np.asarray(start, dtype=np.int64), (nq,))
        stop = np.broadcast_to(np.asarray(stop, dtype=np.int64), (nq,))
        self.step = int(rel.step)
        self.n = n
        self.start = start
        self.length = np.maximum(stop - start + self.step - 1, 0) // self.step
        self.stop = np.maximum(stop, start)  # empty rows normalised to [s, s)
        nonempty = self.length > 0
        self.reach_lo = np.where(nonempty, start, n)   # for reachable-key bounding boxes
        self.reach_hi = np.where(nonempty, stop, 0)
        if max(n, nq) <= TABLE_MAX_AXIS:
            c = np.arange(n + 1, dtype=np.int64)
            below = np.clip(-(-(c[None, :] - start[:, None]) // self.step), 0,
                            self.length[:, None])
            self.table = np.zeros((nq + 1, n + 1), dtype=np.int64)
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


def candidate_tiles(head: ir.IR, order: TokenOrder, qptr, qlo, qhi, bk: int, counters):
    """Sorted unique ``qblock * kv_blocks + kblock`` codes of tiles that may be non-empty.

    ``order`` is the keys' token order; ``counters(rel, a)`` the :class:`AxisCount` of
    ``rel`` on axis ``a``.
    """
    tokens = math.prod(order.shape)
    nkb = -(-tokens // bk)
    qowner = np.repeat(np.arange(len(qptr) - 1), np.diff(qptr))
    codes = []
    for term in head.terms:
        klo = np.empty_like(qlo)
        khi = np.empty_like(qhi)
        for a, rel in enumerate(term.rels):
            cnt = counters(rel, a)
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
    strides = row_strides(vshape)
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


def count_tiles(head, codes, nkb, qptr, qlo, qhi, kptr, klo, khi, counters):
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
        for a, rel in enumerate(term.rels):
            prod *= counters(rel, a)(qlo[qi, a], qhi[qi, a], klo[ki, a], khi[ki, a])
        pairs += sign * prod
    return np.bincount(owner, pairs, len(codes)).astype(np.int64) if len(codes) else pairs
