"""Term-wise lowering and a cost-model planner: each term of a union on its cheapest executor.

A pattern is a union of separable terms (:mod:`patterngen.ir`). A term whose relation on every
axis is ``All``, ``Eq``, a causal ``Lt``/``Le``, a fixed key range (``KeyIn``: global keys),
a fixed query range (``QueryIn``: global queries) or *strided tiles* (read from the relation's
bounds: every query's keys are its residue class modulo the step inside its tile, as for
``Block`` at any offset and MaxViT's grid ``Window(G, dilation=H // G)``) is a *batch of small
dense problems* after a view/permute of q, k and v: ``Eq`` axes become batch dimensions, tiled
axes split into a tile index and a residue (batch dimensions) and a position (a problem
dimension), the others stay whole problem axes. Swin's windows and MaxViT's grid are 64
problems of 49 x 49 on a 56 x 56 grid, CCNet's row and column are 64 problems of 64 x 64 each.
Such a term runs as one fused attention call (:class:`DenseShape` says how); windows and other
relations stay *gather* terms, run by a kernel that visits each query's keys (numba on CPU).

The terms of a union overlap (criss-cross's row and column share the query itself). The plan
runs the gather terms first, as one group whose kernel already visits each key once, then each
dense term with a mask that excludes the pairs of every earlier term (CCNet masks the
diagonal). Every pair is then counted once, and the parts merge exactly by log-sum-exp:
``out = sum_t exp(lse_t - lse) out_t`` with ``lse = logsumexp_t lse_t``
(``backends/planned/``).

:func:`plan` asks every executor through the registry (:mod:`patterngen.backends.executor`)
whether it can run the call (:class:`patterngen.call.Call`) and what it would launch, prices
that work with rates of its primitives measured once per machine
(:mod:`patterngen.calibrate`), puts each term on the cheaper of a dense batch and the gather
group, and compares the term-wise plan with running the whole pattern on one executor. It
prints like a query planner's EXPLAIN, every op with its count and rate.

Example:
    >>> import patterngen as pg
    >>> from patterngen.plan import dense_shape
    >>> term = pg.lower(pg.block(7), (56, 56)).terms[0]
    >>> dense_shape(term, (56, 56))
    DenseShape(batch=64, queries=49, keys=49, axes=tiles(7)|tiles(7))
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from . import ir, limits
from .call import Call, Op
from .errors import BackendUnavailable, PatternError
from .grid import is_number
from .parse import as_ir

__all__ = ["plan", "Plan", "TermPlan", "DenseShape", "DenseAxis", "dense_shape", "dense_shapes",
           "LOWERINGS", "gather_first"]

#: executors that copy q, k, v that are not contiguous (numba's kernels read C-contiguous
#: arrays; the fused kernels of dense terms read unit-stride rows; compiled FlexAttention
#: would compile again for every new layout); sdpa gathers blocks from any layout
COPYING = ("numba", "gather", "dense", "flex")
#: largest dense mask (batch x queries x keys booleans) a dense term may build; beyond it the
#: term's pairs are too many for a dense batch to be the cheap primitive anyway
MAX_DENSE_MASK = 1 << 24


# --------------------------------------------------------------------------------------------
# a term as a batch of dense problems


@dataclass(frozen=True)
class DenseAxis:
    """How one grid axis enters a dense term's problems.

    Attributes:
        kind: ``batch`` (``Eq``: one problem per coordinate), ``tiles`` (one problem per tile
            and residue class, positions in the class), ``full`` (every query and key of the
            axis), ``keys`` (every query, keys in ``[lo, hi)``) or ``queries`` (queries in
            ``[lo, hi)``, every key).
        n: the axis length.
        size: positions per problem (``tiles``): a tile spans ``size * dilation`` positions
            of the padded axis and holds ``dilation`` problems, its residue classes modulo
            ``dilation`` (Swin's windows: ``dilation`` 1; MaxViT's grid: one tile of the whole
            axis, ``dilation = H // G`` classes of ``G`` tokens).
        dilation: the distance between a problem's neighbouring positions (``tiles``).
        pad_left, pad_right: padding that makes the tiles whole (``tiles`` with an offset or a
            length the tile does not divide); padded positions are masked keys and dropped
            queries.
        lo, hi: the key (``keys``) or query (``queries``) range.
        roll: Swin's cyclic shift (``tiles``): position ``j < n`` of the view holds token
            ``(j + roll) % n``, so tiles that an offset cuts at both ends of the axis share
            one tile, their pairs apart by the mask (``pad_left`` is then 0).
    """

    kind: str
    n: int
    size: int = 0
    pad_left: int = 0
    pad_right: int = 0
    lo: int = 0
    hi: int = 0
    dilation: int = 1
    roll: int = 0

    @property
    def tiles(self) -> int:
        """Tiles of ``size * dilation`` positions (``tiles``)."""
        return (self.pad_left + self.n + self.pad_right) // (self.size * self.dilation)

    @property
    def batch(self) -> int:
        if self.kind == "batch":
            return self.n
        if self.kind == "tiles":
            return self.tiles * self.dilation
        return 1

    @property
    def queries(self) -> int:
        return {"batch": 1, "tiles": self.size, "queries": self.hi - self.lo}.get(self.kind,
                                                                                   self.n)

    @property
    def keys(self) -> int:
        return {"batch": 1, "tiles": self.size, "keys": self.hi - self.lo}.get(self.kind, self.n)

    def coords(self, side: str, unrolled: bool = False) -> np.ndarray:
        """``(batch, positions)`` grid coordinates of the problems' queries or keys (``side``
        ``"q"`` or ``"k"``); ``-1`` marks padding. A tile's problems are its residue classes
        in order: problem ``t * dilation + r`` holds the positions ``r, r + dilation, ...`` of
        tile ``t``. With ``unrolled``, positions on the padded axis before the roll's wrap
        (padding and wrapped tokens get coordinates outside ``[0, n)``): ``key - query`` of
        every attended pair is the same, and is the same for every problem."""
        if self.kind == "batch":
            return np.arange(self.n, dtype=np.int64)[:, None]
        if self.kind == "tiles":
            c = np.arange(self.batch * self.size, dtype=np.int64) - self.pad_left
            if unrolled:
                c = c + self.roll
            else:
                c = np.where((c >= 0) & (c < self.n), (c + self.roll) % self.n, -1)
            return c.reshape(self.tiles, self.size, self.dilation).transpose(0, 2, 1).reshape(
                self.batch, self.size)
        ranged = (self.kind == "keys") == (side == "k") and self.kind in ("keys", "queries")
        start, stop = (self.lo, self.hi) if ranged else (0, self.n)
        return np.arange(start, stop, dtype=np.int64)[None]

    def __repr__(self):
        if self.kind == "tiles":
            dil = f", dilation {self.dilation}" if self.dilation != 1 else ""
            pad = f", pad {self.pad_left}+{self.pad_right}" if self.pad_left or self.pad_right \
                else ""
            roll = f", roll {self.roll}" if self.roll else ""
            return f"tiles({self.size}{dil}{roll}{pad})"
        if self.kind in ("keys", "queries"):
            return f"{self.kind}[{self.lo}:{self.hi}]"
        return self.kind


#: how a dense term's tiles that an offset cuts at the axis's ends are lowered: ``roll`` as
#: Swin does (:attr:`DenseAxis.roll`: fewer tiles, a region mask on the wrapped ones) where
#: that covers the relation and saves a tile, else ``pad`` (the axis padded to whole tiles)
LOWERINGS = ("auto", "pad", "roll")


def _axis_plan(rel: ir.Rel, n: int, lowering: str = "auto") -> DenseAxis | str:
    """The dense form of one relation on an axis of ``n``, or why it has none."""
    if not rel.atoms:
        return DenseAxis("full", n)
    for atom in rel.atoms:
        if not all(is_number(v) for v in atom.params()):
            return f"{atom!r} has symbolic sizes"
    match rel.atoms:
        case (ir.Eq(),):
            return DenseAxis("batch", n)
        case (ir.Lt() | ir.Le(),):
            return DenseAxis("full", n)
        case (ir.KeyIn(start=a, stop=b),):
            return DenseAxis("keys", n, lo=max(int(a), 0), hi=min(int(b), n))
        case (ir.QueryIn(start=a, stop=b),):
            return DenseAxis("queries", n, lo=max(int(a), 0), hi=min(int(b), n))
    tiles = _strided_tiles(rel, n)
    if tiles is None:
        return f"{rel!r} is a gather (each query has its own keys)"
    if lowering != "pad":
        return _rolled(rel, tiles, fewer=lowering == "auto") or tiles
    return tiles


def _rolled(rel: ir.Rel, tiles: DenseAxis, fewer: bool) -> DenseAxis | None:
    """``tiles`` (padded on the left) rolled as Swin rolls: by the first tile's padding, so
    that a tile starts at 0, the tiles cut at both ends sharing one; ``None`` where that
    leaves a pair of the relation across two problems, or (``fewer``) saves no tile."""
    if not tiles.pad_left:
        return None
    span = tiles.size * tiles.dilation
    rolled = DenseAxis("tiles", tiles.n, tiles.size, 0, -tiles.n % span,
                      dilation=tiles.dilation, roll=span - tiles.pad_left)
    if fewer and rolled.tiles >= tiles.tiles:
        return None
    # each token appears once per side, so the relation's pairs inside the problems are all
    # of them exactly when the counts agree
    if int(_axis_membership(rel, rolled).sum()) != int(rel.counts(tiles.n).sum()):
        return None
    return rolled


def _strided_tiles(rel: ir.Rel, n: int) -> DenseAxis | None:
    """The relation as ``tiles`` after one strided view, read from its per-query bounds (so
    every spelling of the same relation qualifies: ``Block``, a dilated window whose span
    covers its residue class, a strided window whose runs are tiles, a meet of them), or
    ``None``.

    It qualifies when its queries fall into *classes*, each the positions ``s, s + D, ...``
    of a residue modulo the relation's step ``D`` within one tile of ``size * D`` positions
    (the axis padded on the left by ``pad_left``, and on the right to whole tiles), and every
    query's keys are its whole class, or its class up to itself (a causal cut, masked).
    Classes of unequal length (``D`` does not divide the tile's span on the axis) are padded
    to ``size`` and the padding masked."""
    step = int(rel.step)
    i = np.arange(n, dtype=np.int64)
    start, stop = (np.broadcast_to(np.asarray(b, dtype=np.int64), (n,))
                   for b in rel.bounds(i, n, ir.NUMPY_OPS))
    count = np.maximum(stop - start + step - 1, 0) // step
    last = start + step * (count - 1)
    # every query in its own keys, which start at its class's first position
    if not ((count > 0) & (start <= i) & (i <= last) & ((i - start) % step == 0)).all():
        return None
    # the queries that share a first key, as many as the positions from it to the last of
    # them, all on its residue: exactly that class's positions
    members = np.bincount(start, minlength=n)
    end = start + step * (members[start] - 1)
    if not (i <= end).all():
        return None
    if not ((last == end).all() or (last == i).all()):
        return None
    size = int(members.max())
    span = size * step
    # where the first tile ends: after its classes, which start at 0 .. step - 1 when it
    # holds a step of positions; when shorter, at its first position whose class reaches
    # past the first step (the second tile's)
    head = end[:min(step, n)]
    ends = [int(head.max()) + 1] + [int(r) + 1 for r in np.flatnonzero(head[1:] >= step)[:1]]
    for first_end in ends:
        pad_left = 0 if first_end >= n else span - first_end
        if 0 <= pad_left < span and _tiles_classes(start, end, step, span, pad_left):
            return DenseAxis("tiles", n, size, pad_left, -(pad_left + n) % span,
                            dilation=step)
    return None


def _tiles_classes(start, end, step: int, span: int, pad_left: int) -> bool:
    """Whether the classes ``[start, end]`` (per query, step ``step``) are the residue
    classes of the tiles of ``span`` positions that begin at ``-pad_left``."""
    n = len(start)
    i = np.arange(n, dtype=np.int64)
    lo = i + pad_left
    lo = lo - lo % span - pad_left  # the query's tile
    want_start = i - step * ((i - np.maximum(lo, 0)) // step)
    want_end = i + step * ((np.minimum(lo + span, n) - 1 - i) // step)
    return bool((want_start == start).all() and (want_end == end).all())


@dataclass(frozen=True)
class DenseShape:
    """A term as ``batch`` dense problems of ``queries`` x ``keys`` (per batch and head).

    Attributes:
        axes: one :class:`DenseAxis` per grid axis.
    """

    axes: tuple

    @property
    def batch(self) -> int:
        return math.prod(a.batch for a in self.axes)

    @property
    def queries(self) -> int:
        return math.prod(a.queries for a in self.axes)

    @property
    def keys(self) -> int:
        return math.prod(a.keys for a in self.axes)

    @property
    def executed_pairs(self) -> int:
        """Pairs the dense calls compute (padding and masked pairs included), per head."""
        return self.batch * self.queries * self.keys

    @property
    def rolled(self) -> bool:
        """Whether an axis is rolled as Swin rolls (:attr:`DenseAxis.roll`): its views are
        gathers by a token index."""
        return any(a.roll for a in self.axes)

    @property
    def copied(self) -> bool:
        """Whether the views of q, k, v (and the output's inverse) copy: unless every batch
        dimension comes before every problem dimension in memory (CCNet's row, a stripe of
        whole rows: a tile of rows is its tile index, then its rows), the permute does; a
        roll, padding or a range of queries or keys always does."""
        dims = []  # (is a batch dimension, size) in memory order
        for a in self.axes:
            if a.kind == "tiles":
                if a.roll or a.pad_left or a.pad_right:
                    return True
                dims += [(True, a.tiles), (False, a.size), (True, a.dilation)]
            elif a.kind in ("batch", "full"):
                dims.append((a.kind == "batch", a.n))
            else:
                return True
        kinds = [batch for batch, n in dims if n != 1]
        return False in kinds and True in kinds[kinds.index(False):]

    def coords(self, side: str) -> list[np.ndarray]:
        return [a.coords(side) for a in self.axes]

    def __repr__(self):
        axes = "|".join(map(repr, self.axes))
        return f"DenseShape(batch={self.batch}, queries={self.queries}, keys={self.keys}, " \
               f"axes={axes})"


def dense_shape(term: ir.Term, shape, lowering: str = "auto") -> DenseShape | str:
    """``term`` on the numeric grid ``shape`` as a batch of dense problems, or the reason it is
    not one (a window, a meet of several atoms, a symbolic size). ``lowering``: one of
    :data:`LOWERINGS` (``"roll"`` rolls every axis where that covers the relation, even
    when it saves no tile)."""
    if lowering not in LOWERINGS:
        raise PatternError(f"Invalid lowering={lowering!r}; expected one of {LOWERINGS}.")
    axes = []
    for a, (rel, n) in enumerate(zip(term.rels, shape)):
        got = _axis_plan(rel, int(n), lowering)
        if isinstance(got, str):
            return f"axis {a}: {got}"
        axes.append(got)
    return DenseShape(tuple(axes))


def dense_shapes(term: ir.Term, shape) -> dict:
    """The lowerings of ``term`` as dense problems, ``{"pad": ..., "roll": ...}`` (only
    ``"pad"`` where no roll saves a tile; empty when the term is no dense batch), for pricing
    each by what it computes (:attr:`DenseShape.executed_pairs`)."""
    got = {"pad": dense_shape(term, shape, "pad"), "roll": dense_shape(term, shape)}
    if isinstance(got["pad"], str):
        return {}
    return got if got["roll"] != got["pad"] else {"pad": got["pad"]}


def _axis_membership(rel: ir.Rel, axis: DenseAxis) -> np.ndarray:
    """``(batch, queries, keys)`` booleans: the relation's pairs among one axis's problems."""
    qc, kc = axis.coords("q"), axis.coords("k")
    inside = rel.contains(qc[:, :, None], kc[:, None, :], axis.n, ir.NUMPY_OPS)
    valid = (qc >= 0)[:, :, None] & (kc >= 0)[:, None, :]
    return np.broadcast_to(np.asarray(inside), valid.shape) & valid


def _kron_axes(parts: list[np.ndarray], combine=np.logical_and) -> np.ndarray:
    """Combine per-axis ``(batch_a, q_a, k_a)`` arrays into ``(batch, queries, keys)`` with
    batch, query and key positions row-major over the axes (the order of the q/k views)."""
    out = parts[0]
    for p in parts[1:]:
        b, q, k = out.shape
        c, r, s = p.shape
        out = combine(out[:, None, :, None, :, None], p[None, :, None, :, None, :]).reshape(
            b * c, q * r, k * s)
    return out


def _mask_parts(shape: DenseShape, term: ir.Term, earlier):
    """Per-axis memberships of ``term``'s own pairs and of each ``earlier`` term that overlaps
    it, among the problems of ``shape``; ``None`` when the term needs no mask."""
    own = [_axis_membership(rel, ax) for rel, ax in zip(term.rels, shape.axes)]
    overlaps = []
    for u in earlier:
        parts = [_axis_membership(rel, ax) for rel, ax in zip(u.rels, shape.axes)]
        if all(p.any() for p in parts):
            overlaps.append(parts)
    if all(p.all() for p in own) and not overlaps:
        return None
    return own, overlaps


def has_mask(shape: DenseShape, term: ir.Term, earlier) -> bool:
    """Whether :func:`dense_mask` is not ``None``: padding, causal pairs, pairs of the term's
    problems it does not attend, or pairs of an ``earlier`` term, without building it."""
    return _mask_parts(shape, term, earlier) is not None


def dense_mask(shape: DenseShape, term: ir.Term, earlier) -> np.ndarray | None:
    """The term's mask over its problems, ``(batch or 1, queries, keys)``: its own pairs, less
    padding and the pairs of the ``earlier`` terms; ``None`` when every pair is attended.

    Raises:
        PatternError: when the mask would exceed ``MAX_DENSE_MASK`` booleans (the planner
            runs such terms as gather terms, see :func:`gather_first`).
    """
    parts = _mask_parts(shape, term, earlier)
    if parts is None:
        return None
    if shape.executed_pairs > MAX_DENSE_MASK:
        raise PatternError(
            f"dense term {term!r}: its mask would hold {shape.executed_pairs} booleans, more "
            f"than MAX_DENSE_MASK={MAX_DENSE_MASK}; run it as a gather term.")
    own, overlaps = parts
    mask = _kron_axes(own)
    for other in overlaps:
        mask = mask & ~_kron_axes(other)
    return _collapsed(mask)


def open_padding(mask: np.ndarray | None, shape: DenseShape) -> np.ndarray | None:
    """``mask`` (:func:`dense_mask`) with the rows of padded queries (no token of the grid)
    all True: for a softmax whose rows must each have a key (their output is dropped)."""
    rows = _kron_axes([(c < 0)[:, :, None] for c in shape.coords("q")], np.logical_or)
    if mask is None or not rows.any():
        return mask
    return _collapsed(mask | rows)


def _collapsed(mask: np.ndarray) -> np.ndarray:
    """``mask`` as ``(1, queries, keys)`` when every problem's is the same."""
    return np.ascontiguousarray(mask[:1] if (mask == mask[:1]).all() else mask)


def gather_first(head: ir.IR, shape) -> tuple[list[ir.Term], list[tuple[ir.Term, DenseShape]]]:
    """Split a pattern's terms into gather terms (run first, as one group) and dense terms with
    their shapes, each in union order. A term with a dense form whose mask might exceed
    ``MAX_DENSE_MASK`` (its own pairs are not all of its problems', or another term overlaps
    it) is a gather term: such a batch computes far more pairs than it attends anyway."""
    gather, dense = [], []
    for term in head.terms:
        got = dense_form(term, shape, [u for u in head.terms if u is not term])
        if isinstance(got, str):
            gather.append(term)
        else:
            dense.append((term, got))
    return gather, dense


def dense_form(term: ir.Term, shape, others=()) -> DenseShape | str:
    """:func:`dense_shape`, or why the planner gathers the term: no dense form, or a mask
    beyond ``MAX_DENSE_MASK`` given the ``others`` terms of its pattern."""
    got = dense_shape(term, shape)
    if isinstance(got, str) or got.executed_pairs <= MAX_DENSE_MASK:
        return got
    if _mask_parts(got, term, others) is None:
        return got
    return (f"a dense batch of {got.executed_pairs} pairs would need a mask larger than "
            f"MAX_DENSE_MASK={MAX_DENSE_MASK}")


# --------------------------------------------------------------------------------------------
# the plan


@dataclass(frozen=True)
class TermPlan:
    """One term of a plan.

    Attributes:
        term: the IR term.
        executor: ``"dense"`` (a batch of fused attention calls) or ``"gather"`` (the group of
            gather terms, run by ``gather_backend``).
        pairs: the pairs this term adds to the earlier ones (per head).
        executed: pairs its executor computes (per head).
        dense: the :class:`DenseShape` when the term has one.
        predicted_ms: the predicted time of this term's share.
        notes: why the other executors were not chosen.
        work: how its prediction was priced: one line per op, its count and rate.
    """

    term: ir.Term
    executor: str
    pairs: int
    executed: int
    dense: DenseShape | None
    predicted_ms: float
    notes: tuple = ()
    work: tuple = ()


@dataclass(frozen=True)
class Plan:
    """How a pattern runs: term by term (dense batches and one gather group, merged by
    log-sum-exp) or whole on one backend, chosen by predicted time.

    Attributes:
        label: the pattern.
        grid: the numeric grid.
        device, dtype: what the inputs are.
        backward: whether the prediction is for forward + backward.
        head_dim, heads, batch: the sizes predicted for.
        strategy: ``"terms"`` or the whole-pattern backend's name.
        patterns: per listed pattern (see :func:`patterngen.heads`), its :class:`TermPlan` list
            (term order is execution order: gather terms first).
        gather_backend: the backend that runs gather terms (``"numba"``), or ``None``.
        predicted_ms: the chosen strategy's predicted time.
        options: every strategy considered: ``{name: predicted ms or the reason it cannot run}``.
        contiguous: whether the inputs were contiguous; if not, the executors that copy them
            (``COPYING``) carry the copies in their predictions.
        call: the :class:`patterngen.call.Call` planned for.
        work: per strategy that can run, the lines its prediction was priced from (one per
            op: count, rate); the term-wise strategy's shared costs (its call, the merge).
        key_grid: the keys' grid when it is another (then every term is a gather term).
        compared: per strategy that can run, the figure the choice compared: its prediction
            with the numba kernels' share (the whole pattern, a gather group) times their
            executor's ``margin``.
    """

    label: str
    grid: tuple
    device: str
    dtype: str
    backward: bool
    head_dim: int
    heads: int
    batch: int
    strategy: str
    patterns: tuple
    gather_backend: str | None
    predicted_ms: float
    options: dict = field(default_factory=dict)
    contiguous: bool = True
    call: Call | None = None
    work: dict = field(default_factory=dict)
    key_grid: tuple | None = None
    compared: dict = field(default_factory=dict)

    def __str__(self):
        pass_ = "forward+backward" if self.backward else "forward"
        over = ("" if self.key_grid is None else
                f" over keys on {'x'.join(map(str, self.key_grid))} (all terms gathered)")
        lines = [f"Plan for {self.label} on grid {'x'.join(map(str, self.grid))}{over} "
                 f"(batch={self.batch}, heads={self.heads}, head_dim={self.head_dim}, "
                 f"{self.dtype} on {self.device}, {pass_})",
                 f"  chosen: {self.strategy}, predicted {self.predicted_ms:.3g} ms"]
        if not self.contiguous:
            lines.append(f"  inputs not contiguous: {', '.join(COPYING)} priced with a copy "
                         f"of q, k, v")
        for p, terms in enumerate(self.patterns):
            if len(self.patterns) > 1:
                lines.append(f"  pattern {p} (heads h with h % {len(self.patterns)} == {p}):")
            for tp in terms:
                if self.strategy != "terms":
                    lines.append(f"  term {tp.term!r}: in the whole pattern, {tp.pairs} new "
                                 f"pairs")
                    continue
                shape = (f"batch {tp.dense.batch} x {tp.dense.queries}q x {tp.dense.keys}k"
                         if tp.executor == "dense" else f"{self.gather_backend} kernel")
                lines.append(f"  term {tp.term!r}: {tp.executor} ({shape}), {tp.pairs} new "
                             f"pairs, {tp.executed} executed, {tp.predicted_ms:.3g} ms")
                lines += [f"      {note}" for note in tp.notes]
                lines += [f"      {w}" for w in tp.work]
        lines.append("  strategies: " + "; ".join(
            (f"{k} {v:.3g} ms" + (f" (compared as {self.compared[k]:.3g})"
                                  if self.compared.get(k, v) != v else ""))
            if isinstance(v, float) else f"{k}: {v}"
            for k, v in self.options.items()))
        for name, work in self.work.items():
            lines.append(f"  {name} priced from:")
            lines += [f"      {w}" for w in work]
        return "\n".join(lines)

    __repr__ = __str__


def _dtype_name(dtype) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _new_pairs(terms, shape, key_grid=None) -> list[int]:
    """Pairs each term adds to the union of the terms before it (exact, separable counts);
    ``key_grid``: the keys' grid, when it is another."""
    grid = ir.Grid(tuple(shape)) if not isinstance(shape, ir.Grid) else shape
    out, before = [], 0
    for t in range(len(terms)):
        total = ir.IR(grid, tuple(terms[:t + 1]), key_grid=key_grid).pairs()
        out.append(total - before)
        before = total
    return out


def plan(pattern, grid=None, head_dim: int = 32, heads: int = 4, batch: int = 1,
         device: str = "cpu", dtype="float32", backward: bool = False, rates=None,
         executors=None, terms: str | None = None, contiguous: bool = True,
         kv_heads: int | None = None, bias: bool = False, softcap: bool = False,
         extra_keys: int = 0, key_grid=None, bias_grad: bool | None = None) -> Plan:
    """Choose how ``pattern`` runs on ``grid``: term by term or whole, by predicted time.

    Every executor is asked through the registry (:func:`patterngen.backends.executors`)
    whether it can run the call and what work it would launch; the work is priced by
    ``rates``.

    Args:
        pattern: a spec or a lowered IR (numeric grid).
        grid: the grid, e.g. ``(64, 64)``.
        head_dim, heads, batch: the input sizes to predict for; ``kv_heads``: k's and v's
            heads (default ``heads``).
        device: ``"cpu"`` or ``"cuda"`` (an index is allowed: ``"cuda:1"``).
        dtype: a torch dtype or its name.
        backward: predict forward + backward (training) instead of forward only.
        rates: a :class:`patterngen.calibrate.Rates` (default: this machine's, measured once
            and cached; see :func:`patterngen.calibrate.rates`).
        executors: restrict the strategies to these names (``"terms"`` and the whole-pattern
            executors: ``"numba"``, ``"sdpa"``, ``"flex"``); default all.
        terms: in the term-wise strategy, run every term that has a dense form ``"dense"``
            or every term ``"gather"``; default: each by predicted time.
        contiguous: whether q, k, v are contiguous; if not, each executor in ``COPYING``
            is charged a copy of them (one pass, at the merge's rate per element) per pass.
        bias, softcap, extra_keys: the call passes a bias table, has a softcap, attends so
            many extra keys: only executors that take them can run it.
        key_grid: the keys' grid when it is another (docs/cross.md): every term gathers.
        bias_grad: whether the bias table needs a gradient (default: with ``backward``).

    Returns:
        A :class:`Plan`; ``print(plan)`` explains it.

    Raises:
        PatternError: for an unknown executor or bad sizes, or a symbolic grid.
        BackendUnavailable: for a device other than CPU or CUDA, or when nothing can run the
            pattern (listing every strategy's reasons).
    """
    from . import calibrate
    from .backends import executors as registered

    lowered = as_ir(pattern, grid, key_grid)
    shape = lowered.grid.require_numeric("plan")
    limits.check("PATTERNGEN_MAX_PLAN_TOKENS", math.prod(shape),
                 f"plan: grid {lowered.grid}'s tokens (a named backend is not planned)")
    device_type = str(device).split(":")[0]
    if device_type not in ("cpu", "cuda"):
        raise BackendUnavailable(f"plan: device={device!r}; expected 'cpu' or 'cuda' "
                                 f"(optionally with an index, e.g. 'cuda:0').")
    dtype = _dtype_name(dtype)
    calibrate.check_dtype(dtype, "plan")
    table = registered()
    strategies = ("terms", *(name for name, ex in table.items() if ex.whole))
    wanted = tuple(executors) if executors is not None else strategies
    unknown = [e for e in wanted if e not in strategies]
    if unknown:
        raise PatternError(f"plan: unknown executors {unknown}; valid executors are "
                           f"{list(strategies)}.")
    if terms not in (None, "dense", "gather"):
        raise PatternError(f"plan: terms={terms!r}; expected None (by cost), 'dense' or "
                           f"'gather'.")
    call = Call(device_type, dtype, batch, heads, head_dim, kv_heads or 0, bool(backward),
                bool(bias), bool(softcap), int(extra_keys), bool(contiguous), bias_grad)
    rates = rates if rates is not None else calibrate.rates(device_type, dtype)

    options, whole, work = {}, {}, {}
    for name in strategies[1:]:
        if name not in wanted:
            continue
        ex = table[name]
        reason = ex.can_run(lowered, call)
        if device_type not in ex.planned_devices:
            unasked = f"not planned on {device_type} (use backend={name!r} explicitly)"
            reason = f"{reason}; {unasked}" if reason else unasked
        if reason is not None:
            options[name] = reason
            continue
        whole[name], work[name] = rates.price(ex.work(lowered, call), call.backward)
        options[name] = whole[name]

    term_plans = None
    if "terms" in wanted:
        term_plans, total, reason, shared = _plan_terms(lowered, shape, call, rates, table,
                                                        terms)
        options["terms"] = total if reason is None else reason
        if reason is None:
            whole["terms"] = total
            work["terms"] = shared
    if not whole:
        raise BackendUnavailable(
            f"plan: nothing can run {lowered.label} on device={device!r} with dtype={dtype!r}:"
            + "".join(f"\n  {k}: {v}" for k, v in options.items()))
    # each by its prediction with its numba kernels' share times their margin: the term-wise
    # plan's gather group is those kernels too, as uncertain as the whole pattern on them
    compared = {n: ms * table[n].margin if n in table else
                ms + (table["gather"].margin - 1.0) * sum(
                    tp.predicted_ms for tps in term_plans for tp in tps
                    if tp.executor == "gather")
                for n, ms in whole.items()}
    candidates = [n for n in whole if not (n == "terms" and _numba_again(term_plans, whole,
                                                                         call))]
    strategy = min(candidates, key=compared.get)
    gather_backend = None
    if strategy != "terms":
        term_plans = _whole_term_plans(lowered, shape, strategy)
    elif any(tp.executor == "gather" for tps in term_plans for tp in tps):
        gather_backend = table["gather"].backend
    return Plan(lowered.label, tuple(int(n) for n in shape), str(device), dtype, backward,
                head_dim, heads, batch, strategy, term_plans, gather_backend, whole[strategy],
                options, contiguous, call, work, key_grid=None if lowered.key_grid is None
                else tuple(int(n) for n in lowered.key_grid.shape), compared=compared)


def _numba_again(term_plans, whole: dict, call: Call) -> bool:
    """Whether a term-wise plan gathers every term, so that it runs the numba kernels on the
    whole pattern through the merge's operator, where the numba strategy, which can run the
    call, runs the same kernels without it (measured on a 7x7 window, 64x64, head_dim 64,
    forward+backward: 1.06x the numba strategy's time at one thread, 1.26x at two)."""
    return ("numba" in whole and not call.extra_keys
            and all(tp.executor == "gather" for tps in term_plans for tp in tps))


def _whole_term_plans(lowered, shape, strategy: str) -> tuple:
    out = []
    for head in lowered.patterns:
        pairs = _new_pairs(head.terms, shape, lowered.key_grid)
        out.append(tuple(TermPlan(t, strategy, p, p, None, 0.0) for t, p in
                         zip(head.terms, pairs)))
    return tuple(out)


def _gather_note(term, head, shape) -> tuple:
    """Why a term that was not priced against a dense batch is gathered."""
    why = dense_form(term, shape, [u for u in head.terms if u is not term])
    return ("no dense form: " + why,) if isinstance(why, str) else ()


def _every_query_has_a_key(term: ir.Term, shape) -> bool:
    return all(bool((counts > 0).all()) for counts in term.counts(shape))


def _pattern_call(call: Call, heads: int) -> Call:
    """``call`` for the ``heads`` heads one listed pattern serves (kv heads folded alike)."""
    group = call.heads // call.kv_heads
    kv = heads // group if heads % group == 0 and heads >= group else heads
    return replace(call, heads=heads, kv_heads=kv)


def _plan_terms(lowered, shape, call, rates, table, force):
    """Per listed pattern, each dense-able term on the cheaper of dense and gather (``force``:
    always one of them); the rest gathered. Returns ``(term plans, predicted ms, None,
    shared cost lines)`` or ``(None, None, reason, None)``."""
    dense_ex, gather_ex = table["dense"], table["gather"]
    gather_reason = gather_ex.can_run(lowered, call)
    grid = lowered.grid
    tokens = math.prod(shape)
    npat = len(lowered.patterns)
    plans, total, parts = [], 0.0, 0
    shared = [Op("launch", 1, kernel="terms")]
    if call.extra_keys:
        reason = table["extra"].can_run(lowered, call)
        if reason is not None:
            return None, None, reason, None
        shared += table["extra"].work(lowered, call)
        parts += 1

    def gather_ms(terms, pc):
        if not terms:
            return 0.0, ()
        sub = ir.IR(grid, tuple(terms), lowered.label, key_grid=lowered.key_grid)
        ms, lines = rates.price(gather_ex.work(sub, pc), call.backward)
        return ms, tuple(lines)

    def dense_ms(ds, pc, alone, masked):
        ms, lines = rates.price(dense_ex.work(ds, pc, tokens, alone, masked), call.backward)
        return ms, tuple(lines)

    for p, head in enumerate(lowered.patterns):
        # a term that would be the whole plan (one listed pattern, one term, a key for every
        # query, no softcap, no extra keys) runs through torch's autograd when dense
        alone = (npat == 1 and len(head.terms) == 1 and not call.softcap
                 and not call.extra_keys and lowered.key_grid is None
                 and _every_query_has_a_key(head.terms[0], shape))
        pc = _pattern_call(call, len(ir.heads_of(p, npat, call.heads)))
        if force == "gather" or lowered.key_grid is not None:
            # keys on another grid: every term gathers (the dense forms are of one grid)
            gather, dense = list(head.terms), []
        else:
            gather, dense = gather_first(head, shape)
        if gather and gather_reason is not None:
            return None, None, (f"gather terms {gather} need the {gather_ex.backend} backend, "
                                f"which cannot run these inputs ({gather_reason})"), None
        chosen_dense, notes = [], {}
        for i, (term, ds) in enumerate(dense):
            # the gather group and the dense terms listed before it run first
            earlier = gather + [t for t, _ in dense[:i]]
            d_ms, d_lines = dense_ms(ds, pc, alone, has_mask(ds, term, earlier))
            if gather_reason is not None or force == "dense":
                chosen_dense.append((term, ds, d_ms, d_lines))
                continue
            # what the gather group would cost more with this term in it
            g_ms = gather_ms(gather + [term], pc)[0] - gather_ms(gather, pc)[0]
            if d_ms * dense_ex.margin <= g_ms * gather_ex.margin:
                chosen_dense.append((term, ds, d_ms, d_lines))
                notes[term] = (f"gather: {g_ms:.3g} ms predicted",)
            else:
                gather.append(term)
                notes[term] = (f"dense: {d_ms:.3g} ms predicted for "
                               f"{ds.executed_pairs} executed pairs",)
        gather = [t for t in head.terms if t in gather]  # union order within the group
        order = gather + [t for t, _, _, _ in chosen_dense]
        if not order:
            plans.append(())
            continue
        pairs = _new_pairs(order, shape, lowered.key_grid)
        tps = []
        gather_pairs = sum(pairs[:len(gather)])
        g_ms, g_lines = gather_ms(gather, pc)
        for t, term in enumerate(gather):
            tps.append(TermPlan(term, "gather", pairs[t], pairs[t], None,
                                g_ms * pairs[t] / max(gather_pairs, 1),
                                notes.get(term, _gather_note(term, head, shape)),
                                g_lines if t == 0 else ()))
        for (term, ds, ms, lines), n in zip(chosen_dense, pairs[len(gather):]):
            tps.append(TermPlan(term, "dense", n, ds.executed_pairs, ds, ms,
                                notes.get(term, ()), lines))
        parts += bool(gather) + len(chosen_dense)
        total += g_ms + sum(ms for _, _, ms, _ in chosen_dense)
        plans.append(tuple(tps))
    if parts > 1:
        # each part that is merged: its views, masks and calls, its share of the merge's
        # bookkeeping (measured per part, beyond its kernel launch)
        shared += [Op("launch", parts, kernel="part"),
                   Op("merge", parts * tokens * call.batch * call.heads * call.head_dim)]
    ms, lines = rates.price(shared, call.backward)
    return tuple(plans), total + ms, None, tuple(lines)
