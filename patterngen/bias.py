"""Relative position bias: a table indexed by key minus query on every axis, and softcap.

A pattern's *reach* on axis ``a`` is the largest ``|key[a] - query[a]|`` over its attended
pairs (with keys on another grid, ``|key[a] - c(query)[a]|``, the key coordinate the query
sits over: :func:`patterngen.ir.center`). A bias table for it has shape
``(heads or 1, 2 * reach[0] + 1, 2 * reach[1] + 1, ...)``
and the score of the pair ``(query, key)`` under head ``h`` gains
``table[h, key[0] - query[0] + reach[0], key[1] - query[1] + reach[1], ...]`` (row 0 for every
head when the first dimension is 1). With ``softcap=c`` the scaled score ``s`` becomes
``c * tanh(s / c)`` before the bias is added.

:func:`reach` reads the IR's per-axis progressions, O(axis length) per term and axis, never
tokens x tokens. :func:`from_swin` converts timm's and the original Swin's table, which is
indexed by query minus key; docs/bias.md covers NATTEN's ``rpb`` and ALiBi.

Example:
    >>> import patterngen as pg
    >>> reach(pg.lower(pg.block(7, offset=3), (56, 56)))
    (6, 6)
    >>> reach(pg.lower(pg.window(3, dilation=2), 20))   # clamped: query 0 sees 0, 2, 4
    (4,)
"""

from __future__ import annotations

import math

import numpy as np

from . import ir as _ir
from .errors import PatternError

__all__ = ["reach", "table_shape", "axis_offsets", "offset_index", "coordinates", "check_softcap",
           "from_swin", "alibi"]


def _axis_reach(rel: _ir.Rel, n: int, nq: int | None = None) -> int:
    """Largest ``|key - query|`` on one axis of length ``n`` over queries that have keys; with
    ``nq`` queries over the keys, ``|key - c(query)|`` (:func:`patterngen.ir.center`)."""
    nq = n if nq is None else nq
    i = np.arange(nq, dtype=np.int64)
    start, stop = rel.bounds(i, n, _ir.NUMPY_OPS, nq)
    i = _ir.center(i, nq, n)
    start, stop = np.broadcast_to(start, i.shape), np.broadcast_to(stop, i.shape)
    step = int(rel.step)
    has = stop > start
    if not has.any():
        return 0
    # an intersection's stop need not be tight: the last key is the progression's last term
    first = start[has]
    last = first + (stop[has] - first - 1) // step * step
    return int(max((i[has] - first).max(), (last - i[has]).max()))


def reach(ir_) -> tuple[int, ...]:
    """Per axis, the largest ``|key - query|`` over the pattern's attended pairs.

    Exact and computed from the IR's per-axis bounds: a separable term's pairs are the product
    of its per-axis relations, so when every axis has a key for some query coordinate, every
    coordinate with keys on axis ``a`` is part of an attended pair. Per-head patterns take the
    largest reach over their listed patterns (one table serves every head).

    Args:
        ir_: an :class:`~patterngen.ir.IR` or ``HeadsIR`` on a numeric grid.

    Raises:
        PatternError: for a symbolic grid.
    """
    shape = [int(n) for n in ir_.grid.require_numeric("reach")]
    keys = [int(n) for n in ir_.keys.require_numeric("reach")]
    out = [0] * len(shape)
    for head in ir_.patterns:
        for term in head.terms:
            if not all(c.any() for c in term.counts(shape, keys)):
                continue  # no pair on this grid
            for a, (rel, n, nk) in enumerate(zip(term.rels, shape, keys)):
                out[a] = max(out[a], _axis_reach(rel, nk, n))
    return tuple(out)


def table_shape(reach_: tuple, heads: int | str = "heads") -> tuple:
    """``(heads, 2 * reach[0] + 1, ...)``: the shape of a table for ``reach_``."""
    return (heads, *(2 * r + 1 for r in reach_))


def axis_offsets(qc, kc, reach_, ops=_ir.NUMPY_OPS) -> list:
    """Per axis, the table position ``key - query + reach`` of query and key coordinates.

    ``qc`` and ``kc`` hold one coordinate array (numpy or torch, broadcasting) per axis. Offsets
    beyond the reach are clipped into the table: they belong to pairs outside the pattern,
    which the mask removes, and clipping keeps every gather in bounds.
    """
    return [ops.min(ops.max(k - q + r, 0), 2 * r) for q, k, r in zip(qc, kc, reach_)]


