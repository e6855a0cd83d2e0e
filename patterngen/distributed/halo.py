"""The halo of a pattern sharded along its first axis: exact per rank, and symbolic.

Axis 0 of the grid is cut into contiguous line ranges, one per rank. A separable term's keys
factor over axes, so the keys the queries of rank ``r`` reach through one term are the product
of (axis 0) the union of the key progressions of ``r``'s query lines, evaluated at the *global*
axis length (clamped borders, dilation, block offsets and causal stay exact), and (every other
axis) the union over all query coordinates. The union over terms (and heads) of these products,
less ``r``'s own lines, is exactly the set of K/V tokens ``r`` must receive: nothing else moves.

Global queries (terms with ``QueryIn`` along the sharded axis) move no key: their q rows go
to every rank, and each rank's partial ``(out, lse)`` over its own keys returns to the holder,
which merges them by log-sum-exp (:func:`global_queries`, :func:`query_rows`).

Axis terms along the sharded axis (every line, equal along axis 1: an axial or criss-cross
term) are re-sharded when that moves less than gathering every line (:func:`reshard`): q, k
and v go to *pencils* (all lines of a slice of axis 1, one transpose), the terms' pairs that
no other term has are attended there, and the partial ``(out, lse)`` comes back as one virtual
key per query of the local grid, merged by the local softmax (:func:`rank_plan`).

A rank computes on a *local grid* whose axis 0 is its own shard and the hull of each term's key
lines, merged into intervals laid out one after another. Each term's key progression lies inside
one interval, so in local coordinates it is still a progression, given per local line by an
:class:`~patterngen.ir.LineTable`; lines the rank does not own get no key (their output is
dropped). Tokens of the local grid that no term reads (a dilation's gaps) are not sent; they
stay zero.

The symbolic halo (:func:`halo_cost`) is a closed form in the grid sizes, the number of ranks
``R`` and the rank index ``rank`` for windows, blocks, equal lines, causal terms, whole-axis
terms and one range of global key lines, under stated assumptions (``R`` divides the axis, a
shard is at least a window's span); any other pattern gets an integer sympy function that
counts exactly (:func:`exchange_rows`) once the sizes are numbers.

Example:
    >>> import patterngen as pg
    >>> from patterngen.distributed.halo import exchange_rows, split_lines
    >>> rows = exchange_rows(pg.lower(pg.window(3), (8, 4)), split_lines(8, 2))
    >>> rows.tolist()  # rows[src][dst]: K/V tokens src sends to dst
    [[0, 4], [4, 0]]
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np
import sympy

from .. import ir
from ..errors import PatternError
from ..grid import Grid, is_number, symbol

__all__ = ["split_lines", "exchange_rows", "global_queries", "query_rows", "RankPlan",
           "rank_plan", "Reshard", "reshard", "reshard_mask", "schemes", "HaloCost",
           "halo_cost"]


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
class _TermKeys:
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


def _merged(term: ir.Term) -> bool:
    """Global queries along the sharded axis: computed by partial results merged by lse."""
    return any(isinstance(a, ir.QueryIn) for a in term.rels[0].atoms)


@functools.lru_cache(maxsize=32)
def _terms(lowered) -> tuple[_TermKeys, ...]:
    """The terms whose keys move to the queries (every term but the merged ones)."""
    shape = lowered.grid.require_numeric("a sharded pattern")
    out = []
    for h, head in enumerate(lowered.per_head):
        for term in head.terms:
            if _merged(term):
                continue
            start, last, nonempty, step = _axis_keys(term.rels[0], shape[0])
            box = np.ones((), dtype=bool)
            for rel, n in zip(term.rels[1:], shape[1:]):
                s, e, ne, p = _axis_keys(rel, n)
                box = np.multiply.outer(box, _key_mask(s, e, ne, p, n))
            out.append(_TermKeys(h, term, start, last, nonempty, step, box))
    return tuple(out)


@functools.lru_cache(maxsize=32)
def global_queries(lowered) -> np.ndarray:
    """Sorted flat indices of the queries of merged terms (global queries along axis 0).

    Their output is merged from every rank's partial ``(out, lse)`` over its own keys, so their
    keys never move; the queries themselves (few rows) do.
    """
    shape = lowered.grid.require_numeric("a sharded pattern")
    found = np.zeros(shape, dtype=bool)
    for head in lowered.per_head:
        for term in head.terms:
            if _merged(term):
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


def _needed(terms, shard, lines, shape) -> np.ndarray:
    """Boolean ``(hi - lo, *rest)``: tokens of ``lines = (lo, hi)`` that ``shard`` reads."""
    lo, hi = lines
    n = shape[0]
    need = np.zeros((hi - lo, *shape[1:]), dtype=bool)
    for t in terms:
        rows = t.lines(*shard, n)[lo:hi]
        if rows.any():
            need[rows] |= t.box
    return need


def _halo_terms(lowered, skip) -> list[_TermKeys]:
    """The terms whose keys move to the queries, less the re-sharded ``(head, term)`` pairs."""
    return [t for t in _terms(lowered) if (t.head, t.term) not in skip]


def exchange_rows(lowered, shards, skip=frozenset()) -> np.ndarray:
    """``rows[src, dst]``: K/V tokens rank ``src`` sends rank ``dst`` in one forward step.

    The backward step sends the same number of gradient rows the other way. ``skip``: the
    ``(head, term)`` pairs re-sharded instead (:func:`reshard`), whose keys do not move.
    """
    terms = _halo_terms(lowered, skip)
    shape = lowered.grid.require_numeric("a sharded pattern")
    rows = np.zeros((len(shards), len(shards)), dtype=np.int64)
    for dst, shard in enumerate(shards):
        for src, lines in enumerate(shards):
            if src != dst:
                rows[src, dst] = int(_needed(terms, shard, lines, shape).sum())
    return rows


def column_slices(n: int, ranks: int) -> tuple[tuple[int, int], ...]:
    """``(start, stop)`` of axis 1 per rank on pencils: as even as possible, the first
    ``n % ranks`` ranks one more; a rank may get none (``n < ranks``)."""
    base, extra = divmod(n, ranks)
    edges = np.concatenate([[0], np.cumsum([base + (r < extra) for r in range(ranks)])])
    return tuple((int(edges[r]), int(edges[r + 1])) for r in range(ranks))


def _reshardable(term: ir.Term) -> bool:
    """A term across the whole sharded axis (or every line before) and equal along axis 1:
    each pencil (all lines, a slice of axis 1) holds all its pairs."""
    return (len(term.rels) > 1 and _scheme(term.rels[0]) in (_ALL, _BEFORE)
            and term.rels[1].atoms == (ir.Eq(),))


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
    """The re-shard of the terms :func:`_reshardable` picks, or ``None`` to gather them.

    Chosen when it moves fewer elements per ``head_dim`` over all ranks: gathering moves K and
    V (2) per token; the re-shard moves q, k and v to the pencils and the output back (4) per
    transposed token, plus the halo of the other terms (2 per token); the lse column (1 per
    returned row) is left out of the comparison, so a tie gathers. Refused (gather) when a
    query other than a global one would get no pair from the re-shard (all of them counted
    by other terms): its partial would carry no key, and a virtual key with score ``-inf``
    has no finite gradient.
    """
    shape = lowered.grid.require_numeric("a sharded pattern")
    terms = frozenset((h, t) for h, head in enumerate(lowered.per_head) for t in head.terms
                      if not _merged(t) and _reshardable(t))
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
    for h, head in enumerate(lowered.per_head):
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
    out = np.zeros((len(lowered.per_head), b - a, tokens, tokens), dtype=bool)
    for h, head in enumerate(lowered.per_head):
        other = np.zeros_like(out[h])
        for term in head.terms:
            hit = np.broadcast_to(term.contains(q, p, shape, ir.NUMPY_OPS), out[h].shape)
            if (h, term) in resharded.terms:
                out[h] |= hit
            else:
                other |= hit
        out[h] &= ~other
    return out


@dataclass(frozen=True, eq=False)
class RankPlan:
    """What one rank holds, sends, receives and computes.

    Attributes:
        rank: the rank.
        shards: ``(start, stop)`` of every rank's lines.
        intervals: global line ranges of the local grid's axis 0, in local order.
        own: ``(start, stop)`` of the rank's own lines on the local axis.
        local: the pattern on the local grid (an :class:`~patterngen.ir.IR` or ``HeadsIR``).
        send: per destination rank, flat token indices into this rank's shard (row-major).
        recv: per source rank, flat token indices into the local grid, in the order sent.
        queries: flat global indices of the global queries (:func:`global_queries`).
        holder: the rank holding each of them.
        query_mask: ``(patterns, queries, shard tokens)``: which of this rank's keys each
            global query attends (over every term), for its partial result.
        resharded: the :class:`Reshard` of the axis terms, or ``None``.
    """

    rank: int
    shards: tuple
    intervals: tuple
    own: tuple
    local: object
    send: tuple
    recv: tuple
    queries: np.ndarray
    holder: np.ndarray
    query_mask: np.ndarray
    resharded: Reshard | None

    @property
    def local_lines(self) -> int:
        return sum(b - a for a, b in self.intervals)


def _merge(intervals) -> tuple:
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return tuple(out)


def rank_plan(lowered, shards, rank: int, resharded=None) -> RankPlan:
    """The exchange and the local pattern of ``rank`` (every rank computes its own).

    ``resharded``: a :class:`Reshard` whose terms are computed on pencils instead; their keys
    do not move, and the local grid gets one *virtual* line per own line after the others:
    each own query sees one key there, which carries the re-sharded terms' partial result
    (its score is their log-sum-exp, its value their output), so the local softmax merges
    both exactly.
    """
    terms = _halo_terms(lowered, resharded.terms if resharded else frozenset())
    shape = lowered.grid.require_numeric("a sharded pattern")
    n, rest = shape[0], math.prod(shape[1:])
    lo, hi = shards[rank]
    hulls = [t.hull(lo, hi) for t in terms]
    intervals = _merge([(lo, hi), *(h for h in hulls if h is not None)])
    local_of = np.full(n, -1, dtype=np.int64)
    offset = 0
    for a, b in intervals:
        local_of[a:b] = offset + np.arange(b - a)
        offset += b - a
    send, recv = [], []
    for other, (a, b) in enumerate(shards):
        if other == rank:
            send.append(np.zeros(0, dtype=np.int64))
            recv.append(np.zeros(0, dtype=np.int64))
            continue
        # what `other` needs from my lines, and what I need from its lines
        send.append(np.flatnonzero(_needed(terms, (a, b), (lo, hi), shape)))
        mine = _needed(terms, (lo, hi), (a, b), shape)
        line, col = np.divmod(np.flatnonzero(mine), rest)
        recv.append(local_of[a + line] * rest + col)
    owned = np.zeros(n, dtype=bool)
    owned[lo:hi] = True
    virtual = (hi - lo) if resharded else 0
    lines = np.concatenate([np.arange(a, b) for a, b in intervals])
    no_key = [0] * virtual
    heads = []
    for h, head in enumerate(lowered.per_head):
        local_terms = []
        for t, hull in zip(terms, hulls):
            if t.head != h or hull is None:
                continue
            keep = owned[lines] & t.nonempty[lines]
            starts = np.where(keep, local_of[t.start[lines]], 0)
            stops = np.where(keep, local_of[t.last[lines]] + 1, 0)
            table = ir.LineTable((*starts.tolist(), *no_key), (*stops.tolist(), *no_key), t.step)
            local_terms.append(ir.Term((ir.Rel.of(table), *t.term.rels[1:])))
        if resharded and any(head_ == h for head_, _ in resharded.terms):
            own = np.where(owned[lines], offset + lines - lo, 0).tolist()
            table = ir.LineTable((*own, *no_key),
                                 (*np.where(owned[lines], offset + lines - lo + 1, 0).tolist(),
                                  *no_key), 1)
            local_terms.append(ir.Term((ir.Rel.of(table),
                                        *(ir.Rel.of(ir.Eq()) for _ in shape[1:]))))
        grid = Grid((offset + virtual, *shape[1:]))
        heads.append(ir.make_ir(grid, local_terms, f"{head.label} (rank {rank} of "
                                                   f"{len(shards)})"))
    local = heads[0] if isinstance(lowered, ir.IR) else ir.HeadsIR(heads[0].grid, tuple(heads),
                                                                  lowered.label)
    own = (int(local_of[lo]), int(local_of[lo]) + hi - lo)
    queries = global_queries(lowered)
    edges = np.array([a for a, _ in shards[1:]], dtype=np.int64)
    holder = np.searchsorted(edges, queries // rest, side="right")
    # the partial of every global query over this rank's keys, from every term of its pattern
    q = np.unravel_index(queries, shape)
    p = np.unravel_index(np.arange(lo * rest, hi * rest), shape)
    query_mask = np.zeros((len(lowered.per_head), len(queries), (hi - lo) * rest), dtype=bool)
    for h, head in enumerate(lowered.per_head):
        for term in head.terms:
            query_mask[h] |= term.contains([c[:, None] for c in q], [c[None, :] for c in p],
                                           shape, ir.NUMPY_OPS)
    return RankPlan(rank, tuple(shards), intervals, own, local, tuple(send), tuple(recv),
                    queries, holder, query_mask, resharded)


def _shifted(atom, start: int):
    """``atom`` on an axis that starts at global line ``start`` (tiles and key ranges move;
    the other atoms are the same relation of local coordinates away from the borders)."""
    if isinstance(atom, ir.Block):
        return dataclasses.replace(atom, offset=(atom.offset - start) % atom.size)
    if isinstance(atom, ir.KeyIn):
        return dataclasses.replace(atom, start=atom.start - start, stop=atom.stop - start)
    return atom


def ordinary_local(lowered, plan: RankPlan):
    """The rank's local problem as the pattern's own atoms on its local grid, or ``None``.

    The line tables of :attr:`RankPlan.local` are exact for any term, but flex cannot read
    them: the pattern's own atoms keep every backend among ``backend="auto"``'s choices.
    Where the local grid is one interval (no far global key lines, no re-shard), each term's
    axis-0 relation shifted to the interval's start (:func:`_shifted`) is tried, and kept
    only if it gives every own line exactly the keys of the global relation (checked pair by
    pair). Lines of the halo get keys too, their output is dropped (and its cotangent is 0).
    ``None`` where any term differs: a clamped window or a dilation whose border or residue
    the interval's start moves.
    """
    if len(plan.intervals) != 1 or plan.resharded is not None:
        return None
    ((start, stop),) = plan.intervals
    shape = lowered.grid.shape
    size = stop - start
    own = np.arange(plan.own[0], plan.own[1])[:, None]
    keys = np.arange(size)[None, :]
    heads = []
    for head in lowered.per_head:
        terms = []
        for term in head.terms:
            if _merged(term):
                continue  # global queries: their rows are replaced by the merge
            rel = ir.Rel.of(*(_shifted(a, start) for a in term.rels[0].atoms))
            try:
                same = np.array_equal(
                    np.broadcast_to(rel.contains(own, keys, size, ir.NUMPY_OPS),
                                    (len(own), size)),
                    np.broadcast_to(term.rels[0].contains(own + start, keys + start, shape[0],
                                                          ir.NUMPY_OPS), (len(own), size)))
            except PatternError:
                return None
            if not same:
                return None
            terms.append(ir.Term((rel, *term.rels[1:])))
        heads.append(ir.make_ir(Grid((size, *shape[1:])), terms,
                                f"{head.label} (rank {plan.rank} of {len(plan.shards)})"))
    if isinstance(lowered, ir.IR):
        return heads[0]
    return ir.HeadsIR(heads[0].grid, tuple(heads), lowered.label)


# --------------------------------------------------------------------------------------------
# which scheme each term gets, and the symbolic halo

#: the rank index in :class:`HaloCost` expressions (substitute ``rank=...``)
RANK = sympy.Symbol("rank", integer=True, nonnegative=True)
_LOCAL, _GLOBAL_KEYS, _BEFORE, _ALL, _MERGED, _RESHARD = (
    "halo", "global keys", "gather lines before", "gather all lines", "global queries merged",
    "re-shard")
_EITHER = "re-shard or gather (whichever moves less, by counts)"


def _scheme(rel: ir.Rel) -> str:
    kinds = {type(a) for a in rel.atoms}
    if not kinds:
        return _ALL
    if ir.KeyIn in kinds:
        return _GLOBAL_KEYS
    if ir.QueryIn in kinds:
        return _MERGED
    if kinds & {ir.Window, ir.Block, ir.Eq}:
        return _LOCAL
    return _BEFORE  # Lt / Le alone


def schemes(lowered, resharded=None) -> list[tuple[str, str]]:
    """``(term, scheme)`` for every term of every head, by its relation along the sharded axis.

    ``halo``: a bounded reach, neighbours' lines; ``global keys``: a fixed range of key lines
    (only the tokens the term reads); ``gather lines before``: causal across the axis, every
    earlier line; ``gather all lines``: a whole-axis term (axial), every line, gathered;
    ``re-shard``: such a term computed on pencils (``resharded``, see :func:`reshard`), or on
    a symbolic grid ``re-shard or gather``, decided by counts once the sizes are numbers;
    ``global queries merged``: their q rows go to every rank, whose partial ``(out, lse)``
    over its own keys are merged at the holder; no key moves.
    """
    chosen = resharded.terms if resharded else frozenset()
    undecided = resharded is None and not lowered.grid.numeric
    return [(repr(t), _RESHARD if (h, t) in chosen else _EITHER
             if undecided and not _merged(t) and _reshardable(t) else _scheme(t.rels[0]))
            for h, head in enumerate(lowered.per_head) for t in head.terms]


@dataclass(frozen=True)
class HaloCost:
    """Communication of one rank per step, as sympy expressions in the sizes, ``R``, ``rank``.

    Rows received per forward step; the backward sends the gradients of the same rows back to
    their owners (the transposed exchanges), so a rank sends in backward what it received in
    forward.

    Attributes:
        ranks: the number of ranks (an int or a symbol).
        rank: the rank-index symbol the expressions use (substitute ``rank=...``).
        tokens: K/V tokens received (``halo`` and ``global keys`` terms).
        lines: ``tokens`` in lines of the sharded axis (``tokens`` over one line's tokens).
        queries: global query rows received (their q, to attend this rank's keys).
        partials: partial ``(out, lse)`` rows received for the global queries it holds.
        pencil: q/k/v tokens received in a re-shard's transpose (:func:`reshard`).
        returned: the re-shard's partial ``(out, lse)`` rows received back.
        bytes_forward: received, ``(2 d tokens + d queries + (d + 1) partials + 3 d pencil
            + (d + 1) returned) * batch * heads`` elements; partials in float32 at least (the
            merge's precision).
        bytes_backward: sent back in the backward step: the same bytes.
        ratio: ``bytes_forward`` over the rank's share of the forward FLOPs (``flops / R``).
        schemes: ``(term, scheme)`` pairs (see :func:`schemes`).
        assumptions: relations the closed form needs.
        closed_form: ``False`` when the rows are exact counts evaluated at substitution.
    """

    ranks: object
    rank: sympy.Symbol
    tokens: sympy.Expr
    lines: sympy.Expr
    queries: sympy.Expr
    partials: sympy.Expr
    pencil: sympy.Expr
    returned: sympy.Expr
    bytes_forward: sympy.Expr
    bytes_backward: sympy.Expr
    ratio: sympy.Expr
    schemes: tuple
    assumptions: tuple
    closed_form: bool

    def subs(self, mapping) -> "HaloCost":
        # a rank index may be 0, so its symbol is nonnegative, not the positive size symbol
        # that CostReport.subs makes of the name 'rank'
        mapping = {self.rank if str(k) == "rank" else k: v for k, v in mapping.items()}

        def s(x):
            x = sympy.sympify(x).subs(mapping, simultaneous=True)
            return int(x) if x.is_Integer else x

        return HaloCost(s(self.ranks), self.rank, s(self.tokens), s(self.lines),
                        s(self.queries), s(self.partials), s(self.pencil), s(self.returned),
                        s(self.bytes_forward),
                        s(self.bytes_backward), s(self.ratio), self.schemes,
                        tuple(a for a in map(s, self.assumptions) if a is not sympy.true),
                        self.closed_form)

    def rows(self) -> list[tuple[str, object]]:
        return [
            (f"halo K/V tokens per rank (rank of {self.ranks})", self.tokens),
            ("halo lines per rank", self.lines),
            *((("global query rows in (q), partial rows in", f"{self.queries}, "
                f"{self.partials}"),) if self.queries != 0 or self.partials != 0 else ()),
            *((("re-shard q/k/v rows in, partial rows back", f"{self.pencil}, "
                f"{self.returned}"),) if self.pencil != 0 or self.returned != 0 else ()),
            ("halo bytes per rank, forward", self.bytes_forward),
            ("halo bytes per rank, backward", self.bytes_backward),
            ("communication / compute (bytes per FLOP)", self.ratio),
            *((("halo assuming", ", ".join(map(str, self.assumptions))),)
              if self.assumptions else ()),
        ]


def _reach(rel: ir.Rel, s, e, n):
    """Symbolic ``(left, right)`` halo lines of the shard ``[s, e)`` for a ``halo`` term."""
    kinds = {type(a): a for a in rel.atoms}
    if len(kinds) != len(rel.atoms):  # two atoms of one kind (windows meeting): no closed form
        return None
    if set(kinds) == {ir.Eq}:
        return 0, 0, ()
    if set(kinds) == {ir.Block}:
        b = kinds[ir.Block]
        return sympy.Mod(s - b.offset, b.size), sympy.Mod(b.offset - e, b.size), ()
    w = kinds.get(ir.Window)
    if w is None or getattr(w, "stride", 1) != 1 or not set(kinds) <= {ir.Window, ir.Le, ir.Lt}:
        return None
    k, d = w.size, w.dilation
    left, right = (d * (k - 1), 0) if w.mode == "causal" else (d * (k // 2), d * (k - 1 - k // 2))
    if len(kinds) > 1:
        right = 0
    return left, right, (sympy.Ge(sympy.simplify(e - s), k * d),)


def _box_size(term: ir.Term, shape):
    """Tokens of one key line a term reads (closed form), or ``None``."""
    size = sympy.Integer(1)
    for rel, n in zip(term.rels[1:], shape[1:]):
        kinds = {type(a): a for a in rel.atoms}
        if len(rel.atoms) > 1:
            return None
        if not kinds or set(kinds) in ({ir.Eq}, {ir.Le}, {ir.Window}, {ir.Block}, {ir.QueryIn}):
            size *= n
        elif set(kinds) == {ir.Lt}:
            size *= n - 1
        elif set(kinds) == {ir.KeyIn}:
            size *= kinds[ir.KeyIn].stop - kinds[ir.KeyIn].start
        else:
            return None
    return size


def _closed_tokens(lowered, ranks, rank):
    """Closed-form halo tokens of rank ``rank``, with assumptions; ``None`` when none known."""
    shape = lowered.grid.shape
    n, full = shape[0], sympy.Mul(*shape[1:])
    size = n / ranks
    s, e = rank * size, (rank + 1) * size
    lefts, rights, assumptions, keys = [], [], [sympy.Eq(sympy.Mod(n, ranks), 0)], []
    gather_all = before = False
    for head in lowered.per_head:
        for term in head.terms:
            if _merged(term):
                continue  # no key moves (see _closed_queries)
            rel, box = term.rels[0], _box_size(term, shape)
            scheme = _scheme(rel)
            if box is None or _reshardable(term):  # re-shard or gather: decided by counts
                return None
            if scheme == _GLOBAL_KEYS and len(rel.atoms) == 1:
                keys.append((rel.atoms[0].start, rel.atoms[0].stop, box))
                continue
            if scheme == _LOCAL:
                reach = _reach(rel, s, e, n)
                if reach is None:
                    return None
                if reach[:2] == (0, 0):
                    continue
                if box != full:
                    return None
                lefts.append(sympy.Min(s, reach[0]))
                rights.append(sympy.Min(n - e, reach[1]))
                assumptions.extend(reach[2])
            elif scheme == _BEFORE and box == full:
                before = True
            elif scheme == _ALL and len(rel.atoms) == 0 and box == full:
                gather_all = True
            else:
                return None
    if gather_all:
        return (n - size) * full, tuple(assumptions)
    left = s if before else sympy.Max(0, *lefts)
    right = sympy.Max(0, *rights)
    tokens = (left + right) * full
    if len(keys) > 1:
        return None
    for a, b, box in keys:
        # key lines outside the shard and its halo; inside them whole lines arrive anyway
        inside = sympy.Max(0, sympy.Min(b, e + right) - sympy.Max(a, s - left))
        tokens += (b - a - inside) * box
    return tokens, tuple(assumptions)


def _closed_queries(lowered, ranks, rank):
    """Closed-form ``(queries, partials)`` rows received by rank ``rank``, or ``None``."""
    shape = lowered.grid.shape
    size = shape[0] / ranks
    s, e = rank * size, (rank + 1) * size
    merged = {t for head in lowered.per_head for t in head.terms if _merged(t)}
    if not merged:
        return sympy.Integer(0), sympy.Integer(0)
    if len(merged) > 1:
        return None
    (term,) = merged
    if len(term.rels[0].atoms) != 1:
        return None
    axis0 = term.rels[0].atoms[0]
    count = sympy.sympify(axis0.stop - axis0.start)
    for rel, n in zip(term.rels[1:], shape[1:]):
        kinds = {type(a): a for a in rel.atoms}
        if len(rel.atoms) > 1:
            return None
        if set(kinds) == {ir.QueryIn}:
            count *= kinds[ir.QueryIn].stop - kinds[ir.QueryIn].start
        elif set(kinds) == {ir.Lt}:
            count *= n - 1
        else:  # every other atom gives every query coordinate a key
            count *= n
    held = count / (axis0.stop - axis0.start) * sympy.Max(
        0, sympy.Min(axis0.stop, e) - sympy.Max(axis0.start, s))
    return count - held, (ranks - 1) * held


@functools.lru_cache(maxsize=None)
def _exact_function(lowered, quantity: str):
    """Exact rows of a rank (even split), evaluated once every size is a number."""
    free = sorted({x for n in lowered.grid.shape if not is_number(n)
                   for x in sympy.sympify(n).free_symbols}, key=str)

    def _eval(cls, ranks, rank, *values):
        if ranks.is_Integer and rank.is_Integer and all(v.is_Integer for v in values):
            numeric = lowered.subs(dict(zip(free, values)))
            shards = split_lines(int(numeric.grid.shape[0]), int(ranks))
            resharded = reshard(numeric, shards)
            if quantity == "tokens":
                skip = resharded.terms if resharded else frozenset()
                return sympy.Integer(int(exchange_rows(numeric, shards, skip)[:, int(rank)]
                                         .sum()))
            if quantity in ("pencil", "returned"):
                rows = getattr(resharded, quantity) if resharded else [0] * int(ranks)
                return sympy.Integer(int(rows[int(rank)]))
            queries, partials = query_rows(numeric, shards)
            return sympy.Integer(int((queries if quantity == "queries" else partials)[rank]))
        return None

    fn = type(f"{quantity}[{lowered.label}]", (sympy.Function,),
              {"eval": classmethod(_eval), "is_integer": True, "is_nonnegative": True})
    return lambda ranks, rank: fn(ranks, rank, *free)


def halo_cost(lowered, ranks, head_dim, heads, batch, dtype_bytes, flops) -> HaloCost:
    """The halo of ``lowered`` (axis 0 sharded over ``ranks``) per rank and step.

    Args:
        lowered: the pattern's IR (numeric or symbolic grid).
        ranks: an int, a sympy symbol or a name.
        head_dim, heads, batch, dtype_bytes: as in :func:`patterngen.cost`.
        flops: the whole grid's forward FLOPs.
    """
    ranks = symbol(ranks) if isinstance(ranks, str) else sympy.sympify(ranks)
    if is_number(ranks) and int(ranks) < 1:
        raise PatternError(f"ranks={ranks}: expected an integer >= 1 or a symbol.")
    rank = RANK
    closed = _closed_tokens(lowered, ranks, rank)
    closed_queries = _closed_queries(lowered, ranks, rank)
    if closed is None or closed_queries is None:
        tokens, queries, partials = (_exact_function(lowered, q)(ranks, rank)
                                     for q in ("tokens", "queries", "partials"))
        if any(not _merged(t) and _reshardable(t) for head in lowered.per_head
               for t in head.terms):
            pencil, returned = (_exact_function(lowered, q)(ranks, rank)
                                for q in ("pencil", "returned"))
        else:
            pencil = returned = sympy.Integer(0)
        assumptions = ()
    else:
        (tokens, assumptions), (queries, partials) = closed, closed_queries
        pencil = returned = sympy.Integer(0)
    line = sympy.Mul(*lowered.grid.shape[1:])
    rows = batch * heads * dtype_bytes
    wide = batch * heads * max(dtype_bytes, 4)  # partial results travel in float32 at least
    forward = (2 * head_dim * tokens + head_dim * queries + 3 * head_dim * pencil) * rows \
        + (head_dim + 1) * (partials + returned) * wide
    numeric = lowered.grid.numeric and is_number(ranks)
    resharded = reshard(lowered, split_lines(int(lowered.grid.shape[0]), int(ranks))) \
        if numeric else None
    return HaloCost(ranks, rank, tokens, tokens / line, queries, partials, pencil, returned,
                    forward, forward, forward / (sympy.sympify(flops) / ranks),
                    tuple(schemes(lowered, resharded)), assumptions,
                    closed is not None and closed_queries is not None)
