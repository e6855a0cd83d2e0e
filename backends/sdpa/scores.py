"""Score mods: what a call adds to the plain scores (its mask, a bias table's tiles, a softcap)."""

from __future__ import annotations

import math

import numpy as np

from patterngen import bias, ir

__all__ = ["Scores", "additive_mask"]


class Scores:
    """What a call adds to the plain scores: a softcap and a bias table's tiles.

    ``lay`` is the layout the calls run (its token orders and grids: with keys on another
    grid the table is indexed by key minus the key coordinate the query sits over).
    """

    def __init__(self, softcap, table, calls, lay, reach):
        self.softcap, self.table = softcap, table
        self.calls, self.lay, self.reach = calls, lay, reach
        if table is not None:
            import torch

            # the table flattened, one -inf entry appended for the pairs a mask removes
            rows = table.shape[0]
            self.flat = torch.cat([table.reshape(rows, -1),
                                   table.new_full((rows, 1), float("-inf"))], 1)

    def additive(self, call, batch, dtype, torch):
        """The call's bias tiles with its mask, ``(batch * heads or 1, G or 1, Bq, L)``."""
        if self.table is None:
            return additive_mask(call, dtype, torch)
        index = self.bias_index(call)
        g, length = call.bias_blocks, call.nk * self.calls.bk
        rows = self.flat.shape[0]
        tiles = self.flat.index_select(1, index).view(rows, g, self.calls.bq, length)
        if rows > 1 and batch > 1:  # per head: the leading (batch * heads) needs every batch
            tiles = tiles.expand(batch, rows, g, self.calls.bq, length).reshape(
                batch * rows, g, self.calls.bq, length)
        return tiles

    def bias_index(self, call):
        """Flat table offsets ``(G or 1, Bq, nk * Bk)`` of a call's tiles (cached on the call).

        Pairs the call's mask removes point one past the table, where :class:`Scores` keeps a
        ``-inf`` entry: one gather gives bias and mask together. When every block has the same
        offsets (Swin's windows) one block's are kept, and the tiles broadcast over the blocks.
        """
        if call.bias_index is None:
            import torch

            calls, lay = self.calls, self.lay
            q_blocks, kv_blocks = call.blocks
            g, bq = len(q_blocks), calls.bq
            pos_q = q_blocks[:, None] * bq + np.arange(bq)
            pos_k = (kv_blocks[:, :, None] * calls.bk + np.arange(calls.bk)).reshape(g, -1)
            qc = bias.coordinates(lay.permutation[np.minimum(pos_q, calls.tokens - 1)], lay.shape)
            kc = bias.coordinates(lay.key_permutation[np.minimum(pos_k, calls.key_tokens - 1)],
                                  lay.keys)
            qc = [ir.center(c, n, m) for c, n, m in zip(qc, lay.shape, lay.keys)]
            index = bias.offset_index([c[:, :, None] for c in qc],
                                      [c[:, None, :] for c in kc], self.reach)
            if call.mask is not None:
                index = np.where(call.mask[0].cpu().numpy(), index,
                                 math.prod(2 * r + 1 for r in self.reach))
            if (index == index[:1]).all():
                index = index[:1]
            call.bias_index = torch.as_tensor(index.reshape(-1), device=calls.device)
            call.bias_blocks = len(index)
        return call.bias_index


def additive_mask(call, dtype, torch, extra: int = 0):
    """The group's mask as 0 / -inf in the inputs' dtype (cached; SDPA converts bools anyway),
    with ``extra`` seen keys appended to every row (and no dummy key for the empty rows)."""
    if call.mask is None:
        return None
    key = (dtype, extra)
    if key not in call.additive:
        bool_mask = call.mask
        if extra:
            bool_mask = bool_mask.clone()
            if call.empty is not None:  # undo group_blocks's dummy key: the extra keys are seen
                bool_mask[0, ..., 0] &= ~call.empty[:bool_mask.shape[1], :, 0]
            bool_mask = torch.cat([bool_mask, bool_mask.new_ones(
                (*bool_mask.shape[:-1], extra))], -1)
        call.additive[key] = torch.zeros(bool_mask.shape, dtype=dtype, device=bool_mask.device
                                         ).masked_fill(~bool_mask, float("-inf"))
    return call.additive[key]
