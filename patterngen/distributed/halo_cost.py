"""The symbolic halo: a rank's communication per step as sympy expressions in the grid sizes, the
number of ranks ``R`` and the rank index ``rank``.

It is a closed form for windows, blocks, equal lines, causal terms, whole-axis terms and one
range of global key lines, under stated assumptions (``R`` divides the axis, a shard is at least
a window's span); any other pattern gets an integer sympy function that counts exactly
(:func:`patterngen.distributed.halo.exchange_rows`) once the sizes are numbers.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy

from .. import ir
from ..errors import PatternError
from ..grid import is_number, symbol
from .halo import exchange_rows, query_rows, split_lines
from .reshard import reshard
from .schemes import (ALL, BEFORE, GLOBAL_KEYS, LOCAL, is_merged, is_reshardable, scheme_of,
                      schemes)

__all__ = ["RANK", "HaloCost", "halo_cost"]


#: the rank index in :class:`HaloCost` expressions (substitute ``rank=...``)
RANK = sympy.Symbol("rank", integer=True, nonnegative=True)


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
    for head in lowered.patterns:
        for term in head.terms:
            if is_merged(term):
                continue  # no key moves (see _closed_queries)
            rel, box = term.rels[0], _box_size(term, shape)
            scheme = scheme_of(rel)
            if box is None or is_reshardable(term):  # re-shard or gather: decided by counts
                return None
            if scheme == GLOBAL_KEYS and len(rel.atoms) == 1:
                keys.append((rel.atoms[0].start, rel.atoms[0].stop, box))
                continue
            if scheme == LOCAL:
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
            elif scheme == BEFORE and box == full:
                before = True
            elif scheme == ALL and len(rel.atoms) == 0 and box == full:
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
    merged = {t for head in lowered.patterns for t in head.terms if is_merged(t)}
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


def _holds(assumptions, ranks: int) -> bool:
    """Whether every assumption holds for every rank, on numeric sizes."""
    return all(bool(a.subs(RANK, r)) for a in assumptions for r in range(ranks))


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
    numeric = lowered.grid.numeric and is_number(ranks)
    closed = _closed_tokens(lowered, ranks, rank)
    closed_queries = _closed_queries(lowered, ranks, rank)
    if numeric and closed is not None and not _holds(closed[1], int(ranks)):
        closed = None  # e.g. shards of unequal length: the closed form would be wrong there
    if closed is None or closed_queries is None:
        tokens, queries, partials = (_exact_function(lowered, q)(ranks, rank)
                                     for q in ("tokens", "queries", "partials"))
        if any(not is_merged(t) and is_reshardable(t) for head in lowered.patterns
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
    resharded = reshard(lowered, split_lines(int(lowered.grid.shape[0]), int(ranks))) \
        if numeric else None
    return HaloCost(ranks, rank, tokens, tokens / line, queries, partials, pencil, returned,
                    forward, forward, forward / (sympy.sympify(flops) / ranks),
                    tuple(schemes(lowered, resharded)), assumptions,
                    closed is not None and closed_queries is not None)
