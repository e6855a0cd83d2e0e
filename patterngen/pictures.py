"""Text pictures of the keys one query sees, computed per axis from the IR (O(tokens), never
tokens x tokens): for people, the CLI, the catalogue and the analysis reports."""

from __future__ import annotations

import math

import numpy as np

from . import ir, limits
from .errors import PatternError
from .parse import as_ir

__all__ = ["show", "draw"]

#: a 1-D axis longer than this is drawn as key ranges and a bar
MAX_LINE_TOKENS = 96
BAR_CELLS = 64


def show(pattern, grid=None, query=None, head: int = 0, key_grid=None) -> str:
    """A text picture of the keys one query sees (``Q`` query, ``#`` key, ``.`` not seen).

    With ``key_grid`` the picture is the key grid, ``C`` marking the key the query sits over
    (:func:`patterngen.ir.center`), whether or not it is one of its keys.

    Args:
        pattern: a spec or IR.
        grid: numeric grid (the queries').
        query: coordinates of the query (default: the grid's centre).
        head: for :func:`heads` patterns, which head to draw.
        key_grid: the keys' grid, when they live on another grid.

    Example:
        >>> import patterngen as pg
        >>> print(pg.show(pg.window(3), grid=(4, 5), query=(0, 0)))
        window(3) on grid 4x5, query (0, 0): 9 keys; pattern density 45.0%
        Q # # . .
        # # # . .
        # # # . .
        . . . . .
        >>> print(pg.show(pg.window(3), grid=8, key_grid=4, query=5))
        window(3) on grid 8, keys on 4, query (5,) over key (2,): 3 keys; pattern density 75.0%
        . # C #
    """
    lowered = as_ir(pattern, grid, key_grid)
    one = lowered.patterns[ir.pattern_of_head(head, len(lowered.patterns))]
    shape = one.grid.require_numeric("show")
    key_shape = one.keys.require_numeric("show")
    if query is None:
        query = tuple(n // 2 for n in shape)
    query = tuple(query) if isinstance(query, (tuple, list)) else (query,)
    if len(query) != len(shape) or not all(0 <= q < n for q, n in zip(query, shape)):
        raise PatternError(f"Invalid query={query} for grid {one.grid}; expected coordinates "
                           f"0 <= q < n on each of the {len(shape)} axes.")
    for g in (one.grid, one.keys):
        limits.check("PATTERNGEN_MAX_TOKENS", math.prod(g.shape), f"show: grid {g}'s tokens")
    keys = np.zeros(key_shape, dtype=bool)
    for term in one.terms:
        per_axis = []
        for rel, n, nk, q in zip(term.rels, shape, key_shape, query):
            p = np.arange(nk, dtype=np.int64)
            per_axis.append(np.asarray(rel.contains(np.int64(q), p, nk, ir.NUMPY_OPS, n)))
        keys |= _outer_bool(per_axis)
    density = one.pairs() / (math.prod(shape) * math.prod(key_shape))
    if one.key_grid is None:
        where, mark, at = f"grid {one.grid}, query {query}", "Q", query
    else:
        at = tuple(int(ir.center(q, n, nk)) for q, n, nk in zip(query, shape, key_shape))
        where = f"grid {one.grid}, keys on {one.key_grid}, query {query} over key {at}"
        mark = "C"
    lines = [f"{lowered.label} on {where}: {int(keys.sum())} keys; "
             f"pattern density {100 * density:.1f}%"]
    lines += draw(keys, at, mark)
    return "\n".join(lines)


def draw(keys: np.ndarray, query: tuple, mark: str = "Q") -> list[str]:
    """Text lines of a boolean grid: ``mark`` at the query, ``#`` set, ``.`` unset (3-D: per
    frame).

    A 1-D axis longer than ``MAX_LINE_TOKENS`` becomes key ranges and a 64-cell bar.
    """
    if keys.ndim == 1 and keys.size > MAX_LINE_TOKENS:
        return _long_line(keys, query[0])
    chars = np.where(keys, "#", ".").astype(object)
    chars[tuple(query)] = mark
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
