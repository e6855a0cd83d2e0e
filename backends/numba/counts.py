"""Counts of what the generated kernels do beyond their pairs, which the planner prices.

A kernel's time follows its loops (:mod:`.source`): per query, the bounds, the query's row of
head_dim and the output's; per key row (each combination of a term's keys on every axis but
the last), a loop's setup, dearer for two keys or more than for one key or none (a column:
``axis(0)``); per key, either a place in a run buffered in one vectorised loop (the first
term's keys on a contiguous last axis, while the row fits the buffer's room) or a key
buffered on its own, with a test against every earlier term (a dilated last axis, a later
term of a union, a row longer than the room left); per pair, the chunk helpers' work over
head_dim. The backward buffers every key on its own, so its cost per key is in its cost per
pair.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .source import KEY_CHUNK
from .tiling import distinct_heads

__all__ = ["Counts", "kernel_counts"]


@dataclass(frozen=True)
class Counts:
    """Per (batch, head) of one listed pattern.

    Attributes:
        queries: queries (each one's setup and output row).
        rows: key rows of two keys or more visited: per query, or per tile for a term its
            lanes share.
        loose: keys buffered one at a time in the forward (beside the runs).
        plain: key rows of one key or none visited.
    """

    queries: int
    rows: int
    loose: int
    plain: int = 0


def _loose_run(outer: np.ndarray, last: np.ndarray) -> int:
    """Keys of a first term on a contiguous last axis that miss the run: a query's rows of
    ``last`` keys fill the buffer ``KEY_CHUNK`` at a time, and the row that does not fit the
    room left goes key by key (every row, when a row is longer than the buffer)."""
    keys = np.multiply.outer(outer, last)
    missed = np.multiply.outer(np.ones_like(outer), last) * (keys // KEY_CHUNK)
    return int(np.minimum(missed, keys).sum())


def _term_counts(term, t: int, shape, key_shape, lanes: int, shared: bool,
                 spanned: int) -> tuple[int, int, int]:
    """``(rows, loose, plain)`` of term ``t`` (after :func:`.tiling.runs_first`) over every
    query; a tile spanning ``spanned`` rows of the outer axes visits their keys once."""
    counts = term.counts(shape, key_shape)
    n = int(shape[-1])
    outer = np.ones(1, dtype=np.int64)
    for c in counts[:-1]:
        outer = np.multiply.outer(outer, c).reshape(-1)
    if lanes and shared:  # the tile's union key by key; its masks are in the pairs
        return int(outer.sum()) // spanned * -(-n // lanes), 0, 0
    plain = int(outer.sum()) * int((counts[-1] <= 1).sum())
    rows = int(outer.sum()) * n - plain
    if t == 0 and int(term.rels[-1].step) == 1:
        return rows, _loose_run(outer, counts[-1]), plain
    return rows, int(outer.sum()) * int(counts[-1].sum()), plain


def kernel_counts(node, shape, lanes: int, shared, groups=()) -> tuple[Counts, ...]:
    """Per listed pattern of ``node`` (its terms in the kernels' order,
    :func:`.tiling.runs_first`), what a kernel with ``lanes`` (0: one query at a time;
    ``shared`` per distinct head from :func:`.tiling.plan_lanes`; tiles spanning ``groups``
    rows, :func:`.tiling.plan_groups`) does besides its pairs."""
    share_of = dict(zip((h.terms for h in distinct_heads(node)), shared or ()))
    out = []
    for head in node.patterns:
        key_shape = shape if head.key_grid is None else head.key_grid.shape
        shares = share_of.get(head.terms) or (False,) * len(head.terms)
        rows = loose = plain = 0
        for t, (term, share) in enumerate(zip(head.terms, shares)):
            r, k, p = _term_counts(term, t, shape, key_shape, lanes, share,
                                   math.prod(groups))
            rows, loose, plain = rows + r, loose + k, plain + p
        out.append(Counts(math.prod(int(n) for n in shape), rows, loose, plain))
    return tuple(out)
