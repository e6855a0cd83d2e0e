"""How each term of a sharded pattern crosses the sharded axis: the scheme that brings its keys
to the queries (a halo, gathered lines, global keys, merged global queries or a re-shard)."""

from __future__ import annotations

from .. import ir

__all__ = ["scheme_of", "schemes", "is_merged", "is_reshardable"]

LOCAL, GLOBAL_KEYS, BEFORE, ALL, MERGED, RESHARD = (
    "halo", "global keys", "gather lines before", "gather all lines", "global queries merged",
    "re-shard")
EITHER = "re-shard or gather (whichever moves less, by counts)"


def scheme_of(rel: ir.Rel) -> str:
    """The scheme of a term whose relation along the sharded axis is ``rel`` (see
    :func:`schemes`)."""
    kinds = {type(a) for a in rel.atoms}
    if not kinds:
        return ALL
    if ir.KeyIn in kinds:
        return GLOBAL_KEYS
    if ir.QueryIn in kinds:
        return MERGED
    if kinds & {ir.Window, ir.Block, ir.Eq}:
        return LOCAL
    return BEFORE  # Lt / Le alone



def is_merged(term: ir.Term) -> bool:
    """Global queries along the sharded axis: computed by partial results merged by lse."""
    return any(isinstance(a, ir.QueryIn) for a in term.rels[0].atoms)


def is_reshardable(term: ir.Term) -> bool:
    """A term across the whole sharded axis (or every line before) and equal along axis 1:
    each pencil (all lines, a slice of axis 1) holds all its pairs."""
    return (len(term.rels) > 1 and scheme_of(term.rels[0]) in (ALL, BEFORE)
            and term.rels[1].atoms == (ir.Eq(),))



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
    return [(repr(t), RESHARD if (h, t) in chosen else EITHER
             if undecided and not is_merged(t) and is_reshardable(t) else scheme_of(t.rels[0]))
            for h, head in enumerate(lowered.patterns) for t in head.terms]


