"""The re-shard of axis terms along the sharded axis: q, k and v moved to *pencils* (all lines of
a slice of axis 1, one transpose) where that moves less than gathering every line.

Axis terms along the sharded axis (every line, equal along axis 1: an axial or criss-cross
term) are attended on the pencils, only their pairs that no other term has, and the partial
``(out, lse)`` comes back as one virtual key per query of the local grid, merged by the local
softmax (:func:`patterngen.distributed.local.rank_share`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .. import ir
from .halo import exchange_rows, global_queries
from .schemes import is_merged, is_reshardable

__all__ = ["column_slices", "Reshard", "reshard", "reshard_mask"]


def column_slices(n: int, ranks: int) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` of axis 1 per rank on pencils: as even as possible, the first
    ``n % ranks`` ranks one more; a rank may get none (``n < ranks``)."""
    base, extra = divmod(n, ranks)
    edges = np.concatenate([[0], np.cumsum([base + (r < extra) for r in range(ranks)])])
    return tuple((int(edges[r]), int(edges[r + 1])) for r in range(ranks))




@dataclass(frozen=True, eq=False)
class Reshard:
    """Axis terms computed on pencils: every rank holds all lines of a slice of axis 1.

    Q, K and V go to the pencils in one ``all_to_all_single`` (a transpose); each rank
    attends the terms' pairs there, less the pairs of the pattern's other terms (counted once,
    by the halo part), and the partial ``(out, lse)`` rows return in a second one.

    Attributes:
        terms: the re-sharded ``(head, term)`` pairs.
        columns: ``(start, stop)`` of axis 1 per rank (:func:`column_slices`).
        pencil: per rank, the q/k/v tokens it receives (the transpose, own block excluded).
        returned: per rank, the partial ``(out, lse)`` rows it receives back.
    """

    terms: frozenset
    columns: tuple
    pencil: np.ndarray
    returned: np.ndarray


@functools.lru_cache(maxsize=32)
def reshard(lowered, shards) -> Reshard | None:
    """The re-shard of the terms :func:`is_reshardable` picks, or ``None`` to gather them.

    Chosen when it moves fewer elements per ``head_dim`` over all ranks: gathering moves K and
    V (2) per token; the re-shard moves q, k and v to the pencils and the output back (4) per
    transposed token, plus the halo of the other terms (2 per token); the lse column (1 per
    returned row) is left out of the comparison, so a tie gathers. Refused (gather) when a
    query other than a global one would get no pair from the re-shard (all of them counted
    by other terms): its partial would carry no key, and a virtual key with score ``-inf``
    has no finite gradient.
    """
    shape = lowered.grid.require_numeric("a sharded pattern")
    terms = frozenset((h, t) for h, head in enumerate(lowered.patterns) for t in head.terms
                      if not is_merged(t) and is_reshardable(t))
    if not terms:
        return None
    shards = tuple(shards)
    ranks = len(shards)
    columns = column_slices(shape[1], ranks)
    depth = math.prod(shape[2:])
    sizes = np.array([b - a for a, b in shards], dtype=np.int64)
    widths = np.array([b - a for a, b in columns], dtype=np.int64)
    pencil = (shape[0] - sizes) * widths * depth
    returned = sizes * (shape[1] - widths) * depth
    gathered = int(exchange_rows(lowered, shards).sum())
    halo = int(exchange_rows(lowered, shards, terms).sum())
    if 2 * halo + 4 * int(pencil.sum()) >= 2 * gathered:
        return None
    local = np.ones(math.prod(shape), dtype=bool)
    local[global_queries(lowered)] = False
    for h, head in enumerate(lowered.patterns):
        mine = [t for t in head.terms if (h, t) in terms]
        if not mine:
            continue
        others = [t for t in head.terms if (h, t) not in terms]
        before = ir.IR(lowered.grid, tuple(others)).key_counts() if others else 0
        if (ir.IR(lowered.grid, head.terms).key_counts() == before)[local].any():
            return None
    return Reshard(terms, columns, pencil, returned)


def reshard_mask(lowered, resharded: Reshard, rank: int) -> np.ndarray:
    """Boolean ``(patterns, columns, lines * depth, lines * depth)``: per column of ``rank``'s
    pencil, the pairs of the re-sharded terms that no other term of the head has (each
    pair is counted by one part only)."""
    shape = lowered.grid.shape
    a, b = resharded.columns[rank]
    tokens = shape[0] * math.prod(shape[2:])
    line, *deep = np.unravel_index(np.arange(tokens), (shape[0], *shape[2:]))
    col = np.arange(a, b)[:, None, None]
    q = [line[:, None], col, *(x[:, None] for x in deep)]
    p = [line[None, :], col, *(x[None, :] for x in deep)]
    out = np.zeros((len(lowered.patterns), b - a, tokens, tokens), dtype=bool)
    for h, head in enumerate(lowered.patterns):
        other = np.zeros_like(out[h])
        for term in head.terms:
            hit = np.broadcast_to(term.contains(q, p, shape, ir.NUMPY_OPS), out[h].shape)
            if (h, term) in resharded.terms:
                out[h] |= hit
            else:
                other |= hit
        out[h] &= ~other
    return out
