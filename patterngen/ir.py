"""The normal form of a pattern: a union of separable terms of 1-D relations.

A *term* is one 1-D relation per grid axis: query ``q`` sees key ``p`` iff ``(q[a], p[a])`` is in
relation ``a`` for every axis ``a``. A pattern is a union of terms (:class:`IR`), or one such
union per head (:class:`HeadsIR`). Each relation is the intersection (:class:`Rel`) of a few
*atoms*, and for a fixed query coordinate ``i`` every atom's keys form an arithmetic progression
``start, start + step, ... < stop``. The intersection of progressions is again one, so a whole
relation has a single progression too.

Every atom states its progression once, in :meth:`Atom.bounds`, written against a small ``ops``
namespace (``min``, ``max``, ``where``, ``full``). The same formula evaluates on numpy arrays
(layout, counts, the dense oracle, the numba kernels' table of bounds) and on torch tensors
(FlexAttention's ``mask_mod``). One formula for every consumer: they cannot drift apart.

Example:
    >>> import numpy as np
    >>> Window(3).bounds(np.arange(5), 5, NUMPY_OPS)
    (array([0, 0, 1, 2, 2]), array([3, 3, 4, 5, 5]))
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import numpy as np
import sympy

from . import limits
from .errors import PatternError
from .grid import Grid, is_number

__all__ = [
    "Atom", "All", "Eq", "Lt", "Le", "Window", "Block", "KeyIn", "QueryIn", "QueryTokens",
    "Rel", "Term", "IR", "HeadsIR", "NUMPY_OPS", "torch_ops",
    "inclusion_exclusion", "verify", "check_stride", "WINDOW_MODES", "pattern_of_head",
    "heads_of", "axis_first", "center",
]

WINDOW_MODES = ("clamp", "pad", "causal")
MAX_UNION_PIECES = 4096


# --------------------------------------------------------------------------------------------
# ops namespaces: what `bounds` may call besides + - * // % and comparisons


def _np_full(i, value):
    return np.full(np.shape(i), value, dtype=np.int64)


NUMPY_OPS = SimpleNamespace(min=np.minimum, max=np.maximum, where=np.where, full=_np_full)


def torch_ops():
    """ops for torch tensors (imported lazily: the IR does not need torch)."""
    import torch

    def as_tensor_like(x, ref):
        return x if isinstance(x, torch.Tensor) else torch.full_like(ref, x)

    def tmin(a, b):
        ref = a if isinstance(a, torch.Tensor) else b
        return torch.minimum(as_tensor_like(a, ref), as_tensor_like(b, ref))

    def tmax(a, b):
        ref = a if isinstance(a, torch.Tensor) else b
        return torch.maximum(as_tensor_like(a, ref), as_tensor_like(b, ref))

    def twhere(c, a, b):
        return torch.where(c, a, b)

    return SimpleNamespace(min=tmin, max=tmax, where=twhere,
                           full=lambda i, v: torch.full_like(i, v))


def center(i, nq, nk):
    """The key coordinate ``c(i) = floor((i + 0.5) * nk / nq)`` a query sits over when the
    query axis has ``nq`` positions and the key axis ``nk`` (torch's ``interpolate`` mapping
    ``"nearest-exact"``); ``i`` itself when ``nk == nq``. Integer arithmetic, so the same
    expression serves ints, numpy and torch arrays."""
    return ((2 * i + 1) * nk) // (2 * nq)


# --------------------------------------------------------------------------------------------
# atoms


class Atom:
    """A 1-D relation whose keys, for one query coordinate, are one arithmetic progression."""

    #: ``True`` when every query sees itself (so ``Eq & atom == Eq``).
    reflexive = True
    #: ``True`` for an atom that reads the query's own coordinate even when the keys live on
    #: another grid (every other atom reads the key coordinate the query sits over).
    on_query_grid = False

    @property
    def step(self):
        return 1

    def bounds(self, i, n, ops):
        """``(start, stop)`` of query ``i``'s keys on an axis of ``n``; empty when stop <= start.

        ``stop`` is tight (last key + 1), so block layouts can use it directly.
        """
        raise NotImplementedError

    def params(self) -> tuple:
        return ()

    def __repr__(self):
        return type(self).__name__ + "(" + ", ".join(map(str, self.params())) + ")"

    def subs(self, mapping) -> "Atom":
        values = {f: _subs(getattr(self, f), mapping) for f in self.__dataclass_fields__}
        return replace(self, **values)


def _subs(value, mapping):
    if isinstance(value, sympy.Basic):
        value = value.subs(mapping, simultaneous=True)
        return int(value) if value.is_Integer else value
    return value


@dataclass(frozen=True, repr=False)
class All(Atom):
    """Every key on the axis."""

    def bounds(self, i, n, ops):
        return ops.full(i, 0), ops.full(i, n)


@dataclass(frozen=True, repr=False)
class Eq(Atom):
    """Only the key at the query's own coordinate."""

    def bounds(self, i, n, ops):
        return i, i + 1


