"""The dense oracle: materialised masks, text pictures, and masked softmax attention.

Everything here is O(tokens^2) and meant for tests and debugging; every backend is checked
against :func:`materialize` + :func:`dense_attention`.
"""

from __future__ import annotations

import math

import numpy as np

from . import ir, limits
from .errors import PatternError
from .parse import as_ir

__all__ = ["materialize", "show", "draw", "dense_attention"]

MAX_DENSE_TOKENS = 32768
MAX_LINE_TOKENS = 96
BAR_CELLS = 64


def _kron_bool(mats):
    out = mats[0]
    for m in mats[1:]:
        out = (out[:, None, :, None] & m[None, :, None, :]).reshape(
            out.shape[0] * m.shape[0], out.shape[1] * m.shape[1])
    return out


def _materialize_one(head: ir.IR) -> np.ndarray:
    shape = head.grid.require_numeric("materialize")
    tokens = int(np.prod(shape))
    if tokens > MAX_DENSE_TOKENS:
        raise PatternError(
            f"materialize builds a tokens x tokens array: tokens={tokens} exceeds "
            f"{MAX_DENSE_TOKENS}; use layout() or key_counts() for large grids."
        )
    mask = np.zeros((tokens, tokens), dtype=bool)
    for term in head.terms:
        per_axis = []
        for rel, n in zip(term.rels, shape):
            i = np.arange(n, dtype=np.int64)
            per_axis.append(np.asarray(rel.contains(i[:, None], i[None, :], n, ir.NUMPY_OPS)))
        mask |= _kron_bool(per_axis)
    return mask


def materialize(pattern, grid=None) -> np.ndarray:
    """Dense boolean mask ``[query, key]`` in row-major token order (for tests and debugging).

    Returns ``(tokens, tokens)``, or ``(len(patterns), tokens, tokens)`` for :func:`heads`.

    Example:
        >>> import patterngen as pg
        >>> pg.materialize(pg.window(3), grid=5).astype(int)
        array([[1, 1, 1, 0, 0],
               [1, 1, 1, 0, 0],
               [0, 1, 1, 1, 0],
               [0, 0, 1, 1, 1],
               [0, 0, 1, 1, 1]])
    """
    lowered = as_ir(pattern, grid)
    if isinstance(lowered, ir.HeadsIR):
        return np.stack([_materialize_one(h) for h in lowered.heads])
    return _materialize_one(lowered)


