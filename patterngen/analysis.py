"""What a stack of attention layers can see: receptive fields and the depth to global reach.

A *stack* is a list of patterns, layer 1 first; every layer uses the same grid. Token ``q``'s
output after layer ``l`` mixes the layer's input at ``q``'s keys ``K_l(q)``. By default every
layer has a **residual connection** (``residual=True``, as in transformer blocks): a token also
keeps its own input, so one layer maps a set ``S`` of positions to ``S | K_l(S)``. With
``residual=False`` it maps ``S`` to ``K_l(S)`` only (a query with no keys then loses
everything). The receptive field of ``q`` after layers ``1..L`` is therefore
``A_1(A_2(... A_L({q})))``: the last layer is applied to the query first.

Both questions are answered exactly from the IR, never from a ``tokens x tokens`` mask:

- :func:`receptive_field` propagates one boolean grid array. A separable term's image is a
  product of 1-D relations, so it is applied axis by axis; each 1-D step scatters every reached
  query's key progression with a difference array, ``O(tokens)`` per axis and term.
- :func:`layers_to_global` follows every source token at once as a bitset per grid position
  (``tokens^2 / 8`` bytes). One layer ORs each query's keys' bitsets along each axis with a
  sparse table of ``log2(keys)`` levels: ``O(tokens^2 / 64 * log n)`` word operations per axis
  and term. When every layer is a single separable term whose relations all contain the
  diagonal (or ``residual=False``), reach is a product of 1-D reaches, so the same loop runs on
  each axis alone (``n_a^2`` bits): that is how ``window(7)`` on 64x64 takes milliseconds.

Example:
    >>> import patterngen as pg
    >>> layers_to_global(pg.criss_cross(), grid=(9, 9))
    2
    >>> receptive_field([pg.window(3)] * 2, grid=(9, 9), query=(4, 4)).size
    25
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass

import numpy as np

from . import ir, limits
from .errors import PatternError
from .pictures import draw
from .parse import as_ir
from .spec import Pattern

__all__ = ["ReceptiveField", "receptive_field", "layers_to_global", "MAX_BITSET_TOKENS"]

#: largest grid :func:`layers_to_global` follows token by token (a bitset of tokens^2 bits)
MAX_BITSET_TOKENS = 16384
#: longest axis drawn in a :class:`ReceptiveField` picture (longer 1-D grids list ranges)
PICTURE_MAX_AXIS = 96
#: most layer labels a :class:`ReceptiveField` lists (a deeper stack names its cycle)
PICTURE_MAX_LABELS = 16


# --------------------------------------------------------------------------------------------
# the stack: each layer as the union of its separable terms


@dataclass(frozen=True)
class _Layer:
    label: str
    terms: tuple  # every head's terms: a token's output concatenates all of its heads


def _stack(patterns, grid, what: str) -> tuple[tuple[int, ...], list[_Layer]]:
    if isinstance(patterns, (Pattern, ir.IR, ir.HeadsIR)):
        patterns = [patterns]
    if not isinstance(patterns, (list, tuple)) or not patterns:
        raise PatternError(f"{what} needs a pattern or a non-empty list of patterns (one per "
                           f"layer), got {patterns!r}.")
    layers, shape = [], None
    for p in patterns:
        lowered = as_ir(p, grid)
        if shape is not None and lowered.grid.shape != shape:
            raise PatternError(
                f"{what}: every layer needs the same grid; {lowered.label} is on "
                f"{lowered.grid}, the layers before on {'x'.join(map(str, shape))}.")
        shape = lowered.grid.require_numeric(what)
        terms = tuple(dict.fromkeys(t for head in lowered.patterns for t in head.terms))
        layers.append(_Layer(lowered.label, terms))
    return shape, layers


@functools.lru_cache(maxsize=1024)
def _progression(rel: ir.Rel, n: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Every query's keys on an axis of ``n``: ``(start, count, step)``, ``count`` may be 0."""
    start, stop = rel.bounds(np.arange(n, dtype=np.int64), n, ir.NUMPY_OPS)
    step = int(rel.step)
    start = np.broadcast_to(np.asarray(start, dtype=np.int64), (n,))
    stop = np.broadcast_to(np.asarray(stop, dtype=np.int64), (n,))
    count = np.maximum(stop - start + step - 1, 0) // step
    return start, count, step


