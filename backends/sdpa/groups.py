"""Grouping: a layout's query blocks with the same number of key blocks, one SDPA call each."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Group", "group_blocks"]


@dataclass(frozen=True, eq=False)
class Group:
    """One batched SDPA call: query blocks with the same number of key blocks.

    Attributes:
        q_blocks: ``(G,)`` query block indices (layout positions ``q * Bq ..``).
        kv_blocks: ``(G, nk)`` key block indices of each query block.
        mask: ``None`` (every tile full) or boolean ``(G or 1, Bq, nk * Bk)``; 1 when shared.
        empty_rows: ``None`` or boolean ``(G, Bq)``: query rows with no key (output zero).
    """

    q_blocks: np.ndarray
    kv_blocks: np.ndarray
    mask: np.ndarray | None
    empty_rows: np.ndarray | None


def group_blocks(lay) -> list[Group]:
    """Groups of one pattern's layout, each sorted by query block."""
    bq, bk = lay.block
    rows, cols, _ = lay.tiles()
    strict = lay.tiles(pad_ragged=True)[2]  # ragged tiles need a mask even when full
    counts = np.bincount(rows, minlength=lay.q_blocks)
    starts = np.concatenate([[0], np.cumsum(counts)])
    needs_mask = np.zeros(lay.q_blocks, dtype=bool)
    np.logical_or.at(needs_mask, rows, ~strict)
    groups = []
    keys = sorted({(int(c), bool(m)) for c, m in zip(counts, needs_mask) if c})
    for nk, masked in keys:
        qbs = np.nonzero((counts == nk) & (needs_mask == masked))[0]
        sel = starts[qbs][:, None] + np.arange(nk)
        kvs = cols[sel]
        mask = empty = None
        if masked:
            mask = np.ones((len(qbs), bq, nk, bk), dtype=bool)
            tile_mask = ~strict[sel]
            g, j = np.nonzero(tile_mask)
            if len(g):
                mask[g, :, j] = lay.masks(qbs[g], kvs[g, j])
            mask = mask.reshape(len(qbs), bq, nk * bk)
            empty = ~mask.any(-1)
            # a row without keys attends to one dummy key (no NaN), then is zeroed
            mask[..., 0] |= empty
            empty = empty if empty.any() else None
            if (mask == mask[:1]).all():
                mask = mask[:1]
        groups.append(Group(qbs, kvs, mask, empty))
    return groups
