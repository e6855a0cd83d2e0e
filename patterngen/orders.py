"""Token orders (row-major, or tiled: each tile contiguous) as row-major order on a *virtual
grid*, and how runs of consecutive positions of such an order cut into boxes of the grid."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["TokenOrder", "row_strides", "range_boxes", "block_boxes"]


@dataclass(frozen=True)
class TokenOrder:
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
        """Grid boxes of virtual boxes from :func:`range_boxes` (always proper boxes)."""
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


def row_strides(shape) -> np.ndarray:
    return np.array([math.prod(shape[j + 1:]) for j in range(len(shape))], dtype=np.int64)


def range_boxes(vshape, starts, stops):
    """Split position ranges ``[starts, stops)`` of a row-major grid into boxes.

    Returns ``(owner, lo, hi)`` sorted by owner: at most ``2 * len(vshape) - 1`` boxes a range.
    A range first climbs (``[cur, next multiple of a coarser stride)``) and then descends.
    """
    d = len(vshape)
    strides = row_strides(vshape)
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


def block_boxes(order: TokenOrder, tokens: int, size: int):
    """Grid boxes of every block of ``size`` positions: ``(ptr, lo, hi)`` in CSR form."""
    nblocks = -(-tokens // size)
    starts = np.arange(nblocks, dtype=np.int64) * size
    owner, vlo, vhi = range_boxes(order.vshape, starts, np.minimum(starts + size, tokens))
    lo, hi = order.vbox_to_box(vlo, vhi)
    ptr = np.zeros(nblocks + 1, dtype=np.int64)
    np.add.at(ptr, owner + 1, 1)
    return np.cumsum(ptr), lo, hi
