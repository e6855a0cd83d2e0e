"""Lanes: which patterns run in tiles of queries that share keys, and how work is cut.

A work item is a tile of ``QUERY_TILE`` consecutive queries (one query at a time), or of
``lanes`` consecutive queries along the last axis that share each loaded key (:func:`plan_lanes`
chooses the width from the pattern's waste on the grid, counted separably, never tokens x
tokens). With keys on another grid, a tile also spans ``groups[a]`` queries on each other
axis ``a`` when their keys coincide there (:func:`plan_groups`: ``r`` rows of a ratio-``r``
upsampling sit over one key row), so the tile's lanes load each key once. Also the facts
about the IR that the generator and the backend share: the distinct head patterns, which one
each listed head uses, and the order a union's terms run in.
"""

from __future__ import annotations

import dataclasses
import math

from patterngen import ir
from patterngen.errors import PatternError
from patterngen.grid import is_number

#: queries per work item of the one-query kernels
QUERY_TILE = 32
#: tile widths tried by :func:`plan_lanes`, beside the last axis's block sizes up to 16
LANE_CHOICES = (8, 4)
#: a term is shared by a tile's lanes when at least this share of the pairs it computes is
#: attended; else each lane runs it on its own keys
LANE_MIN_EFFICIENCY = 0.8
#: cost of a pair computed for a tile, relative to a pair of the one-query kernel (measured,
#: forward: a causal 256-wide 1-D window at 8 lanes 0.82, Swin's 7x7 blocks at 7 lanes 0.83, a
#: 7x7 neighbourhood forced to 8 lanes 0.64)
LANE_PAIR_COST = 0.8
#: most queries a tile of :func:`plan_groups` holds (its lanes times the rows it spans)
GROUP_LANES = 16


