"""The token order of a lone dense term (:class:`TokenOrder`): a caller that partitions its
tokens into the order of the term's problems once, before its q, k, v projection, and back
once after its output projection, runs the attention on its inputs as they are
(``attn(q, k, v, ordered=True)``, :meth:`~patterngen.backends.planned.PlannedBackend.__call__`).
"""

from __future__ import annotations

import math

import torch

from patterngen.errors import PatternError

from .dense_term import INFERENCE_KINDS, DenseTerm

__all__ = ["TokenOrder"]


class TokenOrder:
    """The order of a pattern's dense problems (one term, :class:`DenseTerm`): problem by
    problem, each problem's rows in order, padding included. A caller that partitions its
    tokens into this order once before the q, k, v projection (:meth:`to_order`, a linear
    layer commutes with it) and calls ``attn(q, k, v, ordered=True)`` runs the attention on
    its inputs as they are, and reverses the order once after the output projection
    (:meth:`from_order`): Swin's ``window_partition`` (with its roll) and
    ``window_reverse``, MaxViT's ``grid_partition``.

    Attributes:
        grid: the grid's sizes.
        positions: length of the order (the grid's tokens, plus padding where tiles do not
            divide an axis).
        padded: whether some positions are padding (zero in :meth:`to_order`, dropped by
            :meth:`from_order`).
        index: ``(positions,)`` int64: the grid token (row-major) at each position, the
            number of tokens for padding.
    """

    def __init__(self, term: DenseTerm):
        self.term, self.grid = term, term.grid
        index, padding, _, _ = term._gather("q", "cpu")
        self.padded = padding is not None
        self.index = index.clone()
        if self.padded:
            self.index[padding] = math.prod(self.grid)
        self.positions = int(index.numel())
        self._runs = {}

    def __repr__(self):
        return (f"TokenOrder({self.term.shape!r} on grid {self.grid}, {self.positions} "
                f"positions)")

    def to_order(self, x):
        """``(batch, *grid, C)`` or ``(batch, tokens, C)`` -> ``(batch, positions, C)``.

        Raises:
            PatternError: for a tensor of another shape.
        """
        run = self._runs.get(("to", x.shape) if isinstance(x, torch.Tensor) else None)
        return (run or self._to_order_function(x))(x)

    def _to_order_function(self, x):
        """:meth:`to_order`'s function for tensors shaped like ``x``, checked and kept."""
        tokens = math.prod(self.grid)
        if not (isinstance(x, torch.Tensor) and x.dim() >= 3 and (
                tuple(x.shape[1:-1]) == self.grid or tuple(x.shape[1:-1]) == (tokens,))):
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise PatternError(
                f"to_order: x has shape {got}; the order is of grid {self.grid}, so expected "
                f"(batch, {', '.join(map(str, self.grid))}, C) or (batch, {tokens}, C).")
        b, c = x.shape[0], x.shape[-1]
        return self._keep(("to", x.shape), (b, self.positions, c),
                          lambda: self.term._view_shapes("q", b, 1, c, False)[:2],
                          lambda x: self.in_order(x.reshape(b, 1, tokens, c)))

    def from_order(self, y):
        """``(batch, positions, C)`` -> ``(batch, *grid, C)`` (padding dropped).

        Raises:
            PatternError: for a tensor of another shape.
        """
        run = self._runs.get(("from", y.shape) if isinstance(y, torch.Tensor) else None)
        return (run or self._from_order_function(y))(y)

    def _from_order_function(self, y):
        """:meth:`from_order`'s function for tensors shaped like ``y``, checked and kept."""
        self.check(y, "y", "from_order", "(batch, {positions}, C)")
        b, c = y.shape[0], y.shape[-1]
        return self._keep(("from", y.shape), (b, *self.grid, c),
                          lambda: self.term._unview_shapes(b, 1, c),
                          lambda y: self.on_grid(y.reshape(b, 1, self.positions, c)))

    def _keep(self, key, out, shapes, general):
        """Keep, for tensors of one shape, :meth:`to_order`'s or :meth:`from_order`'s function
        into shape ``out``: one permuting copy (``shapes()``: the split and the permutation)
        where the order is one permutation of the grid's split axes (no roll, padding or
        cut), else ``general``. A repeated call goes from the shape to its copy, where the
        checks and the views' shapes worked out on every call cost 0.02-0.05 ms each way
        (Swin's 28x28 and 56x56 stages, batch 2, two threads, next to a linear layer)."""
        if not self.term.rolled and not self.term._recipe("q").cuts:
            split, order = shapes()

            def run(x):
                return x.reshape(split).permute(order).reshape(out)
        else:
            def run(x):
                return general(x).reshape(out)
        if len(self._runs) >= INFERENCE_KINDS:
            self._runs.clear()
        self._runs[key] = run
        return run

    def direct(self, x) -> bool:
        """Whether an ordered call with inputs of ``x``'s device and dtype runs the term on
        them as they are (no padding, and :meth:`DenseTerm.autograd_forward` applies):
        otherwise it puts the tokens back on the grid, and ordering gains nothing."""
        return not self.padded and self.term.autograd_applies(x)

    def check(self, t, name: str, where: str, layout: str) -> None:
        """Raise unless ``t`` is a tensor with :attr:`positions` in its second last
        dimension (``layout`` names the expected shape)."""
        if not (isinstance(t, torch.Tensor) and t.dim() == layout.count(",") + 1
                and t.shape[-2] == self.positions):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise PatternError(
                f"{where}: {name} has shape {got}; the token order has {self.positions} "
                f"positions (attn.token_order.positions), so expected "
                f"{layout.format(positions=self.positions)}.")

    def in_order(self, x):
        """``(B, H, tokens, C)`` -> ``(B, H, positions, C)`` (:meth:`DenseTerm.in_order`)."""
        return self.term.in_order(x)

    def on_grid(self, y):
        """Inverse of :meth:`in_order`: ``(B, H, positions, C)`` -> ``(B, H, tokens, C)``."""
        return self.term.on_grid(y)
