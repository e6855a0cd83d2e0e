"""Per-device indices: each group's SDPA call as views or index tensors and masks on a device."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from patterngen.backends import dense

__all__ = ["Call", "DeviceCalls", "CHUNK_BYTES", "spans"]

#: most bytes of a group's gathered keys (and as many of its values) at once in a call on CPU
#: that builds no autograd graph: a larger group runs in chunks of query blocks, each gathered
#: into the memory the chunk before freed. Blocks of 32 MiB and more are mapped afresh by glibc
#: on every call (0.35-0.38 ns per byte gathered against 0.07-0.10 into reused memory, one
#: thread); W5's forward (its main group 96 blocks of 64 x 960, 45 MiB of keys) took 100 ms of
#: CPU time whole and 79 in chunks of 4 MiB, 8 and 16 MiB no better
CHUNK_BYTES = 4 << 20


def spans(count: int, block_bytes: int, chunked: bool) -> list[tuple[int, int]]:
    """``(first, stop)`` query blocks of each run of a group of ``count`` blocks whose keys
    take ``block_bytes`` per block: one run, or with ``chunked`` runs of at most
    :data:`CHUNK_BYTES` of keys (at least one block each)."""
    if not chunked or count * block_bytes <= CHUNK_BYTES:
        return [(0, count)]
    step = max(1, CHUNK_BYTES // block_bytes)
    return [(first, min(first + step, count)) for first in range(0, count, step)]


@dataclass(eq=False)
class Call:
    """One group's SDPA call on one device.

    Attributes:
        count: ``G``, the group's query blocks.
        nk: key blocks per query block.
        blocks: ``(q_blocks, kv_blocks)`` of the :class:`~.groups.Group`.
        matmul: may run as matmul-softmax-matmul (CPU, no mask, few keys).
        q_slice: ``(first token, G)`` when the query blocks are one run of tokens, else ``None``.
        k_band: the first key block when the key blocks are a band over consecutive query
            blocks (a view), else ``None``.
        q_index, k_index: flat token indices to gather where there is no view, else ``None``.
        mask: ``None`` or boolean ``(1, G or 1, Bq, nk * Bk)`` (4-D: the fused CPU kernel's).
        empty: ``None`` or boolean ``(G, Bq, 1)``: rows with no key, zeroed after the call.
        additive: the mask as 0 / -inf, per ``(dtype, extra keys)`` (filled on use).
        bias_index: flat bias table offsets of the tiles (filled on use), and
        bias_blocks: how many blocks they hold (``G`` or 1).
    """

    count: int
    nk: int
    blocks: tuple
    matmul: bool
    q_slice: tuple | None
    k_band: int | None
    q_index: object
    k_index: object
    mask: object
    empty: object
    additive: dict = field(default_factory=dict)
    bias_index: object = None
    bias_blocks: int = 0


def _is_run(x: np.ndarray) -> bool:
    return len(x) > 0 and bool((np.diff(x) == 1).all())


class DeviceCalls:
    """Index tensors and masks of one pattern on one device."""

    def __init__(self, lay, groups, device, torch):
        self.bq, self.bk = lay.block
        self.tokens, self.key_tokens = lay.tokens, lay.key_tokens
        self.calls = []
        rows_before = 0
        row_of_pos = np.full(lay.q_blocks * self.bq, -1, dtype=np.int64)
        for grp in groups:
            g, nk = grp.kv_blocks.shape
            last_q, last_k = grp.q_blocks[-1], grp.kv_blocks.max()
            q_view = _is_run(grp.q_blocks) and (last_q + 1) * self.bq <= self.tokens
            # a band: key blocks q + offset .. q + offset + nk - 1 of consecutive query blocks
            offset = int(grp.kv_blocks[0, 0] - grp.q_blocks[0])
            band = (_is_run(grp.q_blocks)
                    and (grp.kv_blocks == grp.q_blocks[:, None] + offset + np.arange(nk)).all()
                    and (last_k + 1) * self.bk <= self.key_tokens)
            pos_q = grp.q_blocks[:, None] * self.bq + np.arange(self.bq)
            pos_k = (grp.kv_blocks[:, :, None] * self.bk + np.arange(self.bk)).reshape(g, -1)
            row_of_pos[pos_q.ravel()] = rows_before + np.arange(g * self.bq)
            rows_before += g * self.bq
            self.calls.append(Call(
                count=g, nk=nk, blocks=(grp.q_blocks, grp.kv_blocks),
                matmul=(torch.device(device).type == "cpu" and grp.mask is None
                        and nk * self.bk <= dense.MATMUL_KEYS),
                q_slice=(int(grp.q_blocks[0]) * self.bq, g) if q_view else None,
                k_band=int(grp.q_blocks[0]) + offset if band else None,
                q_index=None if q_view else _tensor(np.minimum(pos_q, self.tokens - 1), device,
                                                    torch),
                k_index=None if band else _tensor(np.minimum(pos_k, self.key_tokens - 1),
                                                    device, torch),
                # 4-D (1, blocks or 1, Bq, nk * Bk): what the fused CPU kernel accepts
                mask=None if grp.mask is None else torch.as_tensor(grp.mask[None], device=device),
                empty=None if grp.empty_rows is None else torch.as_tensor(
                    grp.empty_rows[..., None], device=device)))
        row_of_pos = row_of_pos[:self.tokens]
        covered = row_of_pos >= 0
        self.zero_row = rows_before if not covered.all() else None
        self.row_of_pos = np.where(covered, row_of_pos, rows_before)
        self.rows = rows_before
        self.device = device
        #: ``None`` or boolean ``(tokens, 1)``: tokens in no query block (the backend sets it)
        self.uncovered = None


def _tensor(x, device, torch):
    return torch.as_tensor(np.ascontiguousarray(x).reshape(-1), device=device)
