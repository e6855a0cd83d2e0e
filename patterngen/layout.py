"""Block-sparse layouts: which (query block, key block) tiles a pattern touches, never n x n.

Tokens are put in a *layout order* (row-major, or tiled: each tile contiguous), cut into query
blocks of ``Bq`` and key blocks of ``Bk`` consecutive positions, and every (query block, key
block) tile is classified as *empty* (no attended pair), *full* (every pair attended: no mask
needed) or *partial*. Full and partial tiles are kept apart, as in FlexAttention's ``BlockMask``.

How it is computed, without a tokens x tokens array: in a row-major grid (the tiled order is
row-major on the grid ``(T_1, .., T_k, t_1, .., t_k)`` of tile indices then in-tile offsets) a
run of consecutive positions is a union of at most ``2k - 1`` *boxes* (products of per-axis
intervals). For one separable term, the pairs between a query box and a key box factor into a
product of per-axis counts ``G_a = sum over q in [a, b) of |keys_a(q) & [c, d)|``, and a union of
terms counts exactly by inclusion-exclusion over :meth:`IR.pieces`. So each candidate tile's
attended-pair count is a handful of O(1) lookups: per-axis prefix tables for axes up to
:data:`TABLE_MAX_AXIS` long, binary searches over the per-query bounds on longer axes. Candidate
tiles come from each query box's reachable key box (per-axis unions of the query bounds), so the
work is proportional to the number of non-empty tiles plus O(tokens).

Example:
    >>> import patterngen as pg
    >>> lay = layout(pg.window(3), grid=8, block=(4, 4))
    >>> lay.to_dense()
    array([[1, 1],
           [1, 1]], dtype=int8)
    >>> lay.attended_pairs, lay.executed_pairs
    (24, 64)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from . import ir, limits
from .orders import TokenOrder, block_boxes
from .tilecount import TABLE_MAX_AXIS, AxisCount, candidate_tiles, count_tiles
from .tilechoice import aligned_tiles, cross_tiles, tile_candidates
from .errors import PatternError
from .grid import MAX_SIZE
from .parse import as_ir

__all__ = ["layout", "choose_layout", "Layout", "PatternLayouts", "HeadsLayout", "aligned_tiles",
           "ORDERS", "BLOCK_CHOICES", "TABLE_MAX_AXIS"]

#: token orders :func:`layout` accepts
ORDERS = ("row-major", "tiled", "auto")
#: square block sizes :func:`choose_layout` tries besides the pattern's own partition
BLOCK_CHOICES = (64, 128)
#: with keys on another grid, :func:`choose_layout` keeps query blocks of at least this many
#: queries where it can: exact 16-query tiles of 4x upsampling (1024 problems of 16 x 25)
#: ran 1.4-1.8x slower than 256-query bands computing 3.2x the pairs (forward, 2 threads)
CROSS_MIN_ROWS = 128


# --------------------------------------------------------------------------------------------
# argument checks


def _check_block(block) -> tuple[int, int]:
    values = block if isinstance(block, (tuple, list)) else (block, block)
    if len(values) != 2 or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 1 <= v <= MAX_SIZE
            for v in values):
        raise PatternError(
            f"Invalid block={block!r}; block sizes must be positive integers up to "
            f"{MAX_SIZE}, given as one integer or (query_block, key_block), e.g. "
            f"block=(128, 128).")
    return int(values[0]), int(values[1])


def _check_tile(tile, shape: tuple) -> tuple:
    values = tile if isinstance(tile, (tuple, list)) else (tile,) * len(shape)
    if len(values) != len(shape) or not all(
            isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1
            for v in values):
        raise PatternError(
            f"Invalid tile={tile!r} for grid {'x'.join(map(str, shape))}; expected "
            f"{len(shape)} positive integer tile sides, e.g. tile={(8,) * len(shape)}.")
    for a, (t, n) in enumerate(zip(values, shape)):
        if n % t:
            raise PatternError(
                f"Invalid tile={tuple(values)} for grid {'x'.join(map(str, shape))}: "
                f"tile[{a}]={t} does not divide grid[{a}]={n}; the tiled order needs every "
                f"tile side to divide its axis (ragged edge tiles are not supported).")
    return tuple(int(v) for v in values)


def _build(head: ir.IR, shape, block, tile, key_shape=None, key_tile=None) -> "Layout":
    bq, bk = block
    if key_shape is None:  # self-attention: the keys are the queries, in one order
        key_shape, key_tile = shape, tile
    tokens, key_tokens = math.prod(shape), math.prod(key_shape)
    order, key_order = TokenOrder(shape, tile), TokenOrder(key_shape, key_tile)
    cache = {}

    def counters(rel, a):
        key = (rel, a)
        if key not in cache:
            cache[key] = AxisCount(rel, key_shape[a], shape[a])
        return cache[key]

    qptr, qlo, qhi = block_boxes(order, tokens, bq)
    kptr, klo, khi = block_boxes(key_order, key_tokens, bk)
    nkb = len(kptr) - 1
    codes = candidate_tiles(head, key_order, qptr, qlo, qhi, bk, counters)
    counts = count_tiles(head, codes, nkb, qptr, qlo, qhi, kptr, klo, khi, counters)
    qb, kb = codes // nkb, codes % nkb
    area = np.minimum(bq, tokens - qb * bq) * np.minimum(bk, key_tokens - kb * bk)
    if (counts > area).any() or (counts < 0).any():  # an internal invariant, not user input
        raise PatternError(f"Layout counting failed for {head.label} on {shape}; please report.")
    full = counts == area
    partial = (counts > 0) & ~full
    nqb = len(qptr) - 1
    cross = {} if head.key_grid is None else dict(key_shape=tuple(key_shape), key_tile=key_tile)
    return Layout(
        ir=head, shape=tuple(shape), block=(bq, bk), tile=tile,
        full_ptr=_ptr(qb[full], nqb), full_idx=kb[full],
        partial_ptr=_ptr(qb[partial], nqb), partial_idx=kb[partial],
        partial_pairs=counts[partial], attended_pairs=int(counts.sum()), **cross)


def _ptr(rows, nrows):
    return np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=nrows))]).astype(np.int64)


# --------------------------------------------------------------------------------------------
# public objects


@dataclass(frozen=True, eq=False)
class Layout:
    """The block-sparse layout of one pattern: full and partial tiles per query block.

    Positions ``0 .. tokens-1`` are the tokens in layout order (:attr:`permutation` gives the
    row-major token at each position). Query block ``i`` holds positions
    ``[i * Bq, min((i + 1) * Bq, tokens))``, key block ``j`` likewise with ``Bk``; the last block
    of each may be short (ragged). A tile is *full* when every one of its (true, unpadded)
    pairs is attended, *partial* when some are, and absent when none are. The format is CSR
    per query block, full and partial kept apart (FlexAttention's ``BlockMask`` pairs):

    - ``full_ptr`` (query blocks + 1,), ``full_idx``: key blocks of query block ``i`` that are
      full are ``full_idx[full_ptr[i]:full_ptr[i + 1]]``, ascending;
    - ``partial_ptr``, ``partial_idx``: the same for partial tiles, and ``partial_pairs`` their
      attended-pair counts.

    To reconstruct :meth:`to_dense` (0 empty, 1 partial, 2 full)::

        dense = np.zeros((lay.q_blocks, lay.kv_blocks), dtype=np.int8)
        for i in range(lay.q_blocks):
            dense[i, lay.partial[i]] = 1
            dense[i, lay.full[i]] = 2

    Attributes:
        ir: the lowered pattern (one head).
        shape: the numeric grid.
        block: ``(Bq, Bk)``.
        tile: tile shape for the tiled order, ``None`` for row-major.
        full_ptr, full_idx, partial_ptr, partial_idx, partial_pairs: the CSR arrays above.
        attended_pairs: exact attended (query, key) pairs.
        key_shape: the keys' grid when they live on another grid (``ir.key_grid``), else
            ``None``; key blocks then cut the key grid's tokens, in their own order:
        key_tile: the keys' tile for the tiled order, ``None`` for row-major.

    Example:
        >>> import patterngen as pg
        >>> lay = layout(pg.block(2), grid=(4, 4), block=4, order="tiled", tile=(2, 2))
        >>> lay.full[0], lay.partial[0], lay.waste
        (array([0]), array([], dtype=int64), 1.0)
    """

    ir: ir.IR
    shape: tuple
    block: tuple
    tile: tuple | None
    full_ptr: np.ndarray = field(repr=False)
    full_idx: np.ndarray = field(repr=False)
    partial_ptr: np.ndarray = field(repr=False)
    partial_idx: np.ndarray = field(repr=False)
    partial_pairs: np.ndarray = field(repr=False)
    attended_pairs: int = 0
    key_shape: tuple | None = None
    key_tile: tuple | None = None

    @property
    def patterns(self) -> tuple["Layout", ...]:
        """The layouts of the listed patterns: this one (see :class:`PatternLayouts`)."""
        return (self,)

    @property
    def order(self) -> str:
        return "row-major" if self.tile is None else "tiled"

    @property
    def tokens(self) -> int:
        return math.prod(self.shape)

    @property
    def keys(self) -> tuple:
        """The keys' grid (:attr:`shape` unless they live on another grid)."""
        return self.shape if self.key_shape is None else self.key_shape

    @property
    def key_tokens(self) -> int:
        return math.prod(self.keys)

    @property
    def q_blocks(self) -> int:
        return len(self.full_ptr) - 1

    @property
    def kv_blocks(self) -> int:
        return -(-self.key_tokens // self.block[1])

    @property
    def permutation(self) -> np.ndarray:
        """Row-major token index at each layout position (``arange`` for row-major)."""
        return TokenOrder(self.shape, self.tile).permutation()

    @property
    def key_permutation(self) -> np.ndarray:
        """Row-major key token at each key position (:attr:`permutation` for self-attention)."""
        if self.key_shape is None:
            return self.permutation
        return TokenOrder(self.key_shape, self.key_tile).permutation()

    @property
    def full(self) -> list[np.ndarray]:
        """Per query block, the key blocks whose every pair is attended."""
        return np.split(self.full_idx, self.full_ptr[1:-1])

    @property
    def partial(self) -> list[np.ndarray]:
        """Per query block, the key blocks with some but not all pairs attended."""
        return np.split(self.partial_idx, self.partial_ptr[1:-1])

    def _rows(self, ptr):
        return np.repeat(np.arange(self.q_blocks), np.diff(ptr))

    def _area(self, rows, cols):
        bq, bk = self.block
        return (np.minimum(bq, self.tokens - rows * bq).astype(np.int64)
                * np.minimum(bk, self.key_tokens - cols * bk))

    @property
    def executed_pairs(self) -> int:
        """Pairs a block-sparse kernel computes: every non-empty tile's true (ragged) area."""
        return int(self._area(self._rows(self.full_ptr), self.full_idx).sum()
                   + self._area(self._rows(self.partial_ptr), self.partial_idx).sum())

    @property
    def waste(self) -> float:
        """``executed_pairs / attended_pairs`` (1.0 is perfect; ``nan`` for no pairs)."""
        return self.executed_pairs / self.attended_pairs if self.attended_pairs else math.nan

    @property
    def num_full(self) -> int:
        return len(self.full_idx)

    @property
    def num_partial(self) -> int:
        return len(self.partial_idx)

    def to_dense(self) -> np.ndarray:
        """``(q_blocks, kv_blocks)`` int8 array: 0 empty, 1 partial, 2 full."""
        dense = np.zeros((self.q_blocks, self.kv_blocks), dtype=np.int8)
        dense[self._rows(self.partial_ptr), self.partial_idx] = 1
        dense[self._rows(self.full_ptr), self.full_idx] = 2
        return dense

    def tiles(self, pad_ragged: bool = False):
        """All non-empty tiles as ``(rows, cols, is_full)`` arrays, row by row.

        Args:
            pad_ragged: count a ragged edge tile as partial, as FlexAttention's
                ``create_block_mask`` does (it pads the mask with ``False`` to whole blocks).
        """
        rows = np.concatenate([self._rows(self.full_ptr), self._rows(self.partial_ptr)])
        cols = np.concatenate([self.full_idx, self.partial_idx])
        is_full = np.arange(len(rows)) < self.num_full
        if pad_ragged:
            bq, bk = self.block
            is_full &= ((rows + 1) * bq <= self.tokens) & ((cols + 1) * bk <= self.key_tokens)
        order = np.lexsort((cols, rows))
        return rows[order], cols[order], is_full[order]

    def masks(self, rows, cols) -> np.ndarray:
        """Boolean ``(len(rows), Bq, Bk)`` masks of the given tiles (padding positions False).

        Evaluated from the IR on the tiles' own tokens: memory is per requested tile.
        """
        bq, bk = self.block
        tokens, key_tokens = self.tokens, self.key_tokens
        qpos = np.asarray(rows, dtype=np.int64)[:, None] * bq + np.arange(bq)
        kpos = np.asarray(cols, dtype=np.int64)[:, None] * bk + np.arange(bk)
        qtok = self.permutation[np.minimum(qpos, tokens - 1)]
        ktok = self.key_permutation[np.minimum(kpos, key_tokens - 1)]
        qc = np.unravel_index(qtok, self.shape)
        kc = np.unravel_index(ktok, self.keys)
        out = np.zeros((len(qpos), bq, bk), dtype=bool)
        for term in self.ir.terms:
            out |= term.contains([c[:, :, None] for c in qc], [c[:, None, :] for c in kc],
                                 self.shape, ir.NUMPY_OPS, self.keys)
        out &= (qpos < tokens)[:, :, None] & (kpos < key_tokens)[:, None, :]
        return out

    def summary(self) -> str:
        """One line: blocks, full / partial counts, executed vs attended pairs, waste."""
        order = self.order + (f" {'x'.join(map(str, self.tile))}" if self.tile else "")
        over = ""
        if self.key_shape is not None:
            over = f" over keys on {'x'.join(map(str, self.key_shape))}" + (
                f" (tiled {'x'.join(map(str, self.key_tile))})" if self.key_tile else "")
        cells = self.q_blocks * self.kv_blocks
        return (f"{self.ir.label or 'pattern'} on {'x'.join(map(str, self.shape))}{over}, "
                f"block={self.block}, order={order}: {self.q_blocks}x{self.kv_blocks} blocks, "
                f"{self.num_full} full, {self.num_partial} partial "
                f"(block density {100 * (self.num_full + self.num_partial) / cells:.2f}%); "
                f"executed {self.executed_pairs} pairs for {self.attended_pairs} attended "
                f"(waste {self.waste:.2f}x)")

    def picture(self, max_cells: int = 32) -> str:
        """ASCII picture: ``█`` full, ``░`` partial, blank empty; big layouts are summarised.

        A character cell covering several tiles is ``█`` when all are full, blank when all are
        empty and ``░`` otherwise (FlexAttention's ``BlockMask.to_string`` convention).
        """
        nq, nk = self.q_blocks, self.kv_blocks
        rs, cs = -(-nq // max_cells), -(-nk // max_cells)
        rows_, cols_ = -(-nq // rs), -(-nk // cs)
        fr, pr = self._rows(self.full_ptr), self._rows(self.partial_ptr)
        full = np.bincount((fr // rs) * cols_ + self.full_idx // cs, minlength=rows_ * cols_)
        part = np.bincount((pr // rs) * cols_ + self.partial_idx // cs, minlength=rows_ * cols_)
        r, c = np.divmod(np.arange(rows_ * cols_), cols_)
        size = (np.minimum(rs, nq - r * rs) * np.minimum(cs, nk - c * cs))
        chars = np.where(full == size, "██", np.where(full + part == 0, "  ", "░░"))
        return "\n".join("".join(row) for row in chars.reshape(rows_, cols_))

    def __str__(self) -> str:
        return self.summary() + "\n" + self.picture()


def _first_pattern(name: str):
    return property(lambda self: getattr(self.patterns[0], name),
                    doc=f"``{name}``, the same in every listed pattern's layout.")


@dataclass(frozen=True, eq=False)
class PatternLayouts:
    """Layouts of a :func:`heads` pattern along a pattern axis: one :class:`Layout` per listed
    pattern, all with the same blocks and token order (as a ``BlockMask`` keeps heads as a
    dimension).

    Head ``h`` uses ``patterns[pattern_of_head(h, len(patterns))]``; pair counts add up over
    the listed patterns (one head each). A :class:`Layout` answers :attr:`patterns` too (with
    itself), so code that takes either reads ``lay.patterns``.

    Attributes:
        patterns: one layout per listed pattern.
    """

    patterns: tuple

    block = _first_pattern("block")
    tile = _first_pattern("tile")
    order = _first_pattern("order")
    shape = _first_pattern("shape")
    tokens = _first_pattern("tokens")
    q_blocks = _first_pattern("q_blocks")
    kv_blocks = _first_pattern("kv_blocks")
    permutation = _first_pattern("permutation")
    key_shape = _first_pattern("key_shape")
    key_tile = _first_pattern("key_tile")
    keys = _first_pattern("keys")
    key_tokens = _first_pattern("key_tokens")
    key_permutation = _first_pattern("key_permutation")

    @property
    def heads(self) -> tuple:
        """:attr:`patterns` under its former name."""
        return self.patterns

    def _sum(self, name):
        return sum(getattr(lay, name) for lay in self.patterns)

    @property
    def executed_pairs(self) -> int:
        return self._sum("executed_pairs")

    @property
    def attended_pairs(self) -> int:
        return self._sum("attended_pairs")

    @property
    def waste(self) -> float:
        return self.executed_pairs / self.attended_pairs if self.attended_pairs else math.nan

    @property
    def full(self) -> tuple:
        return tuple(lay.full for lay in self.patterns)

    @property
    def partial(self) -> tuple:
        return tuple(lay.partial for lay in self.patterns)

    def to_dense(self) -> np.ndarray:
        """``(patterns, q_blocks, kv_blocks)``: 0 empty, 1 partial, 2 full."""
        return np.stack([lay.to_dense() for lay in self.patterns])

    def __str__(self) -> str:
        return "\n".join(f"pattern {i}: {lay}" for i, lay in enumerate(self.patterns))


#: :class:`PatternLayouts` under its former name
HeadsLayout = PatternLayouts


def layout(pattern, grid=None, block=(128, 128), order="row-major", tile=None, key_grid=None,
           key_tile=None):
    """Block-sparse layout of ``pattern`` on ``grid``: full and partial tiles per query block.

    With keys on another grid (``key_grid``, or an IR lowered with one) query blocks cut the
    query grid and key blocks the key grid; a tile is live when a query of its query block
    sees a key of its key block (the keys of the key coordinate it sits over), counted per
    axis as for self-attention.

    Args:
        pattern: a spec or a lowered IR (numeric grid).
        grid: the token grid, e.g. ``(256, 256)``.
        block: ``(Bq, Bk)`` positions per query / key block, or one integer for both.
        order: ``"row-major"``; ``"tiled"`` (each ``tile`` contiguous, tiles and in-tile
            positions row-major; every tile side must divide its axis); or ``"auto"``, which
            keeps whichever of row-major and a few tiled orders executes the fewest pairs.
        tile: tile shape for ``"tiled"``/``"auto"`` (checked, then unused by ``"row-major"``);
            ``None`` tries the pattern's own aligned partitions (e.g. Swin's windows) and
            near-cubic tiles of about ``Bq`` tokens (with a key grid: the tiles that line the
            two grids up, :func:`~patterngen.tilechoice.cross_tiles`).
        key_grid: the keys' grid, when they live on another grid.
        key_tile: the keys' tile in the tiled order (key grid only; ``None``: keys row-major,
            or with ``tile=None`` the key tile of each candidate).

    Returns:
        :class:`Layout`, or :class:`PatternLayouts` for :func:`heads` patterns.

    Raises:
        PatternError: for non-positive block sizes, an unknown order, a tile that does not
            divide the grid, a symbolic grid, or a key tile without a key grid.

    Example:
        >>> import patterngen as pg
        >>> lay = layout(pg.window(7), grid=(256, 256), block=(128, 128))
        >>> lay.q_blocks, round(lay.waste, 2)
        (512, 36.57)
    """
    lowered = as_ir(pattern, grid, key_grid)
    shape = lowered.grid.require_numeric("layout")
    key_shape = None if lowered.key_grid is None else lowered.key_grid.require_numeric("layout")
    for g in dict.fromkeys((lowered.grid, lowered.keys)):  # each grid once
        limits.check("PATTERNGEN_MAX_TOKENS", math.prod(g.require_numeric("layout")),
                     f"layout: grid {g}'s tokens")
    block = _check_block(block)
    if order not in ORDERS:
        raise PatternError(f"Unknown order={order!r}; expected one of {ORDERS}.")
    if tile is not None:
        tile = _check_tile(tile, shape)
    if key_tile is not None:
        if key_shape is None:
            raise PatternError(f"layout: key_tile={key_tile!r} without keys on another grid; "
                               f"expected key_tile=None or a key_grid.")
        key_tile = _check_tile(key_tile, key_shape)
    patterns = lowered.patterns

    def build(t, kt=None):
        built = tuple(_build(p, shape, block, t, key_shape, kt) for p in patterns)
        return built[0] if isinstance(lowered, ir.IR) else PatternLayouts(built)

    if order == "row-major":
        return build(None)
    if key_shape is not None:
        tiles = ([(tile, key_tile)] if tile is not None or key_tile is not None
                 else cross_tiles(shape, key_shape))
    else:
        tiles = [(t, None) for t in ([tile] if tile is not None
                                     else tile_candidates(patterns, shape, block[0]))]
    if order == "tiled" and not tiles:
        raise PatternError(
            f"order='tiled' found no tile for grid {'x'.join(map(str, shape))}; pass tile=..., "
            f"with every side dividing its axis.")
    options = ([build(None)] if order == "auto" else []) + [build(*t) for t in tiles]
    return min(options, key=lambda lay: lay.executed_pairs)


def choose_layout(lowered, block=None, order="auto", tile=None, key_tile=None):
    """The layout the block-sparse backends execute for ``lowered`` (numeric grid).

    With ``block``, :func:`layout` with these arguments. Without, the one executing the fewest
    pairs among the pattern's own aligned partition (Swin windows, areas: every tile full, no
    mask), with keys on another grid the tiles that line the two grids up (a query tile
    against its key tile, :func:`~patterngen.tilechoice.cross_tiles`; those with query
    blocks of at least :data:`CROSS_MIN_ROWS` when there are such), and square blocks of
    :data:`BLOCK_CHOICES` in ``order``; on a tie the larger block (fewer, bigger calls). The
    planner prices the ``sdpa`` backend with the same choice.
    """
    if block is not None:
        return layout(lowered, block=block, order=order, tile=tile, key_tile=key_tile)
    shape = lowered.grid.require_numeric("choose_layout")
    options = []
    if lowered.key_grid is None:
        for t in aligned_tiles(lowered.patterns, shape):
            vol = math.prod(t)
            options.append(layout(lowered, block=(vol, vol), order="tiled", tile=t))
    else:
        pairs = cross_tiles(shape, lowered.key_grid.require_numeric("choose_layout"))
        large = [(t, kt) for t, kt in pairs if math.prod(t) >= CROSS_MIN_ROWS]
        for t, kt in large or pairs:
            options.append(layout(lowered, block=(math.prod(t), math.prod(kt)), order="tiled",
                                  tile=t, key_tile=kt))
    for b in BLOCK_CHOICES:
        options.append(layout(lowered, block=(b, b), order=order, tile=tile, key_tile=key_tile))
    return min(options, key=lambda lay: (lay.executed_pairs, -lay.block[0]))