@dataclass(frozen=True, repr=False)
class Lt(Atom):
    """Keys strictly before the query."""

    reflexive = False

    def bounds(self, i, n, ops):
        return ops.full(i, 0), i


@dataclass(frozen=True, repr=False)
class Le(Atom):
    """Keys at or before the query."""

    def bounds(self, i, n, ops):
        return ops.full(i, 0), i + 1


@dataclass(frozen=True, repr=False)
class Window(Atom):
    """NATTEN-style neighbourhood of ``size`` keys, with ``dilation``, ``stride`` and a ``mode``.

    Dilation ``d`` splits the axis into ``d`` interleaved groups (coordinates equal mod ``d``);
    each group is a sub-axis of ``m = ceil((n - g) / d)`` tokens and the query at group index
    ``j = i // d`` gets a window on it. The window spans ``size // 2`` group positions left and
    ``size - 1 - size // 2`` right (even sizes reach one further left, as in NATTEN). Modes:

    - ``clamp``: shifted inward at the borders, always ``size`` keys (needs ``m >= size``);
    - ``pad``: truncated at the borders (a zero-padded sliding window);
    - ``causal``: the query and the ``size - 1`` group positions before it, truncated at 0.

    Stride ``s`` (NATTEN 0.20's generalised neighbourhoods) cuts each dilation group into runs
    of ``s`` consecutive group positions, ``[t*s, t*s + s)``, whose queries share the window of
    one *leader*: the run's centre ``t*s + s // 2`` (the right one of two for even ``s``), or,
    causal, its last position ``t*s + s - 1``; a leader past the group's end is its last
    position ``m - 1``. A causal query keeps its own end: keys from the leader's first to
    itself. ``pad`` truncates the leader's window (patterngen's extension; NATTEN has no pad).
    Every query stays inside its own keys for ``1 <= s <= size``.

    Attributes:
        size: keys per query (in the interior), ``>= 1``.
        dilation: distance between neighbouring keys, ``>= 1``.
        mode: one of ``clamp``, ``pad``, ``causal``.
        stride: queries per group sharing one window, ``1 <= stride <= size``.
    """

    size: object
    dilation: object = 1
    mode: str = "clamp"
    stride: object = 1

    @property
    def step(self):
        return self.dilation

    def params(self):
        return (self.size, self.dilation, self.stride)

    def __repr__(self):
        dil = f", dilation={self.dilation}" if self.dilation != 1 else ""
        stride = f", stride={self.stride}" if self.stride != 1 else ""
        return f"Window({self.size}{dil}{stride}, {self.mode})"

    def leader(self, j, m, ops):
        """Group position whose window group position ``j`` uses (``j`` itself for stride 1)."""
        s = self.stride
        if s == 1:
            return j
        last = s - 1 if self.mode == "causal" else s // 2
        return ops.min((j // s) * s + last, m - 1)

    def bounds(self, i, n, ops):
        k, d = self.size, self.dilation
        if d == 1:
            g, j, m = 0, i, n
        else:
            g, j, m = i % d, i // d, (n - i % d + d - 1) // d
        c = self.leader(j, m, ops)
        left = k // 2
        if self.mode == "clamp":
            s = ops.min(ops.max(c - left, 0), m - k)
            e = s + k
        elif self.mode == "pad":
            s = ops.max(c - left, 0)
            e = ops.min(c + (k - left), m)
        else:
            s = ops.max(c - (k - 1), 0)
            e = j + 1
        if d == 1:
            return s, e
        return g + d * s, g + d * (e - 1) + 1


@dataclass(frozen=True, repr=False)
class Block(Atom):
    """Non-overlapping tiles of ``size`` with boundaries at ``offset + t * size`` (Swin).

    Tiles are cut at the axis ends, not wrapped: with ``offset > 0`` the first tile is
    ``[0, offset)`` and the last one is short, exactly Swin's cyclic shift plus region mask.

    Attributes:
        size: tile length, ``>= 1``.
        offset: position of the first interior boundary, ``0 <= offset < size``.
    """

    size: object
    offset: object = 0

    def params(self):
        return (self.size, self.offset)

    def bounds(self, i, n, ops):
        m, s = self.size, self.offset
        if s == 0:
            t0 = (i // m) * m
            return t0, ops.min(t0 + m, n)
        t0 = ((i - s) // m) * m + s
        return ops.max(t0, 0), ops.min(t0 + m, n)


@dataclass(frozen=True, repr=False)
class KeyIn(Atom):
    """Keys in ``[start, stop)`` for every query (global key tokens)."""

    start: object
    stop: object
    reflexive = False

    def params(self):
        return (self.start, self.stop)

    def bounds(self, i, n, ops):
        return ops.full(i, self.start), ops.full(i, self.stop)


@dataclass(frozen=True, repr=False)
class QueryIn(Atom):
    """Every key, for queries in ``[start, stop)``; nothing for other queries (global queries)."""

    start: object
    stop: object
    reflexive = False

    def params(self):
        return (self.start, self.stop)

    def bounds(self, i, n, ops):
        return ops.full(i, 0), ops.where((i >= self.start) & (i < self.stop), n, 0)


@dataclass(frozen=True, repr=False)
class QueryTokens(QueryIn):
    """Every key, for queries whose own coordinate is in ``[start, stop)``: the global query
    tokens of a pattern whose keys live on another grid (:func:`patterngen.lower` with
    ``key_grid``), where :class:`QueryIn` would read the key coordinate the query sits over."""

    on_query_grid = True


# --------------------------------------------------------------------------------------------
# relations: intersections of atoms on one axis


def _meet_progressions(a, b, ops):
    """Intersect progressions ``a = (start, stop, step)`` and ``b`` (numeric steps)."""
    (s1, e1, p1), (s2, e2, p2) = a, b
    lo, hi = ops.max(s1, s2), ops.min(e1, e2)
    if p2 == 1:
        return (lo + (s1 - lo) % p1 if p1 != 1 else lo), hi, p1
    if p1 == 1:
        return lo + (s2 - lo) % p2, hi, p2
    g = math.gcd(p1, p2)
    lcm = p1 * p2 // g
    inv = pow(p1 // g, -1, p2 // g) if p2 // g > 1 else 0
    x0 = s1 + p1 * ((((s2 - s1) // g) * inv) % (p2 // g))
    x = lo + (x0 - lo) % lcm
    if g == 1:
        return x, hi, lcm
    return x, ops.where((s2 - s1) % g == 0, hi, x), lcm


@dataclass(frozen=True)
class Rel:
    """The intersection of ``atoms`` on one axis (no atoms: every key).

    Build with :meth:`of`, which normalises: drops ``All``, collapses ``Eq`` with reflexive
    atoms, ``Lt`` with ``Le``, removes duplicates and sorts, so equal relations compare equal.

    Attributes:
        atoms: the intersected atoms, canonical order.
    """

    atoms: tuple = ()

    @staticmethod
    def of(*atoms) -> "Rel":
        kept = set()
        for a in atoms:
            kept |= set(a.atoms) if isinstance(a, Rel) else {a}
        kept.discard(All())
        if Eq() in kept:
            kept = {a for a in kept if not a.reflexive} | {Eq()}
        if Lt() in kept:
            kept.discard(Le())
        return Rel(tuple(sorted(kept, key=repr)))

    @property
    def is_empty(self) -> bool:
        """Structurally empty for every axis length (e.g. ``Eq & Lt``)."""
        kinds = set(self.atoms)
        if Eq() in kinds and Lt() in kinds:
            return True
        for cls in (KeyIn, QueryIn):
            # type, not isinstance: QueryTokens reads other coordinates than QueryIn
            ranges = [(a.start, a.stop) for a in self.atoms if type(a) is cls]
            if len(ranges) > 1 and all(is_number(v) for r in ranges for v in r):
                if max(r[0] for r in ranges) >= min(r[1] for r in ranges):
                    return True
        return False

    @property
    def step(self):
        steps = [a.step for a in self.atoms if a.step != 1]
        if not steps:
            return 1
        if len(steps) == 1:
            return steps[0]
        return math.lcm(*(int(s) for s in steps))

    def bounds(self, i, n, ops, nq=None):
        """``(start, stop)`` of the keys of query ``i``; their step is :attr:`step`.

        ``n`` is the key axis's length; ``nq``, when given and not ``n``, the query axis's:
        the atoms then give the keys of :func:`center` ``(i)`` on the key axis (those with
        :attr:`Atom.on_query_grid` still read ``i``).
        """
        c = i if nq is None or nq is n or nq == n else center(i, nq, n)

        def one(atom):
            return (*atom.bounds(i if atom.on_query_grid else c, n, ops), atom.step)

        if not self.atoms:
            return All().bounds(i, n, ops)
        prog = one(self.atoms[0])
        for atom in self.atoms[1:]:
            prog = _meet_progressions(prog, one(atom), ops)
        return prog[0], prog[1]

    def counts(self, n: int, nq: int | None = None) -> np.ndarray:
        """Keys per query for every query coordinate ``0..nq-1`` (default ``n``) of a
        numeric axis; keys on an axis of ``n``."""
        queries = np.arange(n if nq is None else nq, dtype=np.int64)
        start, stop = self.bounds(queries, n, NUMPY_OPS, nq)
        step = int(self.step)
        return np.maximum(stop - start + step - 1, 0) // step

    def contains(self, i, p, n, ops, nq=None):
        """Whether key coordinate ``p`` is in query ``i``'s keys (vectorised, broadcasting)."""
        start, stop = self.bounds(i, n, ops, nq)
        inside = (p >= start) & (p < stop)
        step = self.step
        return inside if step == 1 else inside & ((p - start) % step < 1)

    def subs(self, mapping) -> "Rel":
        return Rel.of(*(a.subs(mapping) for a in self.atoms))

    def within(self, other: "Rel") -> bool:
        """Structurally a subset of ``other`` for every axis length (sound, not complete)."""
        mine = set(self.atoms)
        if set(other.atoms) <= mine:
            return True
        return Eq() in mine and all(a in mine or a.reflexive for a in other.atoms)

    def __and__(self, other: "Rel") -> "Rel":
        return Rel.of(self, other)

    def __repr__(self):
        return " & ".join(map(repr, self.atoms)) if self.atoms else "All()"


@dataclass(frozen=True)
class Term:
    """A separable term: one :class:`Rel` per grid axis.

    Attributes:
        rels: the per-axis relations, axis 0 first.
    """

    rels: tuple

    @property
    def is_empty(self) -> bool:
        return any(r.is_empty for r in self.rels)

    def __and__(self, other: "Term") -> "Term":
        return Term(tuple(a & b for a, b in zip(self.rels, other.rels)))

    def contains(self, q, p, shape, ops, key_shape=None):
        """Membership of key coordinates ``p[a]`` for query coordinates ``q[a]`` (per axis);
        ``shape`` is the query grid's, ``key_shape`` the key grid's (default the same)."""
        key_shape = shape if key_shape is None else key_shape
        out = None
        for a, rel in enumerate(self.rels):
            part = rel.contains(q[a], p[a], key_shape[a], ops, shape[a])
            out = part if out is None else out & part
        return out

    def counts(self, shape, key_shape=None) -> list[np.ndarray]:
        """Per-axis keys-per-query vectors (their outer product is the term's per-query count);
        ``key_shape``: the key grid's, when the keys live on another grid."""
        if key_shape is None:
            return [rel.counts(int(n)) for rel, n in zip(self.rels, shape)]
        return [rel.counts(int(nk), int(n)) for rel, n, nk in zip(self.rels, shape, key_shape)]

    def subs(self, mapping) -> "Term":
        return Term(tuple(r.subs(mapping) for r in self.rels))

    def within(self, other: "Term") -> bool:
        """Structurally a subset of ``other`` (see :meth:`Rel.within`)."""
        return all(r.within(u) for r, u in zip(self.rels, other.rels))

    def __repr__(self):
        return "(" + ", ".join(map(repr, self.rels)) + ")"


def inclusion_exclusion(terms, nonempty=None) -> list[tuple[int, Term]]:
    """``[(sign, term)]`` with ``|union| = sum(sign * |term|)`` over non-empty intersections.

    An empty intersection prunes all its supersets, so disjoint unions (lexicographic causal)
    and mostly-disjoint ones stay linear in size.

    Raises:
        PatternError: when the expansion has more than ``MAX_UNION_PIECES`` pieces.
    """
    nonempty = nonempty or (lambda t: not t.is_empty)
    out: list[tuple[int, Term]] = []

    def expand(first, current, sign):
        for idx in range(first, len(terms)):
            t = terms[idx] if current is None else current & terms[idx]
            if not nonempty(t):
                continue
            out.append((sign, t))
            if len(out) > MAX_UNION_PIECES:
                raise PatternError(
                    f"Union of {len(terms)} terms expands to more than {MAX_UNION_PIECES} "
                    f"inclusion-exclusion pieces; simplify the pattern (merge global tokens "
                    f"into ranges)."
                )
            expand(idx + 1, t, -sign)

    expand(0, None, 1)
    return out


@dataclass(frozen=True)
class IR:
    """A pattern on a grid: the union of :attr:`terms`.

    With :attr:`key_grid` the queries live on :attr:`grid` and the keys on the key grid: the
    query at ``x`` sees the keys each term gives the key coordinate :func:`center` ``(x)``
    (per axis), except atoms that read the query's own coordinate (:class:`QueryTokens`).

    Attributes:
        grid: the grid the pattern was lowered for (the queries' grid).
        terms: separable terms, none structurally empty, no duplicates.
        label: the spec's expression, for headers and reports.
        key_grid: the keys' grid when it differs from :attr:`grid`, else ``None``.
    """

    grid: Grid
    terms: tuple
    label: str = field(default="", compare=False)
    key_grid: Grid | None = None

    @property
    def patterns(self) -> tuple["IR", ...]:
        """The listed patterns: this one (a :class:`HeadsIR` lists one per head class)."""
        return (self,)

    @property
    def per_head(self) -> tuple["IR", ...]:
        """:attr:`patterns` under its former name."""
        return self.patterns

    @property
    def ndim(self) -> int:
        return self.grid.ndim

    @property
    def keys(self) -> Grid:
        """The grid the keys live on (:attr:`grid` for self-attention)."""
        return self.grid if self.key_grid is None else self.key_grid

    @property
    def numeric(self) -> bool:
        return self.grid.numeric and self.keys.numeric

    def _key_shape(self):
        return None if self.key_grid is None else self.key_grid.shape

    def subs(self, mapping) -> "IR":
        return make_ir(self.grid.subs(mapping), [t.subs(mapping) for t in self.terms], self.label,
                       None if self.key_grid is None else self.key_grid.subs(mapping))

    def pieces(self) -> list[tuple[int, Term]]:
        """Inclusion-exclusion expansion; numeric grids also prune numerically empty pieces."""
        if self.numeric:
            shape, keys = self.grid.shape, self._key_shape()
            return inclusion_exclusion(
                self.terms,
                lambda t: not t.is_empty and all(c.any() for c in t.counts(shape, keys)))
        return inclusion_exclusion(self.terms)

    def key_counts(self) -> np.ndarray:
        """Exact keys per query, row-major, without any tokens x tokens array."""
        shape = self.grid.require_numeric("key_counts")
        self.keys.require_numeric("key_counts")
        limits.check("PATTERNGEN_MAX_TOKENS", math.prod(shape),
                     f"key_counts: grid {self.grid}'s tokens")
        total = np.zeros(shape, dtype=np.int64)
        for sign, t in self.pieces():
            c = t.counts(shape, self._key_shape())
            total += sign * _outer(c)
        return total.reshape(-1)

    def pairs(self) -> int:
        """Exact number of attended (query, key) pairs on a numeric grid."""
        shape = self.grid.require_numeric("pairs")
        self.keys.require_numeric("pairs")
        return int(sum(sign * math.prod(int(c.sum()) for c in t.counts(shape, self._key_shape()))
                       for sign, t in self.pieces()))

    def __repr__(self):
        over = "" if self.key_grid is None else f" over keys on {self.key_grid}"
        return (f"IR({self.label or '?'} on {self.grid}{over}: "
                + " | ".join(map(repr, self.terms)) + ")")


def pattern_of_head(head, patterns: int):
    """Index of the listed pattern that head ``head`` uses: heads cycle through the list.

    The one place the rule is written (:func:`heads_of` is its inverse); ``head`` may be an
    int or an integer array/tensor.
    """
    return head % patterns


def heads_of(pattern: int, patterns: int, heads: int) -> range:
    """The heads, below ``heads``, that use listed pattern ``pattern`` of ``patterns``: those
    :func:`pattern_of_head` maps to it, in order.

    Example:
        >>> list(heads_of(1, 3, 8))
        [1, 4, 7]
    """
    return range(pattern, heads, patterns)


@dataclass(frozen=True)
class HeadsIR:
    """A different pattern per head: head ``h`` uses
    ``patterns[pattern_of_head(h, len(patterns))]``.

    Attributes:
        grid: the grid.
        patterns: one :class:`IR` per listed pattern.
        label: the spec's expression.
        key_grid: the keys' grid when it differs from :attr:`grid` (see :class:`IR`).
    """

    grid: Grid
    patterns: tuple
    label: str = field(default="", compare=False)
    key_grid: Grid | None = None

    @property
    def heads(self) -> tuple[IR, ...]:
        """:attr:`patterns` under its former name."""
        return self.patterns

    @property
    def per_head(self) -> tuple[IR, ...]:
        """:attr:`patterns` under its former name."""
        return self.patterns

    @property
    def ndim(self) -> int:
        return self.grid.ndim

    @property
    def keys(self) -> Grid:
        """The grid the keys live on (:attr:`grid` for self-attention)."""
        return self.grid if self.key_grid is None else self.key_grid

    def subs(self, mapping) -> "HeadsIR":
        return HeadsIR(self.grid.subs(mapping), tuple(h.subs(mapping) for h in self.patterns),
                       self.label, None if self.key_grid is None else self.key_grid.subs(mapping))


def _outer(vectors):
    out = vectors[0]
    for v in vectors[1:]:
        out = np.multiply.outer(out, v)
    return out


def _contained(t: Term, u: Term, shape, key_shape=None) -> bool:
    """Whether term ``t`` is a subset of ``u`` on a numeric grid, exactly, in O(sum of axes).

    Per axis, ``R <= U`` iff ``|R & U|(i) == |R|(i)`` for every query coordinate ``i``.
    """
    key_shape = shape if key_shape is None else key_shape
    return all(np.array_equal((r & v).counts(nk, n), r.counts(nk, n))
               for r, v, n, nk in zip(t.rels, u.rels, shape, key_shape))


def make_ir(grid: Grid, terms, label: str = "", key_grid: Grid | None = None) -> IR:
    """Build an :class:`IR`, dropping empty, duplicate and (numeric grids) subsumed terms.

    Dropping a term contained in another keeps the union and keeps inclusion-exclusion small
    for unions of intersections, which distribute into many overlapping terms. Order is kept.
    ``key_grid``: the keys' grid, when it differs from ``grid``.
    """
    key_grid = None if key_grid is None or key_grid == grid else key_grid
    kept = []
    for t in terms:
        if not t.is_empty and t not in kept:
            kept.append(t)
    within = Term.within
    if grid.numeric and (key_grid is None or key_grid.numeric):
        shape = [int(n) for n in grid.shape]
        keys = None if key_grid is None else [int(n) for n in key_grid.shape]
        kept = [t for t in kept if all(c.any() for c in t.counts(shape, keys))]

        def within(t, u):
            return t.within(u) or _contained(t, u, shape, keys)

    pruned = []
    for idx, t in enumerate(kept):
        # drop t if another term contains it; of two equal sets keep the first
        if any(within(t, u) and (j < idx or not within(u, t))
               for j, u in enumerate(kept) if j != idx):
            continue
        pruned.append(t)
    return IR(grid, tuple(pruned), label, key_grid)


def check_stride(size, stride, where: str = "") -> None:
    """NATTEN's rule ``stride <= size`` (``utils/checks.py``), checked where both are numbers.

    Raises:
        PatternError: naming the values, the axis (``where``) and the rule.
    """
    if is_number(size) and is_number(stride) and int(stride) > int(size):
        raise PatternError(
            f"Invalid stride={stride}{where}: stride cannot be larger than the window size "
            f"(size={size}); expected 1 <= stride <= size, as in NATTEN.")


def verify(ir) -> None:
    """Check an IR's invariants; raise :class:`PatternError` naming the first broken one.

    Every term has one relation per axis; atoms are known and their sizes are integers >= 1
    (or symbols); a relation that meets several dilated atoms has numeric steps.
    """
    for head in ir.patterns:
        keys = head.key_grid
        if keys is not None and keys.ndim != head.grid.ndim:
            raise PatternError(f"IR with query grid {head.grid} (rank {head.grid.ndim}) and key "
                               f"grid {keys} (rank {keys.ndim}); expected the same rank.")
        for t in head.terms:
            if not isinstance(t, Term) or len(t.rels) != head.grid.ndim:
                raise PatternError(f"IR term {t!r} does not have {head.grid.ndim} relations.")
            for rel in t.rels:
                for atom in rel.atoms:
                    if not isinstance(atom, (All, Eq, Lt, Le, Window, Block, KeyIn, QueryIn,
                                             LineTable)):
                        raise PatternError(f"Unrecognized IR atom: {atom!r}")
                    if isinstance(atom, Window) and atom.mode not in WINDOW_MODES:
                        raise PatternError(f"Window mode={atom.mode!r} not in {WINDOW_MODES}.")
                    if isinstance(atom, Window):
                        check_stride(atom.size, atom.stride)
                    for v in atom.params():
                        if is_number(v) and int(v) < 0:
                            raise PatternError(f"Negative parameter {v} in atom {atom!r}.")
                steps = [a.step for a in rel.atoms if a.step != 1]
                if len(steps) > 1 and not all(is_number(s) for s in steps):
                    raise PatternError(f"Relation {rel!r} meets symbolic dilations {steps}.")


@dataclass(frozen=True, repr=False)
class LineTable(Atom):
    """Keys read from constant per-query tables: query ``i`` sees ``starts[i]``, then every
    ``stride``-th key below ``stops[i]`` (``stops[i] <= starts[i]``: no key).

    The axis a rank of :mod:`patterngen.distributed` holds: its local lines (own shard and halo)
    are laid out one interval after another, and a relation's bounds, evaluated at the global
    axis length, become this table in local coordinates. numpy and eager torch index the
    tables (the numba kernels read their bounds from numpy's evaluation). Cost
    formulas have no closed form for it: it is counted exactly (the axis length is
    ``len(starts)``).

    Attributes:
        starts, stops: one entry per query coordinate (tuples of ints).
        stride: the keys' step.
    """

    starts: tuple
    stops: tuple
    stride: int = 1
    reflexive = False

    @property
    def step(self):
        return self.stride

    def params(self):
        return (self.stride,)

    def __repr__(self):
        return f"LineTable({len(self.starts)} lines, stride={self.stride})"

    def subs(self, mapping) -> "LineTable":
        return self

    def bounds(self, i, n, ops):
        if is_number(n) and int(n) != len(self.starts):
            raise PatternError(f"{self!r} is defined on an axis of {len(self.starts)} lines, "
                               f"not n={n}.")
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(i, torch.Tensor):  # FlexAttention's mask_mod
            starts = torch.as_tensor(self.starts, dtype=torch.int64, device=i.device)
            stops = torch.as_tensor(self.stops, dtype=torch.int64, device=i.device)
            return starts[i], stops[i]
        return (np.asarray(self.starts, dtype=np.int64)[i],
                np.asarray(self.stops, dtype=np.int64)[i])


def axis_first(lowered, axis: int):
    """The same pattern with ``axis`` as axis 0 (queries and keys permuted alike)."""
    if axis == 0:
        return lowered
    perm = (axis, *(a for a in range(lowered.ndim) if a != axis))
    grid = Grid(tuple(lowered.grid.shape[a] for a in perm))
    keys = None if lowered.key_grid is None else Grid(
        tuple(lowered.key_grid.shape[a] for a in perm))

    def move(head):
        return IR(grid, tuple(Term(tuple(t.rels[a] for a in perm)) for t in head.terms),
                  head.label, keys)

    if isinstance(lowered, IR):
        return move(lowered)
    return HeadsIR(grid, tuple(move(h) for h in lowered.patterns), lowered.label, keys)
