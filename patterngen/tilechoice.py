"""Which tiled token orders a pattern suggests: the aligned partitions of its blocks and axes
(Swin's windows, area attention's areas) and the query groups of its strided windows."""

from __future__ import annotations

import math

import numpy as np

from . import ir

__all__ = ["aligned_tiles", "group_tiles", "tile_candidates", "cross_tiles"]

#: tiled candidates tried by ``order="auto"`` (and ``"tiled"`` without a tile)
_MAX_TILE_CANDIDATES = 4
#: tile sides :func:`cross_tiles` tries on every axis (on the smaller grid)
_CROSS_KEY_SIDES = (1, 2, 4)


def _partition_side(rel: ir.Rel, n: int, strided: bool):
    """Tile side on one axis of a term that partitions it, or ``None``: a whole axis, ``Eq``
    (1), an offset-0 ``Block`` (its size) and, with ``strided``, an undilated ``Window`` (its
    stride: the queries of a group share their keys)."""
    atoms = rel.atoms
    if not atoms:
        return n
    if atoms == (ir.Eq(),):
        return 1
    if len(atoms) == 1 and isinstance(atoms[0], ir.Block) and atoms[0].offset == 0:
        return int(atoms[0].size)
    if strided and len(atoms) == 1 and isinstance(atoms[0], ir.Window) \
            and atoms[0].dilation == 1:
        return int(atoms[0].stride)
    return None


def _term_tiles(heads, shape, strided: bool) -> list[tuple]:
    found = []
    for head in heads:
        for term in head.terms:
            sides = [_partition_side(rel, n, strided) for rel, n in zip(term.rels, shape)]
            if None in sides or tuple(sides) in found:
                continue
            if strided and not any(isinstance(a, ir.Window) and a.stride != 1
                                   for r in term.rels for a in r.atoms):
                continue  # no strided window: aligned_tiles already has it
            if all(n % t == 0 for n, t in zip(shape, sides)):
                found.append(tuple(sides))
    return found


def aligned_tiles(heads, shape) -> list[tuple]:
    """Tiles of the partitions a pattern is made of (Swin windows, areas, stripes).

    A term whose every axis is a whole axis, ``Eq`` or an offset-0 ``Block`` dividing its axis
    is block-diagonal in the tiled order with that tile: every non-empty tile is full.

    Example:
        >>> import patterngen as pg
        >>> aligned_tiles(pg.lower(pg.block(7), (56, 56)).patterns, (56, 56))
        [(7, 7)]
    """
    return _term_tiles(heads, shape, strided=False)


def group_tiles(heads, shape) -> list[tuple]:
    """Tiles of strided windows' query groups (NATTEN's stride): a tile's queries share keys.

    Where the groups' windows also start on tile boundaries (sliding-tile attention, e.g.
    size ``3 * stride`` on a divisible axis), every non-empty tile in this order is full.

    Example:
        >>> import patterngen as pg
        >>> group_tiles(pg.lower(pg.window((3, 24, 24), stride=(1, 8, 8)), (6, 48, 48))
        ...              .patterns, (6, 48, 48))
        [(1, 8, 8)]
    """
    return _term_tiles(heads, shape, strided=True)


def tile_candidates(heads, shape, bq) -> list[tuple]:
    """Tiles worth trying: the pattern's own aligned partitions and strided windows' query
    groups, then near-cubic tiles of about ``Bq`` tokens (every side dividing its axis)."""
    k = len(shape)
    if k == 1:
        return []
    found = aligned_tiles(heads, shape) + group_tiles(heads, shape)
    divisors = [[t for t in range(1, n + 1) if n % t == 0] for n in shape]
    cubic = []
    for combo in np.array(np.meshgrid(*divisors, indexing="ij")).reshape(k, -1).T:
        vol = int(np.prod(combo))
        if vol <= 1 or vol == math.prod(shape):
            continue
        spread = math.log(max(combo) / min(combo))
        cubic.append((abs(math.log(vol / bq)), spread, tuple(int(t) for t in combo)))
    cubic.sort()
    out = []
    for t in found + [c[2] for c in cubic]:
        if t not in out and tuple(t) != tuple(shape):
            out.append(t)
    return out[:_MAX_TILE_CANDIDATES]


def _aligned_sides(nq: int, nk: int, side: int):
    """``(query side, key side)`` lining one axis up, or ``None`` when its sizes do not divide:
    with ``nq = r * nk`` the queries over a key tile of ``side`` are a query tile of
    ``r * side``; with ``nk = s * nq`` a query tile of ``side`` sits over a key tile of
    ``s * side``."""
    if nq % nk == 0 and nk % side == 0:
        return side * nq // nk, side
    if nk % nq == 0 and nq % side == 0:
        return side, side * nk // nq
    return None


def cross_tiles(shape, key_shape) -> list[tuple[tuple, tuple]]:
    """``(query tile, key tile)`` pairs that line the two grids up, for keys on another grid.

    On an axis whose sizes divide, a query tile sits over exactly one key tile
    (:func:`_aligned_sides`), so every query of the tile has its keys around the same key tile:
    4x upsampling's 4x4 queries over one key share all their keys. Tried with sides ``1, 2,
    4`` on every axis, and as *bands*: the last axis whole on both grids (row-major order
    cut into whole rows), which needs only the other axes to line up and gives fewer, larger
    problems. Grids with an axis that lines up nowhere give no pair.

    Example:
        >>> cross_tiles((64, 64), (16, 16))[:2]
        [((4, 4), (1, 1)), ((4, 64), (1, 16))]
    """
    out = []
    for side in _CROSS_KEY_SIDES:
        sides = [_aligned_sides(nq, nk, side) for nq, nk in zip(shape, key_shape)]
        options = []
        if None not in sides:
            options.append(sides)
        if len(shape) > 1 and None not in sides[:-1]:  # a band of whole last-axis rows
            options.append(sides[:-1] + [(shape[-1], key_shape[-1])])
        for option in options:
            pair = tuple(tuple(int(t[i]) for t in option) for i in (0, 1))
            if pair not in out:
                out.append(pair)
    return out