def show(pattern, grid=None, query=None, head: int = 0) -> str:
    """A text picture of the keys one query sees (``Q`` query, ``#`` key, ``.`` not seen).

    Args:
        pattern: a spec or IR.
        grid: numeric grid.
        query: coordinates of the query (default: the grid's centre).
        head: for :func:`heads` patterns, which head to draw.

    Example:
        >>> import patterngen as pg
        >>> print(pg.show(pg.window(3), grid=(4, 5), query=(0, 0)))
        window(3) on grid 4x5, query (0, 0): 9 keys; pattern density 45.0%
        Q # # . .
        # # # . .
        # # # . .
        . . . . .
    """
    lowered = as_ir(pattern, grid)
    one = lowered.per_head[ir.pattern_of_head(head, len(lowered.per_head))]
    shape = one.grid.require_numeric("show")
    if query is None:
        query = tuple(n // 2 for n in shape)
    query = tuple(query) if isinstance(query, (tuple, list)) else (query,)
    if len(query) != len(shape) or not all(0 <= q < n for q, n in zip(query, shape)):
        raise PatternError(f"Invalid query={query} for grid {one.grid}; expected coordinates "
                           f"0 <= q < n on each of the {len(shape)} axes.")
    limits.check("PATTERNGEN_MAX_TOKENS", math.prod(shape), f"show: grid {one.grid}'s tokens")
    keys = np.zeros(shape, dtype=bool)
    for term in one.terms:
        per_axis = []
        for rel, n, q in zip(term.rels, shape, query):
            p = np.arange(n, dtype=np.int64)
            per_axis.append(np.asarray(rel.contains(np.int64(q), p, n, ir.NUMPY_OPS)))
        keys |= _outer_bool(per_axis)
    tokens = int(np.prod(shape))
    density = one.pairs() / tokens ** 2
    lines = [f"{lowered.label} on grid {one.grid}, query {query}: {int(keys.sum())} keys; "
             f"pattern density {100 * density:.1f}%"]
    lines += draw(keys, query)
    return "\n".join(lines)


def draw(keys: np.ndarray, query: tuple) -> list[str]:
    """Text lines of a boolean grid: ``Q`` the query, ``#`` set, ``.`` unset (3-D: per frame).

    A 1-D axis longer than ``MAX_LINE_TOKENS`` becomes key ranges and a 64-cell bar.
    """
    if keys.ndim == 1 and keys.size > MAX_LINE_TOKENS:
        return _long_line(keys, query[0])
    chars = np.where(keys, "#", ".").astype(object)
    chars[tuple(query)] = "Q"
    if keys.ndim == 1:
        return [" ".join(chars)]
    if keys.ndim == 2:
        return [" ".join(row) for row in chars]
    return [line for t in range(keys.shape[0])
            for line in (f"[{t}]", *(" ".join(row) for row in chars[t]))]


def _long_line(keys: np.ndarray, query: int) -> list[str]:
    """A long 1-D axis as key ranges plus a 64-cell bar (cell shade = share of keys seen)."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], keys.astype(np.int8), [0]])))
    ranges = ", ".join(f"[{a}, {b})" for a, b in zip(edges[::2], edges[1::2]))
    cells = np.array_split(keys, BAR_CELLS)
    shades = " .:#"
    bar = "".join(shades[int(np.ceil(c.mean() * (len(shades) - 1)))] for c in cells)
    return [f"keys {ranges}; query at {query}", f"|{bar}|"]


def _outer_bool(vectors):
    out = vectors[0]
    for v in vectors[1:]:
        out = np.logical_and.outer(out, v)
    return out


def dense_attention(q, k, v, mask, scale=None, softcap=None, rel_bias=None, grid=None):
    """Masked softmax attention on ``(batch, heads, tokens, dim)`` torch tensors.

    ``mask`` is ``(tokens, tokens)`` or ``(patterns, tokens, tokens)`` (head ``h`` uses
    ``mask[h % patterns]``). Queries with no key get zeros, the convention of every backend.
    The score of a pair is ``scale * q.k``, passed through ``softcap * tanh(s / softcap)`` when
    ``softcap`` is given, plus ``rel_bias[h, key - query + reach]`` (see
    :mod:`patterngen.bias`; the reach is read from the table's shape, ``grid`` gives the
    coordinates).

    Raises:
        PatternError: when an attended pair's offset lies outside the table.
    """
    import torch

    mask = torch.as_tensor(mask, device=q.device)
    if mask.dim() == 3:
        idx = ir.pattern_of_head(torch.arange(q.shape[1], device=q.device), mask.shape[0])
        mask = mask[idx]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if rel_bias is not None:
        scores = scores + _dense_bias(rel_bias, grid, mask)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return probs @ v


def _dense_bias(table, grid, mask):
    """``(heads or 1, tokens, tokens)``: ``table`` gathered by key-minus-query offset."""
    import torch

    from . import bias
    from .grid import as_grid

    shape = [int(n) for n in as_grid(grid).require_numeric("dense_attention")]
    reach = tuple((s - 1) // 2 for s in table.shape[1:])
    if table.dim() != 1 + len(shape) or any(s % 2 == 0 for s in table.shape[1:]):
        raise PatternError(f"rel_bias has shape {tuple(table.shape)}; expected (heads, "
                           f"2 * reach + 1 per axis) for the {len(shape)} axes of grid={grid}.")
    tokens = np.arange(int(np.prod(shape)), dtype=np.int64)
    qc = [c[:, None] for c in bias.coordinates(tokens, shape)]
    kc = [c[None, :] for c in bias.coordinates(tokens, shape)]
    attended = mask.reshape(-1, *mask.shape[-2:]).any(0).cpu().numpy()
    for a, (qa, ka, r) in enumerate(zip(qc, kc, reach)):
        far = (np.abs(ka - qa) > r) & attended
        if far.any():
            raise PatternError(f"rel_bias covers offsets up to {r} on axis {a}, but an "
                               f"attended pair is {int(np.abs(ka - qa)[far].max())} apart.")
    index = torch.as_tensor(bias.offset_index(qc, kc, reach), device=table.device)
    return table.reshape(table.shape[0], -1)[:, index]