def _shared_pairs(term: ir.Term, shape, lanes: int, key_shape) -> int:
    """Pairs that tiles of ``lanes`` queries compute for ``term`` when the lanes share it
    (keys on a grid of ``key_shape``).

    Separable, never tokens x tokens: a tile shares its other coordinates, so for each of
    its lanes it computes every key of the lanes' union on the last axis.
    """
    import numpy as np

    n, nk = int(shape[-1]), int(key_shape[-1])
    coords = np.arange(-(-n // lanes) * lanes, dtype=np.int64)
    outer = math.prod(int(rel.counts(int(mk), int(m)).sum())
                      for rel, m, mk in zip(term.rels[:-1], shape[:-1], key_shape[:-1]))
    lo, hi = term.rels[-1].bounds(np.minimum(coords, n - 1), nk, ir.NUMPY_OPS, n)
    lo, hi = np.broadcast_to(lo, coords.shape), np.broadcast_to(hi, coords.shape)
    held = (lo < hi) & (coords < n)
    lo = np.where(held, lo, nk).reshape(-1, lanes).min(axis=1)
    hi = np.where(held, hi, 0).reshape(-1, lanes).max(axis=1)
    return outer * lanes * int(np.maximum(hi - lo, 0).sum())


def _term_pairs(term: ir.Term, shape, key_shape) -> int:
    return math.prod(int(c.sum()) for c in term.counts(shape, key_shape))


def _new_pairs(head: ir.IR, t: int) -> int:
    """Pairs of term ``t`` that no earlier term holds (what the kernels visit for it)."""
    def union(terms):
        return ir.IR(head.grid, tuple(terms), key_grid=head.key_grid).pairs() if terms else 0
    return union(head.terms[:t + 1]) - union(head.terms[:t])


def _lane_terms(head: ir.IR, shape, lanes: int, shared=None) -> list[tuple[bool, int]]:
    """Per term of a kernel with ``lanes``: whether the lanes share it, and the pairs computed
    for it (the tile unions of :func:`_shared_pairs`, or its own new pairs lane by lane).

    Without ``shared``, a term is shared when at least ``LANE_MIN_EFFICIENCY`` of the pairs
    the tile would compute for it are attended.
    """
    out = []
    keys = shape if head.key_grid is None else head.key_grid.shape
    for t, term in enumerate(head.terms):
        tile = _shared_pairs(term, shape, lanes, keys)
        share = (_term_pairs(term, shape, keys) >= LANE_MIN_EFFICIENCY * tile if shared is None
                 else shared[t])
        out.append((share, tile if share else _new_pairs(head, t)))
    return out


def lane_pairs(head: ir.IR, shape, lanes: int, shared=None) -> int:
    """Pairs a kernel with ``lanes`` computes for one head pattern on ``shape``: a shared
    term's tile unions (:func:`_shared_pairs`), a lane-by-lane term's own new pairs."""
    return sum(pairs for _, pairs in _lane_terms(head, shape, lanes, shared))


def lane_rows(head: ir.IR, shape, lanes: int, shared=None, groups=()) -> int:
    """Key rows a kernel with ``lanes`` (0: one query at a time) visits for one head pattern
    on ``shape``: per query, or per tile for a term its lanes share, one row per combination
    of the term's keys on every axis but the last (a dilated last axis: one per key; a tile
    spanning ``groups`` of rows visits them once). What a row costs beyond its pairs (the
    loop's setup, a short run's poor vector use) is priced on these."""
    n, spanned = int(shape[-1]), math.prod(groups)
    terms = _lane_terms(head, shape, lanes, shared) if lanes else [(False, 0)] * len(head.terms)
    rows = 0
    keys = None if head.key_grid is None else head.key_grid.shape
    for term, (share, _) in zip(head.terms, terms):
        counts = term.counts(shape, keys)
        outer = math.prod(int(c.sum()) for c in counts[:-1])
        if int(term.rels[-1].step) != 1:
            rows += outer * int(counts[-1].sum())
        else:
            # a run of spanned rows has one count: outer is a multiple of spanned
            rows += outer // spanned * -(-n // lanes) if share else outer * n
    return rows


def executed(node, shape, lanes: int, shared) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per listed pattern of ``node``, the pairs a kernel with ``lanes`` (0: one query at a
    time; ``shared`` from :func:`plan_lanes`) computes and the key rows it visits: the one
    count the backend reports, the planner prices and the profile reads."""
    share_of = dict(zip((h.terms for h in distinct_heads(node)), shared or ()))
    groups = plan_groups(node, shape, lanes)
    pairs = tuple(lane_pairs(h, shape, lanes, share_of[h.terms]) if lanes else h.pairs()
                  for h in node.patterns)
    rows = tuple(lane_rows(h, shape, lanes, share_of.get(h.terms), groups)
                 for h in node.patterns)
    return pairs, rows


def plan_lanes(node, shape, lanes=None) -> tuple[int, tuple | None]:
    """``(lanes, shared)``: queries per tile, and per distinct head pattern which terms the
    lanes share (the others run lane by lane on their own keys); ``(0, None)`` for one query
    at a time.

    A term is shared when at least ``LANE_MIN_EFFICIENCY`` of the pairs the tile computes for
    it are attended: windows much wider than the tile, aligned blocks, axes and global tokens,
    not a 7-wide neighbourhood (half of an 8-lane tile's keys wasted) nor criss-cross's column
    (one key per lane). Without ``lanes``, the widest width whose estimated cost
    (``LANE_PAIR_COST`` per shared pair, 1 per lane-by-lane pair) is at most 0.85 of the
    one-query kernel's is chosen; wider tiles share each loaded key among more queries
    (measured on a causal 256-wide 1-D window: 8 lanes beat 4).
    """
    heads = distinct_heads(node)
    if lanes == 0:
        return 0, None
    widths = [lanes] if lanes is not None else sorted(set(LANE_CHOICES) | {
        int(a.size) for head in heads for term in head.terms for a in term.rels[-1].atoms
        if isinstance(a, ir.Block) and is_number(a.size) and 2 <= a.size <= 16}, reverse=True)
    alone = sum(head.pairs() for head in node.patterns)
    for width in widths:
        terms = {h.terms: _lane_terms(h, shape, width) for h in heads}
        shared = tuple(tuple(share for share, _ in terms[h.terms]) for h in heads)
        cost = sum(LANE_PAIR_COST * pairs if share else pairs
                   for head in node.patterns for share, pairs in terms[head.terms])
        if lanes is not None or (any(map(any, shared)) and cost <= 0.85 * alone):
            return width, shared
    return 0, None


def plan_groups(node, shape, lanes: int) -> tuple[int, ...]:
    """Rows a tile of ``lanes`` spans on each axis but the last: ``()`` for self-attention or
    one query at a time, else per axis the most rows (up to ``GROUP_LANES`` queries a tile
    in all) that divide it into aligned runs whose every term of every head has the same key
    bounds there (a ratio-``r`` upsampling: ``r``). The rows' lanes then read one set of
    keys on that axis, exactly (an axis without such runs spans 1); the pairs a kernel
    computes do not change, the key rows it visits and the tiles it runs are fewer.
    """
    import numpy as np

    if not lanes or node.key_grid is None or len(shape) < 2:
        return ()
    heads, key_shape = distinct_heads(node), node.key_grid.shape
    groups = []
    for a, (n, nk) in enumerate(zip(shape[:-1], key_shape[:-1])):
        n, coords = int(n), np.arange(int(n), dtype=np.int64)
        sides = np.stack([np.broadcast_to(side, coords.shape) for head in heads
                          for term in head.terms
                          for side in term.rels[a].bounds(coords, int(nk), ir.NUMPY_OPS, n)])
        room = GROUP_LANES // (lanes * math.prod(groups))
        fits = [g for g in range(2, min(room, n) + 1) if n % g == 0 and (
            sides.reshape(len(sides), n // g, g) == sides[:, ::g, None]).all()]
        groups.append(max(fits, default=1))
    return tuple(groups) if math.prod(groups) > 1 else ()


def distinct_heads(node) -> list:
    """The distinct patterns of ``node``'s heads, in first-use order: one row of the bounds
    table each (``source.kernels`` gives the kernels, one per distinct shape)."""
    out = []
    for head in node.patterns:
        if head.terms not in [h.terms for h in out]:
            out.append(head)
    return out


def head_map(node) -> list[int]:
    """Index of each listed head's pattern in :func:`distinct_heads` (its rows of the bounds
    table)."""
    distinct = [h.terms for h in distinct_heads(node)]
    return [distinct.index(h.terms) for h in node.patterns]


def check_lanes(lanes, allow_none: bool = False) -> None:
    """Raise for a ``lanes`` that is not 0 (one query at a time) or an int >= 2."""
    if lanes is None and allow_none:
        return
    if isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 0 or lanes == 1:
        raise PatternError(f"numba: lanes={lanes!r}; expected 0 (one query at a time) or an "
                           f"int >= 2 (queries per tile).")


def work_items(shape, lanes: int, groups=()) -> int:
    """Work items per (batch, head) of a kernel: tiles of ``lanes`` along the last axis on
    every row of the outer axes (every ``groups[a]`` rows of axis ``a``,
    :func:`plan_groups`), or ``QUERY_TILE`` consecutive queries without lanes."""
    if lanes:
        return math.prod(shape[:-1]) // math.prod(groups) * -(-shape[-1] // lanes)
    return -(-math.prod(shape) // QUERY_TILE)


def runs_first(node):
    """``node`` with, in each pattern, the terms that hold one key on the last axis (an ``Eq``
    there: an axis, criss-cross's column) after the others. The forward buffers the first
    term's last-axis run in one loop and tests later terms' keys one by one against it, so a
    long run pays most first (criss-cross as row | column: forward 0.92x the time)."""
    def order(head):  # sorted() is stable: the other terms keep their order
        return dataclasses.replace(head, terms=tuple(sorted(
            head.terms, key=lambda term: any(isinstance(a, ir.Eq) for a in term.rels[-1].atoms))))

    if isinstance(node, ir.HeadsIR):
        return dataclasses.replace(node, patterns=tuple(order(h) for h in node.patterns))
    return order(node)
