"""Block-sparse attention on ``torch.nn.functional.scaled_dot_product_attention``.

The compiled pattern's :func:`~patterngen.layout.layout` lists, per query block, the key blocks
it touches. Query blocks with the same number of key blocks form a *group*; each group is one
batched SDPA call on 4-D ``(batch * heads, blocks, Bq, dim)`` queries against the concatenation
of their key blocks, ``(batch * heads, blocks, nk * Bk, dim)`` (4-D inputs reach the fused CPU
and GPU kernels). A group whose tiles are all full (and not ragged) runs without a mask, so the
flash kernel can run (on CPU without autograd, small ones run as matmul-softmax-matmul,
faster there); the others get one compact mask ``(1, blocks, Bq, nk * Bk)``, stored once
when every block's mask is the same (translation-invariant windows) and made additive once per
dtype. A relative position bias table (``rel_bias``) is gathered by key-minus-query offset into
each group's ``(Bq, nk * Bk)`` tiles and added to that mask, so the bias never needs a
tokens x tokens array and its gradient flows back through the gather; a softcap runs the group
as matmul, ``tanh``, softmax, matmul. Gathers are views where the blocks are consecutive (a
band of key blocks is an ``unfold`` view), and the token order (row-major or tiled) is applied
once on the way in and out, as a gather whose backward is the inverse gather.

The jobs live in this package's modules: ``groups`` (query blocks grouped into calls),
``calls`` (each call's views, indices and masks on one device), ``scores`` (mask, bias tiles,
softcap), ``run`` (one pattern's calls through the dense kernels) and ``permute`` (token
orders in and out).

Autograd, devices (CPU, CUDA) and dtypes come from torch; queries without keys output zeros.

Example:
    >>> import torch, patterngen as pg
    >>> attn = pg.compile(pg.window(3), grid=(8, 8), backend="sdpa")
    >>> q = k = v = torch.randn(1, 2, 8, 8, 16)
    >>> attn(q, k, v).shape
    torch.Size([1, 2, 8, 8, 16])
"""

from __future__ import annotations

import numpy as np

from patterngen import bias
from patterngen.backends import Backend, register_backend
from patterngen.backends import dense
from patterngen.backends.inputs import kv_heads_of, non_finite, take_heads
from patterngen import ir
from patterngen.errors import PatternError
from patterngen.layout import choose_layout

from .calls import DeviceCalls
from .groups import Group, group_blocks
from .permute import into_order, token_orders
from .run import run_calls
from .scores import Scores

__all__ = ["SdpaBackend", "Group"]