def _reflexive(rel: ir.Rel, n: int) -> bool:
    i = np.arange(n, dtype=np.int64)
    return bool(np.all(rel.contains(i, i, n, ir.NUMPY_OPS)))


# --------------------------------------------------------------------------------------------
# receptive field: scatter one set of positions through the stack


def _scatter(reached: np.ndarray, axis: int, rel: ir.Rel) -> np.ndarray:
    """Positions ``p`` on ``axis`` that some reached ``q`` on the same line has as a key."""
    n = reached.shape[axis]
    start, count, step = _progression(rel, n)
    lines = np.moveaxis(reached, axis, -1).reshape(-1, n)
    live = np.nonzero(count)[0]
    # a difference array per line: +1 at each progression's first key, -1 one step past its
    # last; a running sum within each residue class mod step then counts covering queries
    width = -(-(n + step) // step) * step
    base = np.arange(lines.shape[0])[:, None] * width
    first = (base + start[live]).ravel()
    past = (base + start[live] + count[live] * step).ravel()
    weight = lines[:, live].ravel().astype(np.float64)
    diff = (np.bincount(first, weight, lines.shape[0] * width)
            - np.bincount(past, weight, lines.shape[0] * width))
    covered = diff.reshape(-1, width // step, step).cumsum(axis=1).reshape(-1, width)[:, :n]
    out = (covered > 0.5).reshape(np.moveaxis(reached, axis, -1).shape)
    return np.moveaxis(out, -1, axis)


def _keys_of(reached: np.ndarray, layer: _Layer) -> np.ndarray:
    out = np.zeros_like(reached)
    for term in layer.terms:
        image = reached
        for a, rel in enumerate(term.rels):
            image = _scatter(image, a, rel)
        out |= image
    return out


@dataclass(frozen=True, eq=False)
class ReceptiveField:
    """The tokens whose input reaches one query's output through a stack of layers.

    Attributes:
        labels: the patterns given, layer 1 first, cycled to ``layers``.
        grid: the numeric grid.
        query: the query's coordinates.
        mask: boolean array of shape ``grid``; ``True`` where the token reaches the query.
        residual: whether each layer keeps its own input (see the module docstring).
        layers: the stack's depth.
    """

    labels: tuple
    grid: tuple
    query: tuple
    mask: np.ndarray
    residual: bool
    layers: int

    @property
    def size(self) -> int:
        """Number of tokens that reach the query."""
        return int(self.mask.sum())

    @property
    def is_global(self) -> bool:
        return bool(self.mask.all())

    def __repr__(self) -> str:
        tokens = self.mask.size
        if len(set(self.labels)) == 1:
            stack = f"{self.labels[0]} x {self.layers}"
        elif self.layers > PICTURE_MAX_LABELS:
            stack = ", ".join(self.labels) + " cycled"
        else:
            stack = ", ".join(self.labels[i % len(self.labels)] for i in range(self.layers))
        lines = [f"Receptive field of query {self.query} after {self.layers} layers [{stack}] "
                 f"on grid {'x'.join(map(str, self.grid))}"
                 f"{'' if self.residual else ' (no residual)'}: {self.size} of {tokens} tokens "
                 f"({100 * self.size / tokens:.1f}%)"]
        if self.mask.ndim > 1 and max(self.mask.shape) > PICTURE_MAX_AXIS:
            lines.append(f"(no picture: an axis is longer than {PICTURE_MAX_AXIS}; see .mask)")
        else:
            lines += draw(self.mask, self.query)
        return "\n".join(lines)

    __str__ = __repr__


def _query_coords(query, shape) -> tuple:
    if query is None:
        return tuple(n // 2 for n in shape)
    if isinstance(query, (int, np.integer)) and not isinstance(query, bool):
        if not 0 <= query < math.prod(shape):
            raise PatternError(f"Invalid query={query}: a flat index needs 0 <= query < "
                               f"{math.prod(shape)} (grid={'x'.join(map(str, shape))}).")
        return tuple(int(c) for c in np.unravel_index(int(query), shape))
    query = tuple(query)
    if len(query) != len(shape) or not all(0 <= q < n for q, n in zip(query, shape)):
        raise PatternError(f"Invalid query={query} for grid {'x'.join(map(str, shape))}; "
                           f"expected {len(shape)} coordinates with 0 <= q < n on each axis.")
    return tuple(int(q) for q in query)


def receptive_field(patterns, grid=None, query=None, layers=None,
                    residual=True) -> ReceptiveField:
    """The tokens whose information reaches ``query`` after a stack of attention layers.

    Args:
        patterns: a pattern, or a list of patterns (layer 1 first); an IR also works.
        grid: the numeric grid, e.g. ``(56, 56)``.
        query: coordinates (or a flat row-major index) of the output token; default the centre.
        layers: stack depth; the list is cycled to this many layers (default: its length).
        residual: each layer keeps its own input (transformer blocks); ``False`` for bare
            attention.

    Returns:
        A :class:`ReceptiveField`; ``.mask`` is a boolean array of shape ``grid``. Once a whole
        cycle of layers leaves the field as it was before, the remaining layers are skipped
        (they would repeat it), so a deep stack costs what its distinct fields cost.

    Raises:
        PatternError: for bad arguments, a grid over ``PATTERNGEN_MAX_TOKENS`` tokens, or
            more than ``PATTERNGEN_MAX_REACH_WORK`` tokens x terms applied before the field
            stops changing (:mod:`patterngen.limits`).

    Example:
        >>> import patterngen as pg
        >>> rf = receptive_field([pg.block(4), pg.block(4, offset=2)], grid=(8, 8), query=(0, 0))
        >>> rf.size  # the shifted corner tile is 2x2, and block(4) widens it to one 4x4 tile
        16
    """
    shape, cycle = _stack(patterns, grid, "receptive_field")
    if layers is None:
        layers = len(cycle)
    elif isinstance(layers, bool) or not isinstance(layers, int) or layers < 1:
        raise PatternError(f"Invalid layers={layers!r}; expected an integer >= 1.")
    q = _query_coords(query, shape)
    tokens = math.prod(shape)
    limits.check("PATTERNGEN_MAX_TOKENS", tokens,
                 f"receptive_field: grid {'x'.join(map(str, shape))}'s tokens")
    reached = np.zeros(shape, dtype=bool)
    reached[q] = True
    # layers left to apply, the last layer first; before each whole cycle the field is
    # remembered: once it repeats, the layers between repeat it forever, so they are skipped
    left, seen, work = layers, {}, 0
    while left:
        if left % len(cycle) == 0 and seen is not None:
            digest = hashlib.blake2b(reached.tobytes(), digest_size=16).digest()
            if digest in seen:
                left %= seen[digest] - left
                seen = None
                continue
            seen[digest] = left
        layer = cycle[(left - 1) % len(cycle)]
        work += tokens * len(layer.terms)
        limits.check("PATTERNGEN_MAX_REACH_WORK", work, "receptive_field: the tokens x terms "
                     "of the layers applied before the field stopped changing")
        keys = _keys_of(reached, layer)
        reached = reached | keys if residual else keys
        left -= 1
    return ReceptiveField(tuple(lay.label for lay in cycle), shape, q, reached, residual, layers)


# --------------------------------------------------------------------------------------------
# layers to global: follow every source token at once, as bitsets


def _gather_or(bits: np.ndarray, axis: int, rel: ir.Rel) -> np.ndarray:
    """``out[q] = OR of bits[k]`` over the keys ``k`` of ``q`` along ``axis`` (sparse table)."""
    n = bits.shape[axis]
    start, count, step = _progression(rel, n)
    level = np.moveaxis(bits, axis, 0)
    out = np.zeros_like(level)
    span = 1  # level[i] holds the OR of the progression i, i + step, ... of `span` keys
    while span <= count.max():
        sel = np.nonzero((count >= span) & (count < 2 * span))[0]
        if sel.size:
            out[sel] = level[start[sel]] | level[start[sel] + (count[sel] - span) * step]
        shift = span * step
        if 2 * span <= count.max() and shift < n:
            level = level.copy()
            level[:n - shift] |= level[shift:]
        span *= 2
    return np.moveaxis(out, 0, axis)


def _advance(bits: np.ndarray, terms, residual: bool) -> np.ndarray:
    out = bits.copy() if residual else np.zeros_like(bits)
    for term in terms:
        image = bits
        for a, rel in enumerate(term.rels):
            image = _gather_or(image, a, rel)
        out |= image
    return out


def _identity_bits(shape) -> tuple[np.ndarray, np.ndarray]:
    """Bit ``p`` set at position ``p``, and the word pattern of a position reached by all."""
    tokens = math.prod(shape)
    words = -(-tokens // 64)
    bits = np.zeros((tokens, words), dtype=np.uint64)
    p = np.arange(tokens)
    bits[p, p // 64] = np.left_shift(np.uint64(1), (p % 64).astype(np.uint64))
    full = np.full(words, np.iinfo(np.uint64).max, dtype=np.uint64)
    if tokens % 64:
        full[-1] = np.uint64((1 << (tokens % 64)) - 1)
    return bits.reshape(*shape, words), full


def _separable(stack, shape, residual: bool) -> bool:
    """Reach is a product of 1-D reaches: one term per layer, and no residual or all reflexive.

    With every relation reflexive a set ``S`` lies inside its keys ``K(S)``, so the residual
    union changes nothing and each layer maps product sets to product sets.
    """
    if any(len(layer.terms) != 1 for layer in stack):
        return False
    return not residual or all(_reflexive(rel, n) for layer in stack
                               for rel, n in zip(layer.terms[0].rels, shape))


def layers_to_global(patterns, grid=None, residual=True) -> int | None:
    """The fewest stacked layers after which every token reaches every other token.

    Layers cycle through ``patterns`` (layer 1 uses ``patterns[0]``). The answer is exact; see
    the module docstring for the algorithm.

    Args:
        patterns: a pattern or a list of patterns cycled layer by layer.
        grid: the numeric grid.
        residual: each layer keeps its own input (default, as in transformer blocks).

    Returns:
        The depth, or ``None`` when no depth suffices (e.g. ``block(7)`` alone never crosses
        its tiles): detected when a whole cycle of layers leaves reach unchanged.

    Raises:
        PatternError: when a bitset would cover more than ``MAX_BITSET_TOKENS`` tokens (the
            grid's tokens, or the longest axis on the separable path), or the layers before
            the answer would take more than ``PATTERNGEN_MAX_GLOBAL_WORK`` word operations
            (:mod:`patterngen.limits`).

    Example:
        >>> import patterngen as pg
        >>> layers_to_global(pg.window(7), grid=(64, 64))
        20
        >>> layers_to_global(pg.block(7), grid=(14, 14)) is None
        True
    """
    shape, stack = _stack(patterns, grid, "layers_to_global")
    if _separable(stack, shape, residual):
        # each axis alone, its relation as the single term of a 1-D grid
        systems = [((n,), [(ir.Term((layer.terms[0].rels[a],)),) for layer in stack])
                   for a, n in enumerate(shape)]
        path = "follows each axis alone as a bitset of n^2 bits"
    else:
        systems = [(shape, [layer.terms for layer in stack])]
        path = "follows every token of a union or non-reflexive stack as a bitset"
    largest = max(math.prod(s) for s, _ in systems)
    if largest > MAX_BITSET_TOKENS:
        raise PatternError(
            f"layers_to_global {path}: {largest} tokens exceed MAX_BITSET_TOKENS="
            f"{MAX_BITSET_TOKENS} (grid={'x'.join(map(str, shape))}); use a smaller grid of "
            f"the same shape.")
    states, fulls = zip(*(_identity_bits(s) for s, _ in systems))
    states = list(states)

    def done():
        return all(np.array_equal(s, np.broadcast_to(f, s.shape)) for s, f in zip(states, fulls))

    if done():
        return 0
    seen = set()
    layer = work = 0
    while True:
        for i in range(len(stack)):
            layer += 1
            work += sum(s.size * len(terms[i]) * len(shape) for s, (shape, terms)
                        in zip(states, systems))
            limits.check("PATTERNGEN_MAX_GLOBAL_WORK", work, f"layers_to_global: the bitset "
                         f"words x terms x axes of {layer} layers")
            states = [_advance(s, terms[i], residual) for s, (_, terms) in zip(states, systems)]
            if done():
                return layer
        # a state seen before at a cycle boundary repeats forever without becoming global
        digest = hashlib.blake2b(b"".join(s.tobytes() for s in states), digest_size=16).digest()
        if digest in seen:
            return None
        seen.add(digest)
