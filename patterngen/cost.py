"""Exact symbolic cost of a pattern: attended pairs, keys per query, FLOPs, bytes.

A separable term's pairs factor over axes, ``|term| = prod_a sum_i |R_a(i)|``, and a union
counts by inclusion-exclusion over term intersections (:func:`ir.inclusion_exclusion`). So the
whole cost rests on one closed form per 1-D relation, ``sum_i |R(i)|`` over an axis of ``n``,
registered below with the assumptions under which it holds. A relation without a registered
formula is never guessed: it becomes an integer sympy function that evaluates exactly (by
enumeration) as soon as its sizes are numbers, and the report says so in :attr:`notes`.

Conventions (stated, and tested against published formulas):

- ``flops = 4 * head_dim * pairs * heads * batch``: ``Q K^T`` and ``P V`` each cost one
  multiply-add (2 FLOPs) per pair and channel; ``macs`` is half of it. Softmax is not in
  ``flops``; ``softmax_ops`` counts 5 per pair (max, subtract, exp, sum, divide).
- ``bytes`` is the minimum traffic: Q, K, V read once and O written once.

Example:
    >>> import patterngen as pg
    >>> rep = pg.cost(pg.window(7), grid=("H", "W"), head_dim="d", heads="h")
    >>> rep.pairs
    49*H*W
    >>> rep.subs(H=14, W=14, d=32, h=4).flops
    4917248
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import sympy

from . import cross, ir, limits
from .errors import PatternError
from .grid import Grid, as_size, is_number, symbol
from .parse import as_ir

__all__ = ["cost", "CostReport", "register_formula", "axis_formula", "mean_over_heads",
           "check_kv_heads", "DTYPE_BYTES"]

DTYPE_BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}
SOFTMAX_OPS_PER_PAIR = 5


@dataclass(frozen=True)
class AxisFormula:
    """Closed forms for one 1-D relation on an axis of length ``n``.

    Attributes:
        pairs: ``sum_i |R(i)|`` over the axis; ``None`` when there is no closed form (the
            exact count is used, under the same assumptions).
        kmin: fewest keys of any query (``None``: no closed form).
        kmax: most keys of any query (``None``: no closed form).
        assumptions: sympy relations under which the forms hold.
    """

    pairs: sympy.Expr | None
    kmin: sympy.Expr | None = None
    kmax: sympy.Expr | None = None
    assumptions: tuple = ()


_FORMULAS: dict = {}


def register_formula(key):
    """Register ``fn(rel_atoms, n) -> AxisFormula`` for an atom type or a tuple of them.

    A tuple key matches a relation whose atoms have exactly those types (sorted by name).
    Registering a key twice is an error.
    """
    key = tuple(sorted(key, key=lambda c: c.__name__)) if isinstance(key, tuple) else (key,)

    def deco(fn):
        if key in _FORMULAS:
            raise PatternError(f"A cost formula for {key} is already registered.")
        _FORMULAS[key] = fn
        return fn

    return deco


@register_formula(ir.Eq)
def _eq(atoms, n):
    return AxisFormula(n, 1, 1)


@register_formula(ir.Lt)
def _lt(atoms, n):
    return AxisFormula(n * (n - 1) / 2, 0, n - 1)


@register_formula(ir.Le)
def _le(atoms, n):
    return AxisFormula(n * (n + 1) / 2, 1, n)


@register_formula(ir.Window)
def _window(atoms, n):
    (w,) = atoms
    k, d = w.size, w.dilation
    # NB: every dilation group has m >= k tokens when n >= k*d, so no query is cut on both sides.
    need = (sympy.Ge(n, k * d),) + ((sympy.Le(w.stride, k),) if w.stride != 1 else ())
    left = k // 2
    right = k - 1 - left
    if w.mode == "clamp":  # the leader's clamped window: k keys for every query, any stride
        return AxisFormula(n * k, k, k, need)
    if w.stride != 1 and w.mode == "causal":  # query 0 sees itself; each group's last, k
        return AxisFormula(_per_dilation_group(
            lambda m: _causal_strided(k, w.stride, m), n, d), 1, k, need)
    if w.stride != 1:
        # NB: which query sees fewest or most keys depends on how the groups meet both
        # borders: kmin and kmax are counted exactly
        return AxisFormula(_per_dilation_group(
            lambda m: _pad_strided(k, w.stride, m), n, d), None, None, need)
    if w.mode == "pad":
        lost = d * (left * (left + 1) + right * (right + 1)) / 2
        return AxisFormula(n * k - lost, right + 1, k, need)
    return AxisFormula(n * k - d * k * (k - 1) / 2, 1, k, need)


def _per_dilation_group(f, n, d):
    """``sum_g f(m_g)`` over the ``d`` dilation groups: ``n mod d`` of them hold
    ``floor(n/d) + 1`` positions, the others ``floor(n/d)``."""
    if d == 1:
        return f(n)
    q, r = sympy.floor(n / d), sympy.Mod(n, d)
    return (d - r) * f(q) + r * f(q + 1)


def _sum_positive(s, c, q):
    """``sum_{t < q} max(t*s + c, 0)``: the terms from ``t = floor(-c/s) + 1`` (kept in
    ``[0, q]``) on are positive."""
    u = sympy.Min(sympy.Max(sympy.floor(-c / s) + 1, 0), q)
    return s * (q * (q - 1) - u * (u - 1)) / 2 + c * (q - u)


def _causal_strided(k, s, m):
    """Pairs of a causal window with stride ``s`` on ``m >= k`` positions (NATTEN's rule).

    Query ``j`` of group ``t`` sees ``j + 1 - max(L - k + 1, 0)`` keys, ``L = t*s + s - 1``;
    the ``m mod s`` queries of the short last group (``L = m - 1``) lose ``m - k`` each.
    """
    q = sympy.floor(m / s)
    return m * (m + 1) / 2 - s * _sum_positive(s, s - k, q) - (m - s * q) * (m - k)


def _pad_strided(k, s, m):
    """Pairs of a truncated window with stride ``s`` on ``m >= k`` positions.

    Group ``t``'s ``s`` queries see the keys ``[L - left, L + reach)`` cut to ``[0, m)``:
    leader ``L = t*s + s//2``, ``left = k//2``, ``reach = k - left``; the short last group's
    leader is ``min(q*s + s//2, m - 1)``.
    """
    left, a = k // 2, s // 2
    reach = k - left
    q = sympy.floor(m / s)
    full = s * (s * q * (q - 1) / 2 + (a + reach) * q
                - _sum_positive(s, a + reach - m, q) - _sum_positive(s, a - left, q))
    last = sympy.Min(s * q + a, m - 1)
    return full + (m - s * q) * (sympy.Min(last + reach, m) - sympy.Max(last - left, 0))


def _window_le(w: ir.Window, n):
    """``sum_i |Window(i) & [0, i]|``: per dilation group of ``m`` positions, linear in ``m``.

    ``None`` for a strided window (no closed form: counted exactly).
    """
    if w.stride != 1:
        return None
    k, d = w.size, w.dilation
    left = k // 2
    if w.mode == "causal":  # the window already lies at or before the query
        per_group, const = k, -k * (k - 1) / 2
    elif w.mode == "pad":  # min(j, left) + 1 keys at group index j
        per_group, const = left + 1, -left * (left + 1) / 2
    else:  # clamp: j + 1 keys at the left edge, left + 1 inside, up to k at the right edge
        per_group = left + 1
        const = (left * (left + 1) / 2 + (1 - k) * (left + 1)
                 + (k * (k + 1) - (left + 1) * (left + 2)) / 2)
    return n * per_group + d * const


@register_formula((ir.Le, ir.Window))
def _window_le_formula(atoms, n):
    w = next(x for x in atoms if isinstance(x, ir.Window))
    lo = 1 if w.mode == "causal" else None
    return AxisFormula(_window_le(w, n), lo, None, (sympy.Ge(n, w.size * w.dilation),))


@register_formula((ir.Lt, ir.Window))
def _window_lt_formula(atoms, n):
    # NB: every window contains its query, so dropping the query removes exactly n pairs
    w = next(x for x in atoms if isinstance(x, ir.Window))
    pairs = _window_le(w, n)
    return AxisFormula(None if pairs is None else pairs - n, 0, None,
                       (sympy.Ge(n, w.size * w.dilation),))


@register_formula(ir.Block)
def _block(atoms, n):
    (b,) = atoms
    m, s = b.size, b.offset
    # NB: tiles [0, s), then whole tiles of m, then the remainder; which of them is the
    # smallest or largest depends on n, s and m, so kmin and kmax are counted exactly.
    if n.is_Integer:  # exact for every length, also an axis shorter than the offset
        first, rest, need = sympy.Min(s, n), sympy.Max(n - s, 0), ()
    else:  # readable on symbolic axes, under a stated assumption
        first, rest, need = s, n - s, (sympy.Ge(n, s),)
    pairs = first ** 2 + sympy.floor(rest / m) * m ** 2 + sympy.Mod(rest, m) ** 2
    return AxisFormula(pairs, None, None, (sympy.Lt(s, m), *need))


@register_formula(ir.KeyIn)
def _key_in(atoms, n):
    (a,) = atoms
    width = a.stop - a.start
    return AxisFormula(n * width, width, width, (sympy.Le(a.stop, n),))


@register_formula(ir.QueryIn)
def _query_in(atoms, n):
    (a,) = atoms
    # NB: kmin is 0 unless the range covers the whole axis; counted exactly.
    return AxisFormula((a.stop - a.start) * n, None, n, (sympy.Le(a.stop, n),))


@register_formula((ir.Eq, ir.KeyIn))
def _eq_key_in(atoms, n):
    a = next(x for x in atoms if isinstance(x, ir.KeyIn))
    return AxisFormula(a.stop - a.start, None, 1, (sympy.Le(a.stop, n),))


@register_formula((ir.Eq, ir.QueryIn))
def _eq_query_in(atoms, n):
    a = next(x for x in atoms if isinstance(x, ir.QueryIn))
    return AxisFormula(a.stop - a.start, None, 1, (sympy.Le(a.stop, n),))


@register_formula((ir.KeyIn, ir.QueryIn))
def _key_query_in(atoms, n):
    key = next(x for x in atoms if isinstance(x, ir.KeyIn))
    query = next(x for x in atoms if isinstance(x, ir.QueryIn))
    width = key.stop - key.start
    return AxisFormula((query.stop - query.start) * width, None, width,
                       (sympy.Le(key.stop, n), sympy.Le(query.stop, n)))


def _free(obj) -> list:
    syms = set()
    for atom in obj:
        for v in atom.params() if isinstance(atom, ir.Atom) else (atom,):
            if isinstance(v, sympy.Basic):
                syms |= v.free_symbols
    return sorted(syms, key=str)


@functools.lru_cache(maxsize=None)
def _exact_axis_function(rel: ir.Rel, quantity: str):
    """An integer sympy function of (n, free symbols) counting ``rel`` exactly on numbers."""
    free = _free(rel.atoms)
    reduce = {"pairs": lambda c: c.sum(), "kmin": lambda c: c.min(), "kmax": lambda c: c.max()}

    def _eval(cls, n, *values):
        if n.is_Integer and all(v.is_Integer for v in values):
            numeric = rel.subs(dict(zip(free, values)))
            return sympy.Integer(int(reduce[quantity](numeric.counts(int(n)))))
        return None

    fn = type(f"{quantity}[{rel!r}]", (sympy.Function,),
              {"eval": classmethod(_eval), "is_integer": True, "is_nonnegative": True})
    return lambda n: fn(n, *free)


def _sympified(atom: ir.Atom) -> ir.Atom:
    """The atom with sympy integers for its sizes, so that ``/`` stays exact in formulas."""
    return replace(atom, **{f: sympy.sympify(getattr(atom, f)) for f in atom.__dataclass_fields__
                            if not isinstance(getattr(atom, f), str)})


def axis_formula(rel: ir.Rel, n) -> tuple[AxisFormula, bool]:
    """The formula for ``rel`` on an axis of ``n``; the flag is ``False`` for exact fallbacks."""
    if not rel.atoms:
        return AxisFormula(n ** 2, n, n), True
    key = tuple(sorted((type(a) for a in rel.atoms), key=lambda c: c.__name__))
    fn = _FORMULAS.get(key)
    n = sympy.sympify(n)
    f = fn(tuple(_sympified(a) for a in rel.atoms), n) if fn is not None else None
    if f is not None and f.pairs is not None:
        exact = functools.partial(_exact_axis_function, rel)
        return replace(f, kmin=f.kmin if f.kmin is not None else exact("kmin")(n),
                       kmax=f.kmax if f.kmax is not None else exact("kmax")(n)), True
    # the exact count still needs the atoms' own validity conditions (e.g. n >= size*dilation)
    assumptions = tuple(a for atom in rel.atoms if (type(atom),) in _FORMULAS
                        for a in _FORMULAS[(type(atom),)]((_sympified(atom),), n).assumptions)
    return AxisFormula(*(_exact_axis_function(rel, q)(n) for q in ("pairs", "kmin", "kmax")),
                       assumptions), False


@functools.lru_cache(maxsize=None)
def _exact_union_function(head: ir.IR, quantity: str):
    """Exact min/max keys per query of a union, evaluated once every size is a number."""
    free = sorted(set(_free(head.grid.shape)) | set(_free(head.keys.shape))
                  | {s for t in head.terms for r in t.rels for s in _free(r.atoms)}, key=str)

    def _eval(cls, *values):
        if all(v.is_Integer for v in values):
            counts = head.subs(dict(zip(free, values))).key_counts()
            return sympy.Integer(int(counts.min() if quantity == "kmin" else counts.max()))
        return None

    fn = type(f"{quantity}[{head.label}]", (sympy.Function,),
              {"eval": classmethod(_eval), "is_integer": True, "is_nonnegative": True})
    return fn(*free) if free else fn(sympy.Integer(0))


@dataclass(frozen=True)
class _HeadCost:
    pairs: sympy.Expr
    kmin: sympy.Expr
    kmax: sympy.Expr
    assumptions: tuple
    notes: tuple


def _head_cost(head: ir.IR) -> _HeadCost:
    shape = head.grid.shape
    assumptions, notes = [], []
    pairs = sympy.Integer(0)
    constant = sympy.Integer(0)  # keys per query, while every piece gives each query the same
    pieces = head.pieces()
    for done, (sign, term) in enumerate(pieces, 1):
        prod = sympy.Integer(1)
        formulas = []
        for a, (rel, n, nk) in enumerate(zip(term.rels, shape, head.keys.shape)):
            if head.key_grid is None:
                f, closed = axis_formula(rel, n)
            else:  # queries over a key grid of another size
                *sums, closed = cross.axis_sum(rel, n, nk)
                f = AxisFormula(*sums)
            if not closed:
                notes.append(f"no closed form for {rel!r} on axis {a}: counted exactly once "
                             f"sizes are numbers")
            assumptions.extend(f.assumptions)
            prod *= f.pairs
            formulas.append(f)
        pairs += sign * prod
        # sympy's work on the report grows with the distinct terms of the count (numbers
        # collapse to one), far faster than with the pieces, many of which merge
        limits.check("PATTERNGEN_MAX_SYMBOLIC_TERMS", len(sympy.Add.make_args(pairs)),
                     f"cost: the distinct terms of the symbolic pair count of a union of "
                     f"{len(head.terms)} terms, after {done} of its {len(pieces)} "
                     f"inclusion-exclusion pieces (numbers for its sizes give the exact count),")
        if constant is not None and all(f.kmin == f.kmax for f in formulas):
            constant += sign * sympy.Mul(*(f.kmin for f in formulas))
        else:
            constant = None
        if len(head.terms) == 1:
            kmin = sympy.Mul(*(f.kmin for f in formulas))
            kmax = sympy.Mul(*(f.kmax for f in formulas))
    if not head.terms:
        kmin = kmax = sympy.Integer(0)
    elif constant is not None:
        kmin = kmax = sympy.expand(constant)
    elif len(head.terms) > 1:
        kmin = _exact_union_function(head, "kmin")
        kmax = _exact_union_function(head, "kmax")
    assumptions = tuple(dict.fromkeys(
        a for a in assumptions if a is not sympy.true and a != sympy.true))
    for a in assumptions:
        if a is sympy.false or a == sympy.false:
            raise PatternError(f"A cost formula's assumption fails on this grid ({a}).")
    # a single term stays a product of per-axis counts, which reads better than its expansion
    pairs = pairs if len(head.terms) == 1 else sympy.expand(pairs)
    return _HeadCost(pairs, kmin, kmax, assumptions, tuple(dict.fromkeys(notes)))


def _dtype_bytes(dtype) -> int:
    name = str(dtype).rsplit(".", 1)[-1]
    if name not in DTYPE_BYTES:
        raise PatternError(f"Unknown dtype={dtype!r}; expected one of {sorted(DTYPE_BYTES)}.")
    return DTYPE_BYTES[name]


@dataclass(frozen=True, kw_only=True)
class CostReport:
    """The cost of a pattern on a grid; symbolic where sizes are symbols.

    Built by :func:`cost`; its fields are keyword-only.

    Attributes:
        label: the pattern's expression.
        grid: the grid.
        pairs: attended (query, key) pairs for one head (the mean over heads for ``heads()``).
        pairs_per_pattern: pairs of each pattern of a ``heads()`` spec (one entry otherwise);
            ``pairs_per_head`` is its former name.
        head_dim, heads, batch: the sizes; dtype_bytes: bytes per element.
        keys_min, keys_mean, keys_max: keys per query.
        flops: ``4 * head_dim * heads * batch * pairs`` (``Q K^T`` and ``P V``).
        macs: ``flops / 2``.
        softmax_ops: ``5 * heads * batch * pairs``, not included in ``flops``.
        bytes: Q, K, V read and O written once (K and V per key/value head).
        dense_pairs, dense_flops: full attention on the same grid.
        density: ``pairs / dense_pairs``; speedup: ``dense_flops / flops``.
        assumptions: relations the closed forms need.
        notes: what was not in closed form and is counted exactly at substitution.
        symbols: the symbols used, by name.
        block, order: the block size and token order of the layout, when ``block`` was given.
        executed_pairs: pairs a block-sparse kernel computes per head (non-empty blocks times
            their area), for ``block``, in the cheapest order; waste: ``executed_pairs / pairs``.
        executed_by_order: executed pairs per head of each order considered.
        halo: with ``ranks``, a :class:`patterngen.distributed.HaloCost`: K/V halo tokens,
            lines and bytes per rank and step, and communication over compute.
        kv_heads: key/value heads (grouped-query attention); ``None``: ``heads``.
        key_grid: the keys' grid when it differs from :attr:`grid` (queries, outputs): K and
            V bytes and dense pairs count its tokens.
    """

    label: str
    grid: Grid
    head_dim: object
    heads: object
    batch: object
    dtype_bytes: int
    pairs: sympy.Expr
    pairs_per_pattern: tuple
    keys_min: sympy.Expr
    keys_max: sympy.Expr
    assumptions: tuple
    notes: tuple
    block: tuple | None = None
    order: str | None = None
    executed_pairs: int | None = None
    executed_by_order: dict = field(default_factory=dict, compare=False)
    halo: object = None
    kv_heads: object = None
    key_grid: Grid | None = None

    @property
    def pairs_per_head(self) -> tuple:
        """:attr:`pairs_per_pattern` under its former name."""
        return self.pairs_per_pattern

    @property
    def tokens(self):
        return sympy.sympify(self.grid.tokens)

    @property
    def key_tokens(self):
        """Tokens of the key grid (:attr:`tokens` for self-attention)."""
        return self.tokens if self.key_grid is None else sympy.sympify(self.key_grid.tokens)

    @property
    def keys_mean(self):
        return sympy.simplify(self.pairs / self.tokens)

    @property
    def flops(self):
        return sympy.expand(4 * self.head_dim * self.heads * self.batch * self.pairs)

    @property
    def macs(self):
        return sympy.expand(2 * self.head_dim * self.heads * self.batch * self.pairs)

    @property
    def softmax_ops(self):
        return sympy.expand(SOFTMAX_OPS_PER_PAIR * self.heads * self.batch * self.pairs)

    @property
    def bytes(self):
        kv = self.heads if self.kv_heads is None else self.kv_heads
        return sympy.expand(2 * self.batch * (self.heads * self.tokens + kv * self.key_tokens)
                            * self.head_dim * self.dtype_bytes)

    @property
    def dense_pairs(self):
        return sympy.expand(self.tokens * self.key_tokens)

    @property
    def dense_flops(self):
        return sympy.expand(4 * self.head_dim * self.heads * self.batch * self.dense_pairs)

    @property
    def density(self):
        return sympy.simplify(self.pairs / self.dense_pairs)

    @property
    def speedup(self):
        return sympy.simplify(self.dense_pairs / self.pairs) if self.pairs != 0 else sympy.oo

    @property
    def waste(self):
        if self.executed_pairs is None:
            return None
        return sympy.nsimplify(self.executed_pairs) / self.pairs if self.pairs else sympy.nan

    @property
    def symbols(self) -> dict:
        exprs = [self.pairs, self.flops, self.bytes, *self.grid.shape,
                 *(() if self.key_grid is None else self.key_grid.shape)]
        syms = set()
        for e in exprs:
            if isinstance(e, sympy.Basic):
                syms |= e.free_symbols
        return {str(s): s for s in sorted(syms, key=str)}

    @property
    def closed_form(self) -> bool:
        return not self.notes

    def subs(self, values=None, **sizes) -> "CostReport":
        """Substitute sizes (by symbol name or symbol); returns a report with numbers."""
        mapping = {}
        for k, v in {**(values or {}), **sizes}.items():
            mapping[symbol(k) if isinstance(k, str) else k] = sympy.Integer(as_size(v, str(k), 0))

        # xreplace: one simultaneous pass that rebuilds (so floors and exact counts evaluate),
        # an order of magnitude faster than subs on the floor-heavy strided closed forms
        def s(x):
            x = sympy.sympify(x).xreplace(mapping)
            return int(x) if x.is_Integer else x

        grid = self.grid.subs(mapping)
        if grid.numeric:  # exact counts build arrays of each axis
            limits.check("PATTERNGEN_MAX_AXIS", max(grid.shape),
                         f"subs: the longest axis of grid={grid}")
        assumptions = tuple(a for a in (sympy.sympify(a).xreplace(mapping)
                                        for a in self.assumptions) if a is not sympy.true)
        for a in assumptions:
            if a is sympy.false:
                raise PatternError(
                    f"The sizes {dict(values or {}, **sizes)} break an assumption of the "
                    f"closed forms; check the report's assumptions {self.assumptions}.")
        key_grid = None if self.key_grid is None else self.key_grid.subs(mapping)
        if key_grid is not None and key_grid.numeric:
            limits.check("PATTERNGEN_MAX_AXIS", max(key_grid.shape),
                         f"subs: the longest axis of key_grid={key_grid}")
        return replace(self, grid=grid, key_grid=key_grid, head_dim=s(self.head_dim),
                       heads=s(self.heads), batch=s(self.batch), pairs=s(self.pairs),
                       pairs_per_pattern=tuple(s(p) for p in self.pairs_per_pattern),
                       keys_min=s(self.keys_min), keys_max=s(self.keys_max),
                       assumptions=assumptions,
                       halo=None if self.halo is None else self.halo.subs(mapping))

    def rows(self) -> list[tuple[str, object]]:
        return [
            ("tokens", self.tokens),
            *([] if self.key_grid is None else [("key tokens", self.key_tokens)]),
            ("attended pairs (per head)", self.pairs),
            ("keys per query min/mean/max",
             f"{self.keys_min} / {self.keys_mean} / {self.keys_max}"),
            ("FLOPs (QK^T + PV, 4*d per pair)", self.flops),
            ("softmax ops (5 per pair, not in FLOPs)", self.softmax_ops),
            (f"bytes (Q,K,V,O once, {self.dtype_bytes} B/elem)", self.bytes),
            ("dense pairs", self.dense_pairs),
            ("density (pairs / dense)", self.density),
            ("speedup vs dense (FLOPs)", self.speedup),
            *((f"executed pairs ({name}, blocks {self.block[0]}x{self.block[1]})", pairs)
              for name, pairs in self.executed_by_order.items()),
            *([] if self.block is None else [
                (f"waste (executed / attended, {self.order})", f"{float(self.waste):.3f}")]),
            *([] if self.halo is None else self.halo.rows()),
        ]

    def __repr__(self) -> str:
        kv = "" if self.kv_heads is None else f", kv_heads={self.kv_heads}"
        over = "" if self.key_grid is None else f" over keys on {self.key_grid}"
        lines = [f"Cost of {self.label} on grid {self.grid}{over} (head_dim={self.head_dim}, "
                 f"heads={self.heads}{kv}, batch={self.batch})"]
        rows = self.rows()
        width = max(len(name) for name, _ in rows)
        lines += [f"  {name:<{width}}  {value}" for name, value in rows]
        if self.assumptions:
            lines.append("  assuming " + ", ".join(map(str, self.assumptions)))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    __str__ = __repr__


def cost(pattern, grid=None, head_dim=1, heads=1, batch=1, dtype="float32", block=None,
         order="auto", tile=None, ranks=None, kv_heads=None, key_grid=None) -> CostReport:
    """The exact cost of ``pattern`` on ``grid``; sizes may be ints, symbols or names.

    Args:
        pattern: a spec (or an IR from :func:`patterngen.lower`).
        grid: axis sizes, e.g. ``(64, 64)`` or ``("H", "W")``.
        head_dim, heads, batch: ints or symbols.
        dtype: element type for :attr:`CostReport.bytes`.
        block: ``(Bq, Bk)`` to add the executed pairs and waste of a block-sparse layout
            (numeric grids only; see :func:`patterngen.layout.layout`; with ``key_grid``,
            query blocks of the query grid against key blocks of the key grid).
        order, tile: the layout's token order (``"auto"`` keeps the cheaper of row-major and
            tiled) and tile shape.
        ranks: processes sharing axis 0 (an int or a name): adds :attr:`CostReport.halo`
            (see :mod:`patterngen.distributed`).
        kv_heads: key/value heads, a divisor of ``heads`` (grouped-query attention; an int
            or a symbol): K and V bytes count per key/value head. Default ``heads``.
        key_grid: the keys' grid when k and v live on another grid than q (sizes may be
            symbols too): pairs count each query over its key neighbourhood
            (:mod:`patterngen.cross`), Q and O bytes on ``grid``, K and V on ``key_grid``.

    Example:
        >>> import patterngen as pg
        >>> pg.cost(pg.criss_cross(), grid=("H", "W")).pairs
        H**2*W + H*W**2 - H*W
    """
    lowered = as_ir(pattern, grid, key_grid)
    if lowered.key_grid is not None and ranks is not None:
        raise PatternError(f"cost: ranks= is not supported with keys on another grid "
                           f"(key_grid={lowered.key_grid}); got ranks={ranks}. Expected "
                           f"ranks=None: sharded key grids are refused by "
                           f"pg.distributed.compile too.")
    head_dim, heads, batch = (as_size(v, name) for v, name in
                              ((head_dim, "head_dim"), (heads, "heads"), (batch, "batch")))
    if kv_heads is not None:
        kv_heads = as_size(kv_heads, "kv_heads")
        if is_number(heads) and is_number(kv_heads):
            check_kv_heads(int(heads), int(kv_heads), "cost")
    per_pattern = [_head_cost(h) for h in lowered.patterns]
    pairs = mean_over_heads([c.pairs for c in per_pattern], heads)
    if len(per_pattern) == 1:
        kmin, kmax = per_pattern[0].kmin, per_pattern[0].kmax
    else:
        n = len(per_pattern)
        used = per_pattern[: min(n, heads) if is_number(heads) else n]
        kmin = sympy.Min(*(c.kmin for c in used))
        kmax = sympy.Max(*(c.kmax for c in used))
    executed, by_order = None, {}
    if block is not None:
        from .layout import layout

        for name in (("row-major", "tiled") if order == "auto" else (order,)):
            try:
                lay = layout(lowered, block=block, order=name, tile=tile)
            except PatternError:
                if order == "auto" and name == "tiled" and by_order:
                    continue  # no tile divides this grid: row-major only
                raise
            per_layout = lay.patterns
            by_order[lay.order] = mean_over_heads([h.executed_pairs for h in per_layout], heads)
            block = per_layout[0].block
        order = min(by_order, key=by_order.get)
        executed = by_order[order]
    assumptions = tuple(dict.fromkeys(a for c in per_pattern for a in c.assumptions))
    notes = tuple(dict.fromkeys(n for c in per_pattern for n in c.notes))
    report = CostReport(
        label=lowered.label, grid=lowered.grid, head_dim=head_dim, heads=heads, batch=batch,
        dtype_bytes=_dtype_bytes(dtype), pairs=pairs,
        pairs_per_pattern=tuple(c.pairs for c in per_pattern), keys_min=kmin, keys_max=kmax,
        assumptions=assumptions, notes=notes, block=block if executed is not None else None,
        order=order if executed is not None else None, executed_pairs=executed,
        executed_by_order=by_order, kv_heads=kv_heads, key_grid=lowered.key_grid)
    if ranks is None:
        return report
    from .distributed.halo_cost import halo_cost

    return replace(report, halo=halo_cost(lowered, ranks, head_dim, heads, batch,
                                          report.dtype_bytes, report.flops))


def check_kv_heads(heads: int, kv_heads: int, where: str) -> int:
    """The number of query heads per key/value head (torch's ``enable_gqa`` convention:
    query head ``h`` reads key/value head ``h // group``).

    Raises:
        PatternError: when ``kv_heads`` does not divide ``heads``.
    """
    if kv_heads < 1 or heads % kv_heads:
        raise PatternError(
            f"{where}: k and v have {kv_heads} heads and q has {heads}; grouped key/value "
            f"heads need the kv head count to divide the query heads (query head h reads kv "
            f"head h // (heads // kv_heads)), so expected one of "
            f"{[n for n in range(1, heads + 1) if heads % n == 0]}.")
    return heads // kv_heads


def mean_over_heads(values, heads):
    """Mean per head when head ``h`` uses pattern ``h % len(values)``.

    Pattern ``j`` serves ``floor((heads - 1 - j) / m) + 1`` of the ``heads`` heads.
    """
    if len(values) == 1:
        return values[0]
    m = len(values)
    uses = [sympy.floor(sympy.sympify(heads - 1 - j) / m) + 1 for j in range(m)]
    return sympy.simplify(sum(u * v for u, v in zip(uses, values)) / heads)