class SdpaBackend(Backend):
    """Block-sparse attention as batched ``scaled_dot_product_attention`` calls.

    Call with ``(batch, heads, *grid, head_dim)`` or ``(batch, heads, tokens, head_dim)``
    tensors on CPU or CUDA, float32/float64/float16/bfloat16; gradients come from torch.

    Args:
        ir: the lowered pattern (numeric grid).
        block: ``(Bq, Bk)`` or one integer; ``None`` picks the layout executing the fewest
            pairs among the pattern's own aligned partition (Swin windows, areas: every tile
            full, no mask) and blocks of ``BLOCK_CHOICES`` in the best order
            (:func:`patterngen.layout.choose_layout`).
        order: ``"row-major"``, ``"tiled"`` or ``"auto"`` (see :func:`patterngen.layout`).
        tile: tile shape for the tiled order.
        key_tile: with keys on another grid, the keys' tile for the tiled order.
        scale: default score scale; ``None`` means ``head_dim ** -0.5``.
        softcap: ``None``, or ``c > 0``: scores become ``c * tanh(s / c)`` before the bias.

    Attributes:
        layout: the :class:`~patterngen.layout.Layout` (or ``PatternLayouts``) executed.
        groups: per listed pattern, the list of :class:`Group` SDPA calls.
    """

    name = "sdpa"
    SUPPORTED_DEVICES = ("cpu", "cuda")
    SUPPORTED_DTYPES = ("float32", "float64", "float16", "bfloat16")
    SUPPORTS_REL_POS_BIAS = True
    SUPPORTS_SOFTCAP = True
    SUPPORTS_ADDITIONAL_KEYS = True
    SUPPORTS_KEY_GRID = True

    def __init__(self, ir_, block=None, order="auto", tile=None, scale=None, softcap=None,
                 key_tile=None):
        self.ir = ir_
        self.shape = ir_.grid.require_numeric("the sdpa backend")
        self.key_shape = None if ir_.key_grid is None else ir_.key_grid.require_numeric(
            "the sdpa backend")
        self.scale = scale
        self.softcap = bias.check_softcap(softcap)
        self.layout = choose_layout(ir_, block, order, tile, key_tile)
        self.groups = [group_blocks(lay) for lay in self.layout.patterns]
        self._perm = self.layout.permutation
        self._devices = {}

    def __repr__(self):
        return f"SdpaBackend({self.ir.label or self.ir!r} on grid {self.ir.grid})"

    def block_sparse(self) -> list[dict]:
        """The block-sparse form executed, per listed pattern: layout, permutation, groups.

        Each group gives ``q_blocks``, ``kv_blocks`` and ``mask`` (``None`` when all full).
        """
        return [dict(layout=lay, permutation=self._perm, groups=groups)
                for lay, groups in zip(self.layout.patterns, self.groups)]

    @property
    def executed_pairs(self) -> tuple[int, ...]:
        """Pairs computed per listed pattern: the layout's tiles
        (:attr:`patterngen.layout.Layout.executed_pairs`)."""
        return tuple(lay.executed_pairs for lay in self.layout.patterns)

    def prepare(self, device, dtype=None, head_dim=None, heads=None) -> None:
        import torch

        self._device(torch.device(device))

    def _device(self, device):
        key = str(device)
        if key not in self._devices:
            import torch

            per_pattern = [DeviceCalls(lay, grp, device, torch)
                           for lay, grp in zip(self.layout.patterns, self.groups)]
            perm, outs = token_orders(self._perm, self.shape, self.layout.tile, per_pattern,
                                      device, torch)
            kperm = perm if self.key_shape is None else into_order(
                self.layout.key_permutation, self.key_shape, self.layout.key_tile, device, torch)
            self._devices[key] = (perm, kperm, per_pattern, outs)
        return self._devices[key]

    def __call__(self, q, k, v, scale=None, rel_bias=None, additional_keys=None,
                 additional_values=None):
        """Attention of ``q`` over ``k, v`` under the compiled pattern.

        Args:
            q, k, v: ``(batch, heads, *grid, head_dim)`` or ``(batch, heads, tokens,
                head_dim)`` tensors of one dtype on one CPU or CUDA device.
            scale: score scale; default the constructor's, else ``head_dim ** -0.5``.
            rel_bias: ``None`` or a table ``(heads or 1, 2 * reach[0] + 1, ...)`` added to
                the score of each pair by its key-minus-query offset (:mod:`patterngen.bias`).
            additional_keys, additional_values: ``(batch, heads, n_extra, head_dim)`` tokens
                outside the grid that every query attends besides its pattern, in the same
                softmax (NATTEN's): appended to every query block's keys.

        Raises:
            PatternError: for a wrong type, shape, grid, device or dtype, naming the values.
        """
        qf, kf, vf, restore = self.flatten_inputs(q, k, v)
        table = self.check_rel_bias(rel_bias, qf)
        extra = self.check_extra_keys(additional_keys, additional_values, qf, table,
                                      kf.shape[1])
        scale = scale if scale is not None else self.scale
        scale = scale if scale is not None else qf.shape[-1] ** -0.5
        results = self._per_pattern(qf, kf, vf, scale, table, extra)
        return restore(results[0] if len(results) == 1 else self._heads_back(results,
                                                                              qf.device))

    def forward_lse(self, q, k, v, scale, table=None):
        """``(out, lse)`` for checked, flattened ``(batch, heads, tokens, head_dim)`` inputs
        (``k``, ``v`` may have fewer heads) and a checked bias ``table``: the same calls as
        :meth:`__call__`, each by :func:`dense.softmax_attention` in float32 (float64 for
        float64), differentiable in ``out`` and ``lse`` (``-inf`` for a query without keys);
        the executor protocol's part (:mod:`patterngen.backends.executor`).

        Raises:
            PatternError: for keys or values that are not all finite with partial blocks
                (:meth:`__call__` applies SDPA's rule to them, by a path without the
                log-sum-exp).
        """
        per_pattern = self._device(q.device)[2]
        if any(c.mask is not None for calls in per_pattern for c in calls.calls) and \
                non_finite(k, v):
            raise PatternError(
                "sdpa: forward_lse got keys or values that are not all finite and the layout "
                "has partial blocks; expected finite k and v (call the backend itself for "
                "SDPA's rule on them).")
        results = self._per_pattern(q, k, v, scale, table, need_lse=True)
        if len(results) == 1:
            return results[0]
        return tuple(self._heads_back(parts, q.device) for parts in zip(*results))

    def _per_pattern(self, qf, kf, vf, scale, table, extra=None, need_lse=False) -> list:
        """Each listed pattern's calls on its heads of the flat, checked inputs: its output
        (``(out, lse)`` with ``need_lse``), in the order of :func:`ir.heads_of`."""
        import torch

        perm, kperm, per_pattern, outs = self._device(qf.device)
        rows_q = qf  # row-major: extra keys alone for the tokens no query block holds
        if perm is not None:
            qf = perm(qf)
        if kperm is not None:
            kf, vf = kperm(kf), kperm(vf)
        npat, heads = len(per_pattern), qf.shape[1]
        results = []
        for p, (calls, out_index) in enumerate(zip(per_pattern, outs)):
            mine = ir.heads_of(p, npat, heads)
            mine = slice(mine.start, mine.stop, mine.step)
            ours = (lambda t: t) if npat == 1 else (lambda t: t[:, mine])
            kv = kv_heads_of(p, npat, heads, kf.shape[1])
            qp, kp, vp = ours(qf), take_heads(kf, kv), take_heads(vf, kv)
            scores = None
            if table is not None or self.softcap is not None:
                tp = table if table is None or table.shape[0] == 1 else table[mine]
                scores = Scores(self.softcap, tp, calls, self.layout, self.reach)
            if need_lse:
                results.append(run_calls(calls, out_index, qp, kp, vp, scale, torch, scores,
                                         need_lse=True))
                continue
            ep = None if extra is None else tuple(take_heads(t, kv) for t in extra)
            out = run_calls(calls, out_index, qp, kp, vp, scale, torch, scores, ep)
            if ep is not None and calls.uncovered is not None:
                group = qp.shape[1] // kp.shape[1]
                alone = dense.attention(ours(rows_q),
                                        *(t.repeat_interleave(group, 1) for t in ep), scale,
                                        self.softcap)
                out = torch.where(calls.uncovered, alone, out)
            results.append(out)
        return results

    def _heads_back(self, parts, device):
        """The listed patterns' head slices (:meth:`_per_pattern`) back in head order."""
        import torch

        npat, heads = len(parts), sum(t.shape[1] for t in parts)
        order = np.concatenate([ir.heads_of(p, npat, heads) for p in range(npat)])
        return torch.cat(parts, dim=1)[:, torch.as_tensor(np.argsort(order), device=device)]

register_backend("sdpa", SdpaBackend)
