"""Which K/V tokens each rank sends each other rank: the halo of a pattern sharded along its
first axis, exact per rank.

Axis 0 of the grid is cut into contiguous line ranges, one per rank. A separable term's keys
factor over axes, so the keys the queries of rank ``r`` reach through one term are the product
of (axis 0) the union of the key progressions of ``r``'s query lines, evaluated at the *global*
axis length (clamped borders, dilation, block offsets and causal stay exact), and (every other
axis) the union over all query coordinates. The union over terms (and heads) of these products,
less ``r``'s own lines, is exactly the set of K/V tokens ``r`` must receive: nothing else moves.

Global queries (terms with ``QueryIn`` along the sharded axis) move no key: their q rows go
to every rank, and each rank's partial ``(out, lse)`` over its own keys returns to the holder,
which merges them by log-sum-exp (:func:`global_queries`, :func:`query_rows`).

Example:
    >>> import patterngen as pg
    >>> from patterngen.distributed.halo import exchange_rows, split_lines
    >>> rows = exchange_rows(pg.lower(pg.window(3), (8, 4)), split_lines(8, 2))
    >>> rows.tolist()  # rows[src][dst]: K/V tokens src sends to dst
    [[0, 4], [4, 0]]
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from .. import ir
from ..errors import PatternError
from ..grid import is_number
from .schemes import is_merged

__all__ = ["split_lines", "exchange_rows", "global_queries", "query_rows", "needed_tokens",
           "halo_terms", "TermKeys"]


def split_lines(n: int, ranks: int, sizes=None) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` of the lines each rank holds: contiguous, in rank order.

    Args:
        n: lines of the sharded axis.
        ranks: number of ranks.
        sizes: lines per rank; ``None`` splits as evenly as possible (the first ``n % ranks``
            ranks get one line more).

    Raises:
        PatternError: for a grid with fewer lines than ranks, a shard of size 0, or sizes that
            do not add up to ``n``.
    """
    if sizes is None:
        if n < ranks:
            raise PatternError(
                f"The sharded axis has n={n} lines but there are {ranks} ranks; every rank "
                f"needs at least one line: use at most {n} ranks or a longer axis.")
        base, extra = divmod(n, ranks)
        sizes = [base + (r < extra) for r in range(ranks)]
    sizes = list(sizes)
    if len(sizes) != ranks:
        raise PatternError(f"shards={sizes} has {len(sizes)} sizes; expected one per rank "
                           f"({ranks}).")
    for r, size in enumerate(sizes):
        if isinstance(size, bool) or not is_number(size) or int(size) < 1:
            raise PatternError(f"shards[{r}]={size!r}: every rank needs at least one line; "
                               f"expected an integer >= 1.")
    if sum(int(s) for s in sizes) != n:
        raise PatternError(f"shards={sizes} add up to {sum(int(s) for s in sizes)} lines; the "
                           f"sharded axis has n={n}.")
    edges = np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64))])
    return tuple((int(edges[r]), int(edges[r + 1])) for r in range(ranks))