def offset_index(qc, kc, reach_, ops=_ir.NUMPY_OPS):
    """Flat index into a table's ``(2 * reach[a] + 1, ...)`` part (see :func:`axis_offsets`)."""
    flat = 0
    for o, r in zip(axis_offsets(qc, kc, reach_, ops), reach_):
        flat = flat * (2 * r + 1) + o
    return flat


def coordinates(tokens, shape) -> list:
    """Row-major coordinates of token indices (numpy or torch integer arrays), one per axis."""
    out = []
    for a, n in enumerate(shape):
        stride = math.prod(shape[a + 1:])
        x = tokens if stride == 1 else tokens // stride
        out.append(x if a == 0 else x % n)
    return out


def check_softcap(softcap):
    """``None``, or ``softcap`` as a float ``> 0``.

    Raises:
        PatternError: for a non-number, a bool, or a value that is not finite and ``> 0``.
    """
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float, np.floating,
                                                             np.integer)):
        raise PatternError(f"Invalid softcap={softcap!r}; expected None or a float > 0 "
                           f"(scores become softcap * tanh(score / softcap)).")
    if not (math.isfinite(softcap) and softcap > 0):
        raise PatternError(f"Invalid softcap={softcap!r}; softcap must be finite and > 0 "
                           f"(None turns it off).")
    return float(softcap)


def from_swin(table, window, reach_=None):
    """timm's / Swin's ``relative_position_bias_table`` as a patterngen table.

    Swin stores ``((2 M_h - 1) * (2 M_w - 1), heads)`` entries indexed by *query minus key*,
    ``(q_y - k_y + M_h - 1) * (2 M_w - 1) + (q_x - k_x + M_w - 1)`` (timm's
    ``get_relative_position_index``). patterngen indexes by key minus query with heads first,
    so the conversion is a reshape, a transpose and a flip of both offset axes; gradients flow
    through it.

    Args:
        table: ``((2 M_h - 1) * (2 M_w - 1), heads)`` torch tensor.
        window: ``M`` or ``(M_h, M_w)``.
        reach_: the compiled pattern's reach; when smaller than ``M - 1`` (a grid smaller than
            the window) the centre of the table is kept.

    Returns:
        ``(heads, 2 M_h - 1, 2 M_w - 1)`` (or ``(heads, 2 reach + 1, ...)``).

    Example:
        >>> import torch
        >>> t = torch.arange(9.0)[:, None]          # M = 2, one head
        >>> from_swin(t, 2)[0, 2, 1]                 # key - query = (1, 0): swin's (-1, 0)
        tensor(1.)
    """
    window = (window, window) if isinstance(window, int) else tuple(window)
    spans = tuple(2 * m - 1 for m in window)
    if table.dim() != 2 or table.shape[0] != math.prod(spans):
        raise PatternError(
            f"from_swin: table has shape {tuple(table.shape)}; a Swin table for window={window} "
            f"has shape ({math.prod(spans)}, heads).")
    out = table.reshape(*spans, table.shape[1]).permute(2, 0, 1).flip(1, 2)
    if reach_ is None:
        return out
    if len(reach_) != 2 or any(r > m - 1 for r, m in zip(reach_, window)):
        raise PatternError(f"from_swin: reach={tuple(reach_)} exceeds what window={window} "
                           f"covers (at most {tuple(m - 1 for m in window)} per axis).")
    return out[:, window[0] - 1 - reach_[0]:window[0] + reach_[0],
               window[1] - 1 - reach_[1]:window[1] + reach_[1]]


def alibi(slopes, reach_: int):
    """ALiBi as a 1-D table: ``table[h, o + reach] = -slopes[h] * |o|`` for ``o = key - query``.

    With ``causal()`` (keys at or before the query) this is Press et al.'s
    ``-m_h * (query - key)``.

    Example:
        >>> import torch
        >>> alibi(torch.tensor([0.5]), 2)
        tensor([[-1.0000, -0.5000, -0.0000, -0.5000, -1.0000]])
    """
    import torch

    offsets = torch.arange(-reach_, reach_ + 1, dtype=slopes.dtype, device=slopes.device)
    return -slopes[:, None] * offsets.abs()
