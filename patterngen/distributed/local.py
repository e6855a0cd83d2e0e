"""One rank's local problem: the grid it computes on, what it sends and receives, and its pattern
in local coordinates.

A rank computes on a *local grid* whose axis 0 is its own shard and the hull of each term's key
lines, merged into intervals laid out one after another. Each term's key progression lies inside
one interval, so in local coordinates it is still a progression, given per local line by an
:class:`~patterngen.ir.LineTable`; lines the rank does not own get no key (their output is
dropped). Tokens of the local grid that no term reads (a dilation's gaps) are not sent; they
stay zero.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

from .. import ir
from ..errors import PatternError
from ..grid import Grid
from .halo import global_queries, halo_terms, needed_tokens
from .reshard import Reshard
from .schemes import is_merged

__all__ = ["RankShare", "LocalProblem", "rank_share", "ordinary_local"]


@dataclass(frozen=True, eq=False)
class RankShare:
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


@dataclass(frozen=True, eq=False)
class LocalProblem:
    """A rank's local problem as the ``local`` executor
    (:class:`patterngen.backends.executor.LocalExecutor`) is asked about it.

    Attributes:
        share: the rank's :class:`RankShare` (what it sends and receives).
        backend: the local backend named to ``patterngen.distributed.compile``.
        lowered: the pattern the rank runs on its local grid (the share's line tables, or
            with ``auto`` the ordinary pattern where :func:`ordinary_local` finds one).
        strategies: with ``auto``, the planner's strategies for it (``None``: all).
        options: the local backend's options (with ``auto``, the planner's).
    """

    share: RankShare
    backend: str
    lowered: object
    strategies: tuple | None = None
    options: dict = dataclasses.field(default_factory=dict)

    @property
    def exchanged_rows(self) -> int:
        """K/V tokens the rank packs to send and unpacks on receipt, per step."""
        return sum(len(s) for s in self.share.send) + sum(len(r) for r in self.share.recv)


def _merge(intervals) -> tuple:
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return tuple(out)


def rank_share(lowered, shards, rank: int, resharded=None) -> RankShare:
    """The exchange and the local pattern of ``rank`` (every rank computes its own).

    ``resharded``: a :class:`Reshard` whose terms are computed on pencils instead; their keys
    do not move, and the local grid gets one *virtual* line per own line after the others:
    each own query sees one key there, which carries the re-sharded terms' partial result
    (its score is their log-sum-exp, its value their output), so the local softmax merges
    both exactly.
    """
    terms = halo_terms(lowered, resharded.terms if resharded else frozenset())
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
        send.append(np.flatnonzero(needed_tokens(terms, (a, b), (lo, hi), shape)))
        mine = needed_tokens(terms, (lo, hi), (a, b), shape)
        line, col = np.divmod(np.flatnonzero(mine), rest)
        recv.append(local_of[a + line] * rest + col)
    owned = np.zeros(n, dtype=bool)
    owned[lo:hi] = True
    virtual = (hi - lo) if resharded else 0
    lines = np.concatenate([np.arange(a, b) for a, b in intervals])
    no_key = [0] * virtual
    heads = []
    for h, head in enumerate(lowered.patterns):
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
    query_mask = np.zeros((len(lowered.patterns), len(queries), (hi - lo) * rest), dtype=bool)
    for h, head in enumerate(lowered.patterns):
        for term in head.terms:
            query_mask[h] |= term.contains([c[:, None] for c in q], [c[None, :] for c in p],
                                           shape, ir.NUMPY_OPS)
    return RankShare(rank, tuple(shards), intervals, own, local, tuple(send), tuple(recv),
                    queries, holder, query_mask, resharded)


def _shifted(atom, start: int):
    """``atom`` on an axis that starts at global line ``start`` (tiles and key ranges move;
    the other atoms are the same relation of local coordinates away from the borders)."""
    if isinstance(atom, ir.Block):
        return dataclasses.replace(atom, offset=(atom.offset - start) % atom.size)
    if isinstance(atom, ir.KeyIn):
        return dataclasses.replace(atom, start=atom.start - start, stop=atom.stop - start)
    return atom


def ordinary_local(lowered, share: RankShare):
    """The rank's local problem as the pattern's own atoms on its local grid, or ``None``.

    The line tables of :attr:`RankShare.local` are exact for any term, but flex cannot read
    them: the pattern's own atoms keep every backend among ``backend="auto"``'s choices.
    Where the local grid is one interval (no far global key lines, no re-shard), each term's
    axis-0 relation shifted to the interval's start (:func:`_shifted`) is tried, and kept
    only if it gives every own line exactly the keys of the global relation (checked pair by
    pair). Lines of the halo get keys too, their output is dropped (and its cotangent is 0).
    ``None`` where any term differs: a clamped window or a dilation whose border or residue
    the interval's start moves.
    """
    if len(share.intervals) != 1 or share.resharded is not None:
        return None
    ((start, stop),) = share.intervals
    shape = lowered.grid.shape
    size = stop - start
    own = np.arange(share.own[0], share.own[1])[:, None]
    keys = np.arange(size)[None, :]
    heads = []
    for head in lowered.patterns:
        terms = []
        for term in head.terms:
            if is_merged(term):
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
                                f"{head.label} (rank {share.rank} of {len(share.shards)})"))
    if isinstance(lowered, ir.IR):
        return heads[0]
    return ir.HeadsIR(heads[0].grid, tuple(heads), lowered.label)