def _key_mask(start, last, nonempty, step, n) -> np.ndarray:
    """Union of the progressions ``start[q], .., last[q]`` (step ``step``) of the given queries."""
    out = np.zeros(n, dtype=bool)
    start, last = start[nonempty], last[nonempty]
    for c in np.unique(start % step):
        sel = start % step == c
        # a difference array on the sub-axis of coordinates == c (mod step)
        m = (n - c + step - 1) // step
        diff = np.zeros(m + 1, dtype=np.int64)
        np.add.at(diff, (start[sel] - c) // step, 1)
        np.add.at(diff, (last[sel] - c) // step + 1, -1)
        out[c::step] = np.cumsum(diff[:m]) > 0
    return out


@dataclass(frozen=True, eq=False)
class TermKeys:
    """One term's keys along axis 0 per query line, and its key set on every other axis."""

    head: int
    term: ir.Term
    start: np.ndarray
    last: np.ndarray
    nonempty: np.ndarray
    step: int
    box: np.ndarray  # boolean (*rest): tokens of a key line the term can read

    def lines(self, lo: int, hi: int, n: int) -> np.ndarray:
        """Key lines of the queries on lines ``[lo, hi)``."""
        sel = np.zeros(n, dtype=bool)
        sel[lo:hi] = self.nonempty[lo:hi]
        return _key_mask(self.start, self.last, sel, self.step, n)

    def hull(self, lo: int, hi: int):
        """``(first, stop)`` of the key lines of queries on ``[lo, hi)``; ``None`` when none."""
        sel = self.nonempty[lo:hi]
        if not sel.any():
            return None
        return int(self.start[lo:hi][sel].min()), int(self.last[lo:hi][sel].max()) + 1


def _axis_keys(rel: ir.Rel, n: int):
    start, stop = rel.bounds(np.arange(n, dtype=np.int64), n, ir.NUMPY_OPS)
    start = np.broadcast_to(np.asarray(start, dtype=np.int64), (n,))
    stop = np.broadcast_to(np.asarray(stop, dtype=np.int64), (n,))
    step = int(rel.step)
    count = np.maximum(stop - start + step - 1, 0) // step
    return start, start + step * (count - 1), count > 0, step


@functools.lru_cache(maxsize=32)
def _terms(lowered) -> tuple[TermKeys, ...]:
    """The terms whose keys move to the queries (every term but the merged ones)."""
    shape = lowered.grid.require_numeric("a sharded pattern")
    out = []
    for h, head in enumerate(lowered.patterns):
        for term in head.terms:
            if is_merged(term):
                continue
            start, last, nonempty, step = _axis_keys(term.rels[0], shape[0])
            box = np.ones((), dtype=bool)
            for rel, n in zip(term.rels[1:], shape[1:]):
                s, e, ne, p = _axis_keys(rel, n)
                box = np.multiply.outer(box, _key_mask(s, e, ne, p, n))
            out.append(TermKeys(h, term, start, last, nonempty, step, box))
    return tuple(out)


@functools.lru_cache(maxsize=32)
def global_queries(lowered) -> np.ndarray:
    """Sorted flat indices of the queries of merged terms (global queries along axis 0).

    Their output is merged from every rank's partial ``(out, lse)`` over its own keys, so their
    keys never move; the queries themselves (few rows) do.
    """
    shape = lowered.grid.require_numeric("a sharded pattern")
    found = np.zeros(shape, dtype=bool)
    for head in lowered.patterns:
        for term in head.terms:
            if is_merged(term):
                rows = np.ones((), dtype=bool)
                for rel, n in zip(term.rels, shape):
                    rows = np.multiply.outer(rows, _axis_keys(rel, n)[2])
                found |= rows
    return np.flatnonzero(found)


def query_rows(lowered, shards) -> tuple[np.ndarray, np.ndarray]:
    """Per rank, global query rows received (their q) and partial results received (to merge).

    A rank receives every global query it does not hold, and holds ``(R - 1)`` partial
    ``(out, lse)`` rows from the other ranks for each one it holds. The backward moves the same
    rows the other way (the gradients of q to the holders, of the partials to their senders).
    """
    rest = math.prod(lowered.grid.shape[1:])
    line = global_queries(lowered) // rest
    held = np.array([int(((line >= a) & (line < b)).sum()) for a, b in shards], dtype=np.int64)
    return len(line) - held, (len(shards) - 1) * held


def needed_tokens(terms, shard, lines, shape) -> np.ndarray:
    """Boolean ``(hi - lo, *rest)``: tokens of ``lines = (lo, hi)`` that ``shard`` reads."""
    lo, hi = lines
    n = shape[0]
    need = np.zeros((hi - lo, *shape[1:]), dtype=bool)
    for t in terms:
        rows = t.lines(*shard, n)[lo:hi]
        if rows.any():
            need[rows] |= t.box
    return need


def halo_terms(lowered, skip) -> list[TermKeys]:
    """The terms whose keys move to the queries, less the re-sharded ``(head, term)`` pairs."""
    return [t for t in _terms(lowered) if (t.head, t.term) not in skip]


def exchange_rows(lowered, shards, skip=frozenset()) -> np.ndarray:
    """``rows[src, dst]``: K/V tokens rank ``src`` sends rank ``dst`` in one forward step.

    The backward step sends the same number of gradient rows the other way. ``skip``: the
    ``(head, term)`` pairs re-sharded instead (:func:`reshard`), whose keys do not move.
    """
    terms = halo_terms(lowered, skip)
    shape = lowered.grid.require_numeric("a sharded pattern")
    rows = np.zeros((len(shards), len(shards)), dtype=np.int64)
    for dst, shard in enumerate(shards):
        for src, lines in enumerate(shards):
            if src != dst:
                rows[src, dst] = int(needed_tokens(terms, shard, lines, shape).sum())
    return rows
