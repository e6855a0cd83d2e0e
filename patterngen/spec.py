"""The pattern vocabulary: small immutable specs, composed with ``&`` and ``|``, lowered to IR.

A spec says *which keys each query may see* without naming a grid; :func:`lower` binds it to a
grid and returns the exact :mod:`patterngen.ir` form. Per-axis arguments take a scalar (the same
on every axis) or one value per axis.

Example:
    >>> import patterngen as pg
    >>> pg.window(7) | pg.global_tokens([0])
    (window(7) | global_tokens([0]))
    >>> len(pg.lower(pg.criss_cross(), (9, 9)).terms)
    2
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import sympy

from . import ir, limits
from .errors import PatternError
from .grid import Grid, as_grid, as_size, is_number

__all__ = [
    "Pattern", "Window", "Block", "Area", "Stripe", "CrissCross", "GlobalTokens", "Causal",
    "Full", "Union", "Intersection", "Heads", "window", "block", "area", "axis", "stripe",
    "criss_cross", "global_tokens", "causal", "full", "heads", "lower", "BORDERS",
]

BORDERS = ("clamp", "pad")


def _fmt(value) -> str:
    return str(value) if not isinstance(value, bool) else repr(value)


def _arg(value) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(map(_fmt, value)) + ")"
    return _fmt(value)


def _sizes(value, name: str, minimum: int = 1):
    """Validate a scalar-or-tuple size argument now (the grid's rank is checked at lowering)."""
    if isinstance(value, (tuple, list)):
        if not value:
            raise PatternError(f"Invalid {name}=(); expected a size or one size per axis.")
        return tuple(as_size(v, f"{name}[{a}]", minimum) for a, v in enumerate(value))
    return as_size(value, name, minimum)


def per_axis(value, grid: Grid, name: str) -> tuple:
    """Broadcast a scalar to every axis, or check that a tuple has one entry per axis.

    Raises:
        PatternError: when a tuple's length differs from the grid's rank.
    """
    if not isinstance(value, tuple):
        return (value,) * grid.ndim
    if len(value) != grid.ndim:
        raise PatternError(
            f"Invalid {name}={_arg(value)}: {len(value)} entries for a grid of rank "
            f"{grid.ndim} (grid={grid}); expected a scalar or {grid.ndim} entries."
        )
    return value


def _axis_index(axis, grid: Grid, name: str = "axis") -> int:
    if not -grid.ndim <= axis < grid.ndim:
        raise PatternError(
            f"Invalid {name}={axis} for a grid of rank {grid.ndim} (grid={grid}); expected "
            f"{-grid.ndim} <= {name} < {grid.ndim}."
        )
    return axis % grid.ndim


class Pattern:
    """Base of every spec: immutable, hashable, composable with ``&`` and ``|``."""

    def __and__(self, other: "Pattern") -> "Pattern":
        return Intersection(tuple(_flatten(Intersection, (self, _check(other, "&")))))

    def __or__(self, other: "Pattern") -> "Pattern":
        return Union(tuple(_flatten(Union, (self, _check(other, "|")))))

    def __bool__(self):
        raise PatternError(
            "Conversion of a pattern to bool is unsupported; this is usually `and`/`or` "
            "used where the bitwise `&`/`|` combine patterns."
        )

    def terms(self, grid: Grid) -> list:
        """The separable terms of this spec on ``grid`` (used by :func:`lower`)."""
        raise NotImplementedError

    def cross_terms(self, grid: Grid, key_grid: Grid) -> list:
        """The terms when queries on ``grid`` attend keys on ``key_grid``: the spec's terms on
        the key grid, which the IR evaluates at the key coordinate each query sits over."""
        return self.terms(key_grid)


def _check(other, op):
    if not isinstance(other, Pattern):
        raise PatternError(
            f"Cannot combine a pattern with {other!r} of type {type(other).__name__} using "
            f"{op!r}; both sides must be patterns."
        )
    if isinstance(other, Heads):
        raise PatternError("heads(...) must be the outermost pattern; combine inside it.")
    return other


def _flatten(cls, parts):
    for p in parts:
        if isinstance(p, Heads):
            raise PatternError("heads(...) must be the outermost pattern; combine inside it.")
        if isinstance(p, cls):
            yield from p.parts
        else:
            yield p


def _whole_axis():
    return ir.Rel.of()


@dataclass(frozen=True, repr=False)
class Window(Pattern):
    """A neighbourhood of ``size`` keys per axis (NATTEN semantics; see :class:`ir.Window`)."""

    size: object
    dilation: object = 1
    border: object = "clamp"
    causal: object = False
    stride: object = 1

    def __post_init__(self):
        object.__setattr__(self, "size", _sizes(self.size, "size"))
        object.__setattr__(self, "dilation", _sizes(self.dilation, "dilation"))
        object.__setattr__(self, "stride", _sizes(self.stride, "stride"))
        sizes, strides = self.size, self.stride
        if isinstance(sizes, tuple) or isinstance(strides, tuple):
            rank = len(sizes) if isinstance(sizes, tuple) else len(strides)
            # checked now when the ranks are known; per_axis checks each against the grid
            if isinstance(sizes, tuple) and isinstance(strides, tuple) and len(strides) != rank:
                raise PatternError(
                    f"Invalid stride={_arg(strides)}: {len(strides)} entries for "
                    f"size={_arg(sizes)} with {rank}; expected a scalar or {rank} entries.")
            sizes = sizes if isinstance(sizes, tuple) else (sizes,) * rank
            strides = strides if isinstance(strides, tuple) else (strides,) * rank
            for a, (k, st) in enumerate(zip(sizes, strides)):
                ir.check_stride(k, st, f" on axis {a}")
        else:
            ir.check_stride(sizes, strides)
        for b in self.border if isinstance(self.border, tuple) else (self.border,):
            if b not in BORDERS:
                raise PatternError(f"Unknown border={b!r}; expected one of {BORDERS}.")
        for c in self.causal if isinstance(self.causal, tuple) else (self.causal,):
            if not isinstance(c, bool):
                raise PatternError(f"Invalid causal={c!r}; expected True or False per axis.")

    def terms(self, grid):
        rels = []
        for a, (n, k, d, b, c, s) in enumerate(zip(
                grid.shape, per_axis(self.size, grid, "size"),
                per_axis(self.dilation, grid, "dilation"), per_axis(self.border, grid, "border"),
                per_axis(self.causal, grid, "causal"), per_axis(self.stride, grid, "stride"))):
            if all(is_number(v) for v in (n, k, d)) and k * d > n:
                raise PatternError(
                    f"The product of size and dilation cannot exceed the axis length: "
                    f"size={k}, dilation={d}, grid[{a}]={n} (size*dilation={k * d} > {n})."
                )
            ir.check_stride(k, s, f" on axis {a}")
            if k == 1:
                rels.append(ir.Rel.of(ir.Eq()))
            elif s == k and d == 1 and is_number(n) and is_number(k) and n % k == 0:
                # stride = size on a divisible axis: every run of k queries shares the keys of
                # its own run, exactly the aligned tile Block(k) (and its causal prefix)
                rels.append(ir.Rel.of(ir.Block(k), *([ir.Le()] if c else [])))
            else:
                rels.append(ir.Rel.of(ir.Window(k, d, "causal" if c else b, s)))
        return [ir.Term(tuple(rels))]

    def cross_terms(self, grid, key_grid):
        for a, (k, d, n) in enumerate(zip(per_axis(self.size, key_grid, "size"),
                                          per_axis(self.dilation, key_grid, "dilation"),
                                          key_grid.shape)):
            if all(is_number(v) for v in (n, k, d)) and k * d > n:
                raise PatternError(
                    f"window(size={k}, dilation={d}) counts keys of the key grid: it does not "
                    f"fit key_grid[{a}]={n} (queries on grid[{a}]={grid.shape[a]}); expected "
                    f"size * dilation <= {n}, as on a grid of its own.")
        return self.terms(key_grid)

    def __repr__(self):
        args = [_arg(self.size)]
        if self.dilation != 1:
            args.append(f"dilation={_arg(self.dilation)}")
        if self.border != "clamp":
            args.append(f"border={self.border!r}")
        if self.causal is not False:
            args.append(f"causal={_arg(self.causal)}")
        if self.stride != 1:
            args.append(f"stride={_arg(self.stride)}")
        return f"window({', '.join(args)})"


@dataclass(frozen=True, repr=False)
class Block(Pattern):
    """Non-overlapping ``size`` tiles, boundaries at ``offset + t*size`` (Swin W-/SW-MSA)."""

    size: object
    offset: object = 0

    def __post_init__(self):
        object.__setattr__(self, "size", _sizes(self.size, "size"))
        object.__setattr__(self, "offset", _sizes(self.offset, "offset", minimum=0))

    def terms(self, grid):
        rels = []
        for m, s in zip(per_axis(self.size, grid, "size"), per_axis(self.offset, grid, "offset")):
            if is_number(m) and is_number(s):
                s = s % m
            rels.append(ir.Rel.of(ir.Eq() if m == 1 else ir.Block(m, s)))
        return [ir.Term(tuple(rels))]

    def cross_terms(self, grid, key_grid):
        for a, (m, n) in enumerate(zip(per_axis(self.size, key_grid, "size"), key_grid.shape)):
            if is_number(m) and is_number(n) and m > n:
                raise PatternError(
                    f"block(size={m}) tiles the key grid, in key units: no tile of {m} exists "
                    f"on key_grid[{a}]={n} (queries on grid[{a}]={grid.shape[a]}); expected "
                    f"size <= {n} (a tile stated in query units is size * {n} // "
                    f"{grid.shape[a]} keys).")
        return self.terms(key_grid)

    def __repr__(self):
        off = f", offset={_arg(self.offset)}" if self.offset != 0 else ""
        return f"block({_arg(self.size)}{off})"


@dataclass(frozen=True, repr=False)
class Area(Pattern):
    """YOLOv12 area attention: ``areas`` equal contiguous chunks along ``axis``.

    Along axis 0 the chunks are those of YOLOv12's ``AAttn``: the row-major token sequence
    cut into ``areas`` equal runs, whole lines or not.
    """

    areas: object
    axis: int = 0

    def __post_init__(self):
        object.__setattr__(self, "areas", as_size(self.areas, "areas"))

    def terms(self, grid):
        a = _axis_index(self.axis, grid)
        n, areas = grid.shape[a], self.areas
        if is_number(n) and is_number(areas):
            if n % areas and a == 0 and grid.ndim > 1 and grid.numeric:
                return _token_chunks(tuple(int(m) for m in grid.shape), int(areas))
            if n % areas:
                raise PatternError(
                    f"area(areas={areas}) needs grid[{a}]={n} divisible by {areas}: the token "
                    f"list is cut into {areas} equal chunks of whole lines along axis {a}."
                )
            size = n // areas
        else:
            size = sympy.sympify(n) / areas
        rels = [_whole_axis()] * grid.ndim
        rels[a] = ir.Rel.of(ir.Eq() if size == 1 else ir.Block(size, 0))
        return [ir.Term(tuple(rels))]

    def __repr__(self):
        return f"area({self.areas}" + (f", axis={self.axis})" if self.axis else ")")


def _row_major_boxes(start: int, stop: int, shape: tuple) -> list:
    """Boxes, one ``(lo, hi)`` per axis, whose union is the row-major tokens
    ``[start, stop)`` of ``shape``: a partial first line, whole lines, a partial last line."""
    if start >= stop:
        return []
    if len(shape) == 1:
        return [((start, stop),)]
    inner = math.prod(shape[1:])
    first, last = start // inner, (stop - 1) // inner
    if first == last:
        return [((first, first + 1), *box) for box in
                _row_major_boxes(start - first * inner, stop - first * inner, shape[1:])]
    whole = (-(-start // inner), stop // inner)
    boxes = _row_major_boxes(start, whole[0] * inner, shape)
    if whole[0] < whole[1]:
        boxes.append((whole, *((0, m) for m in shape[1:])))
    return boxes + _row_major_boxes(whole[1] * inner, stop, shape)


def _token_chunks(shape: tuple, areas: int) -> list:
    """YOLOv12's areas on a grid whose first axis they do not divide: each chunk of
    ``tokens / areas`` row-major tokens is a union of boxes, and its pairs one term per
    (query box, key box)."""
    tokens = math.prod(shape)
    if tokens % areas:
        raise PatternError(
            f"area(areas={areas}) needs the grid's {tokens} tokens divisible by {areas}: "
            f"YOLOv12's AAttn cuts the row-major token sequence of grid {shape} into {areas} "
            f"equal chunks.")
    size = tokens // areas

    def rel(q: tuple, k: tuple, n: int):
        return ir.Rel.of(*([ir.QueryIn(*q)] * (q != (0, n))), *([ir.KeyIn(*k)] * (k != (0, n))))

    terms = []
    for c in range(areas):
        boxes = _row_major_boxes(c * size, (c + 1) * size, shape)
        terms += [ir.Term(tuple(rel(q, k, n) for q, k, n in zip(qb, kb, shape)))
                  for qb in boxes for kb in boxes]
    return terms


@dataclass(frozen=True, repr=False)
class Stripe(Pattern):
    """Stripes ``width`` lines wide running along ``axis`` (CSWin); ``width=1`` is axial."""

    axis: int = 0
    width: object = 1

    def __post_init__(self):
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise PatternError(f"Invalid axis={self.axis!r}; expected an integer axis index.")
        object.__setattr__(self, "width", _sizes(self.width, "width"))

    def terms(self, grid):
        a = _axis_index(self.axis, grid)
        rels = []
        for b, w in enumerate(per_axis(self.width, grid, "width")):
            if b == a:
                rels.append(_whole_axis())
            else:
                rels.append(ir.Rel.of(ir.Eq() if w == 1 else ir.Block(w, 0)))
        return [ir.Term(tuple(rels))]

    def __repr__(self):
        if self.width == 1:
            return f"axis({self.axis})"
        return f"stripe({self.axis}, width={_arg(self.width)})"


@dataclass(frozen=True, repr=False)
class CrissCross(Pattern):
    """CCNet: the query's full line along every axis (row and column in 2-D)."""

    def terms(self, grid):
        return [t for a in range(grid.ndim) for t in Stripe(a).terms(grid)]

    def __repr__(self):
        return "criss_cross()"


@dataclass(frozen=True, repr=False)
class GlobalTokens(Pattern):
    """Global tokens: each sees every key and every query sees it (Longformer/BigBird).

    Tokens are flat row-major indices or coordinate tuples. ``keys`` and ``queries`` name the
    two roles apart: key tokens every query sees, query tokens that see every key. With keys
    on another grid only these name tokens (``keys`` on the key grid, ``queries`` on the
    query grid); ``tokens`` is both roles on one grid.
    """

    tokens: tuple = ()
    keys: tuple | None = None
    queries: tuple | None = None

    def __post_init__(self):
        if self.tokens and (self.keys is not None or self.queries is not None):
            raise PatternError(
                f"global_tokens({list(self.tokens)}) also given keys= or queries=; expected "
                f"either tokens (both roles) or keys=/queries= (each role apart).")
        for name in ("tokens", "keys", "queries"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _token_list(value, name))
        if not self.tokens and not self.keys and not self.queries:
            raise PatternError("global_tokens() needs at least one token index.")

    @property
    def roles(self) -> tuple[tuple, tuple]:
        """``(key tokens, query tokens)``."""
        if self.tokens:
            return self.tokens, self.tokens
        return self.keys or (), self.queries or ()

    def coords(self, grid: Grid, tokens: tuple) -> list[tuple]:
        """Coordinates on ``grid`` of ``tokens`` (flat indices or coordinate tuples)."""
        out = []
        for t in tokens:
            if isinstance(t, tuple):
                if len(t) != grid.ndim:
                    raise PatternError(
                        f"Global token {t} has {len(t)} coordinates for a grid of rank "
                        f"{grid.ndim} (grid={grid})."
                    )
                c = t
            elif grid.ndim == 1 or t == 0:
                c = (t,) + (0,) * (grid.ndim - 1)
            else:
                shape = grid.require_numeric(f"global token index {t} in a {grid.ndim}-D grid")
                c = tuple(int(v) for v in _unravel(t, shape))
            for a, (v, n) in enumerate(zip(c, grid.shape)):
                if is_number(n) and not 0 <= v < n:
                    raise PatternError(
                        f"Global token {t} is outside the grid: coordinate {v} on axis {a} "
                        f"with grid[{a}]={n}; expected 0 <= index < {n}."
                    )
            out.append(c)
        return out

    def terms(self, grid):
        keys, queries = self.roles
        return (_token_terms(self.coords(grid, keys), grid.ndim, ir.KeyIn)
                + _token_terms(self.coords(grid, queries), grid.ndim, ir.QueryIn))

    def cross_terms(self, grid, key_grid):
        if self.tokens:
            raise PatternError(
                f"global_tokens({list(self.tokens)}) names tokens of one grid, but the queries "
                f"(grid={grid}) and keys (key_grid={key_grid}) live on two; expected "
                f"global_tokens(keys=[...], queries=[...]): key-grid tokens every query sees, "
                f"query-grid tokens that see every key.")
        keys, queries = self.roles
        return (_token_terms(self.coords(key_grid, keys), grid.ndim, ir.KeyIn)
                + _token_terms(self.coords(grid, queries), grid.ndim, ir.QueryTokens))

    def __repr__(self):
        if self.tokens:
            return f"global_tokens({list(self.tokens)})"
        roles = [f"{name}={list(getattr(self, name))}" for name in ("keys", "queries")
                 if getattr(self, name) is not None]
        return f"global_tokens({', '.join(roles)})"


def _token_list(tokens, name: str) -> tuple:
    tokens = [tokens] if isinstance(tokens, int) else tokens
    if not isinstance(tokens, (tuple, list)):
        raise PatternError(f"Invalid global_tokens {name}={tokens!r}; expected a list of flat "
                           f"indices or coordinate tuples.")
    tokens = tuple(tuple(t) if isinstance(t, (tuple, list)) else t for t in tokens)
    for t in tokens:
        for v in t if isinstance(t, tuple) else (t,):
            as_size(v, "token index", minimum=0)
    return tokens


def _token_terms(coords: list, ndim: int, atom) -> list:
    """One term per token (runs of tokens merged on a 1-D grid), each axis ``atom(lo, hi)``."""
    coords = sorted(set(coords))
    if ndim == 1:
        ranges = [((lo,), (hi,)) for lo, hi in _runs([c[0] for c in coords])]
    else:
        ranges = [(c, tuple(v + 1 for v in c)) for c in coords]
    return [ir.Term(tuple(ir.Rel.of(atom(lo, hi)) for lo, hi in zip(*r))) for r in ranges]


def _unravel(index, shape):
    if not 0 <= index < math.prod(shape):
        raise PatternError(f"Global token index {index} is out of range for grid {shape}; "
                           f"expected 0 <= index < {math.prod(shape)}.")
    out = []
    for n in reversed(shape):
        out.append(index % n)
        index //= n
    return tuple(reversed(out))


def _runs(values):
    runs = []
    for v in values:
        if runs and runs[-1][1] == v:
            runs[-1][1] = v + 1
        else:
            runs.append([v, v + 1])
    return [tuple(r) for r in runs]


@dataclass(frozen=True, repr=False)
class Causal(Pattern):
    """Keys at or before the query in row-major flattened order (lexicographic)."""

    def terms(self, grid):
        k = grid.ndim
        out = []
        for a in range(k):
            last = ir.Le() if a == k - 1 else ir.Lt()
            rels = [ir.Rel.of(ir.Eq())] * a + [ir.Rel.of(last)] + [_whole_axis()] * (k - a - 1)
            out.append(ir.Term(tuple(rels)))
        return out

    def __repr__(self):
        return "causal()"


@dataclass(frozen=True, repr=False)
class Full(Pattern):
    """Every query sees every key (dense attention)."""

    def terms(self, grid):
        return [ir.Term((_whole_axis(),) * grid.ndim)]

    def __repr__(self):
        return "full()"


@dataclass(frozen=True, repr=False)
class Union(Pattern):
    """Keys seen by any part."""

    parts: tuple

    def terms(self, grid):
        return [t for p in self.parts for t in p.terms(grid)]

    def cross_terms(self, grid, key_grid):
        return [t for p in self.parts for t in p.cross_terms(grid, key_grid)]

    def __repr__(self):
        return "(" + " | ".join(map(repr, self.parts)) + ")"


@dataclass(frozen=True, repr=False)
class Intersection(Pattern):
    """Keys seen by every part; distributes over the parts' unions."""

    parts: tuple

    def terms(self, grid):
        return self._meet([p.terms(grid) for p in self.parts])

    def cross_terms(self, grid, key_grid):
        return self._meet([p.cross_terms(grid, key_grid) for p in self.parts])

    @staticmethod
    def _meet(parts: list) -> list:
        out = parts[0]
        for right in parts[1:]:
            # intersecting unions multiplies their terms: refuse before building the product
            limits.check("PATTERNGEN_MAX_TERMS", len(out) * len(right),
                         f"The intersection's product of terms ({len(out)} x {len(right)})")
            out = [t & u for t in out for u in right]
            out = [t for t in out if not t.is_empty]
        return out

    def __repr__(self):
        return "(" + " & ".join(map(repr, self.parts)) + ")"


@dataclass(frozen=True, repr=False)
class Heads(Pattern):
    """A different pattern per head: head ``h`` uses ``patterns[h % len(patterns)]``."""

    patterns: tuple

    def __post_init__(self):
        if not self.patterns:
            raise PatternError("heads() needs at least one pattern.")
        limits.check("PATTERNGEN_MAX_HEAD_PATTERNS", len(self.patterns),
                     "The number of patterns in heads(...)")
        for p in self.patterns:
            _check(p, "heads")

    def __and__(self, other):
        raise PatternError("heads(...) must be the outermost pattern; combine inside it.")

    __or__ = __and__

    def __repr__(self):
        return "heads(" + ", ".join(map(repr, self.patterns)) + ")"


# --------------------------------------------------------------------------------------------
# public constructors


def window(size, dilation=1, border="clamp", causal=False, stride=1) -> Window:
    """Neighbourhood attention: ``size`` keys per axis around each query.

    Args:
        size: keys per axis (scalar or one per axis); even sizes reach one further left.
        dilation: gap between keys; splits each axis into ``dilation`` interleaved groups.
        border: ``"clamp"`` shifts the window inward at the edges (always ``size`` keys, as in
            NATTEN); ``"pad"`` truncates it (a zero-padded sliding window).
        causal: per axis, keep only the query and the ``size - 1`` keys before it.
        stride: per axis, runs of ``stride`` queries (within a dilation group) share the window
            of one leader query, as in NATTEN's generalised neighbourhoods: sliding-tile
            attention, and blocked attention at ``stride == size``; ``1 <= stride <= size``.

    Example:
        >>> window((7, 5), dilation=(2, 1))
        window((7, 5), dilation=(2, 1))
        >>> window((3, 8, 8), stride=(1, 8, 8))
        window((3, 8, 8), stride=(1, 8, 8))
    """
    return Window(size, dilation, border, causal, stride)


def block(size, offset=0) -> Block:
    """Non-overlapping windows (Swin W-MSA); ``offset`` shifts the tile boundaries (SW-MSA).

    ``block(M, offset=s)`` puts boundaries at ``s + t*M`` and cuts tiles at the grid edge: the
    same pairs as Swin's roll by ``-s``, ``M x M`` partition and region mask.

    Example:
        >>> block(7, offset=3)
        block(7, offset=3)
    """
    return Block(size, offset)


def area(areas, axis=0) -> Area:
    """YOLOv12 area attention: ``areas`` equal chunks of whole lines along ``axis``.

    Along axis 0 a grid whose first size ``areas`` does not divide is cut as YOLOv12's
    ``AAttn`` cuts it: the row-major token sequence in ``areas`` equal runs (the grid's tokens
    must be divisible by ``areas``).

    Example:
        >>> area(4)
        area(4)
    """
    return Area(areas, axis)


def stripe(axis_index, width=1) -> Stripe:
    """Stripes ``width`` lines wide running along ``axis_index`` (CSWin).

    Example:
        >>> stripe(0, width=2)
        stripe(0, width=2)
    """
    return Stripe(axis_index, width)


def axis(axis_index) -> Stripe:
    """Axial attention: the query's whole line along ``axis_index`` (``stripe(a, width=1)``).

    Example:
        >>> axis(0)
        axis(0)
    """
    return Stripe(axis_index, 1)


def criss_cross() -> CrissCross:
    """CCNet criss-cross attention: the query's row and column (every axis line in 3-D)."""
    return CrissCross()


def global_tokens(tokens=None, *, keys=None, queries=None) -> GlobalTokens:
    """Tokens that see every key and are seen by every query (flat indices or coordinates).

    Args:
        tokens: tokens in both roles, on a pattern's one grid.
        keys: key tokens every query sees (on the key grid, with ``key_grid``).
        queries: query tokens that see every key (on the query grid).

    Example:
        >>> window(512) | global_tokens([0])
        (window(512) | global_tokens([0]))
        >>> global_tokens(keys=[0], queries=[(3, 3)])
        global_tokens(keys=[0], queries=[(3, 3)])
    """
    if tokens is None and keys is None and queries is None:
        raise PatternError("global_tokens() needs at least one token index.")
    return GlobalTokens(() if tokens is None else _token_list(tokens, "tokens"), keys, queries)


def causal() -> Causal:
    """Keys at or before the query in row-major order; ``window(7) & causal()`` intersects."""
    return Causal()


def full() -> Full:
    """Dense attention, for comparisons."""
    return Full()


def heads(*patterns) -> Heads:
    """One pattern per head, cycling: head ``h`` uses ``patterns[h % len(patterns)]``.

    Example:
        >>> heads(axis(0), axis(1))
        heads(axis(0), axis(1))
    """
    return Heads(tuple(patterns))


@functools.lru_cache(maxsize=512)
def _lower(spec: Pattern, grid: Grid, key_grid: Grid | None = None):
    if isinstance(spec, Heads):
        return ir.HeadsIR(grid, tuple(_lower(p, grid, key_grid) for p in spec.patterns),
                          repr(spec), key_grid)
    for g in (grid, key_grid or grid):
        if g.numeric:
            limits.check("PATTERNGEN_MAX_AXIS", max(g.shape), f"The longest axis of grid={g}")
    terms = spec.terms(grid) if key_grid is None else spec.cross_terms(grid, key_grid)
    limits.check("PATTERNGEN_MAX_TERMS", len(terms), "The number of separable terms")
    result = ir.make_ir(grid, terms, repr(spec), key_grid)
    ir.verify(result)
    return result


def lower(spec: Pattern, grid, key_grid=None) -> ir.IR | ir.HeadsIR:
    """Lower a spec on a grid to its exact IR (cached on the hashable spec and grid).

    :func:`patterngen.parse.lower` takes the spec's expression text too.

    Args:
        spec: the pattern.
        grid: the queries' grid.
        key_grid: the keys' grid, of the same rank, when they live on another grid: the query
            at ``x`` sees the keys the pattern gives the key-grid query at
            ``floor((x + 0.5) * n_k / n_q)`` per axis (:func:`patterngen.ir.center`). Omitted
            or equal to ``grid``: self-attention.

    Raises:
        PatternError: with the spec and grid added to the message.
    """
    if not isinstance(spec, Pattern):
        raise PatternError(f"Expected a pattern such as pg.window(7), got {spec!r}.")
    grid = as_grid(grid)
    keys = None if key_grid is None else as_grid(key_grid)
    where = f"grid {grid}" if keys is None else f"grid {grid} over key grid {keys}"
    if keys is not None and keys.ndim != grid.ndim:
        raise PatternError(f"key_grid={keys} has rank {keys.ndim} and grid={grid} rank "
                           f"{grid.ndim}; expected a key grid of the same rank [pattern "
                           f"{spec!r} on {where}].")
    try:
        return _lower(spec, grid, None if keys == grid else keys)
    except PatternError as e:
        raise PatternError(f"{e} [pattern {spec!r} on {where}]") from None
