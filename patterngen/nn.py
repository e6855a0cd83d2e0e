"""Torch layers built on compiled patterns.

Example:
    >>> import torch, patterngen as pg
    >>> layer = LocalSelfAttention(dim=32, heads=2, pattern=pg.window(3))
    >>> layer.extra_repr()
    "dim=32, heads=2, pattern=window(3), grid=None, backend='auto'"
"""

from __future__ import annotations

import math

import torch
from torch import nn

from . import bias
from .compile import compile as compile_pattern
from .errors import PatternError
from .grid import as_grid
from .spec import Pattern, as_ir

__all__ = ["LocalSelfAttention"]


class LocalSelfAttention(nn.Module):
    """Multi-head self-attention restricted to a pattern, with fused qkv and output projections.

    The attention is compiled at the first forward for the input's grid, device and dtype, and
    cached per ``(grid, device, dtype)``. With ``backend="auto"`` the backend is chosen by device
    (``numba`` then ``sdpa`` on CPU, ``flex`` then ``sdpa`` on CUDA); when none fits the error
    lists every backend's reasons.

    Args:
        dim: channels of the input and output; a multiple of ``heads``.
        heads: attention heads; ``pg.heads(...)`` patterns cycle over them.
        pattern: a spec such as ``pg.window(7)``, or its expression text.
        grid: the token grid; needed for flat ``(batch, tokens, dim)`` inputs of 2-D/3-D grids,
            otherwise read from the input's shape.
        backend: a registered backend name or ``"auto"``.
        qkv_bias: bias in the qkv projection.
        rel_pos_bias: a learned relative position bias, ``rel_pos_bias_table`` of shape
            ``(heads, 2 * reach[0] + 1, ...)`` indexed by key minus query
            (:mod:`patterngen.bias`), initialised as Swin does (truncated normal, std 0.02).
            Its shape follows the pattern's reach on ``grid``, so ``grid`` is required, and the
            backend must declare ``SUPPORTS_REL_POS_BIAS`` (``"auto"``, the planner, does).
        kv_heads: key/value heads (grouped-query attention; 1: multi-query), a divisor of
            ``heads``; query head ``h`` reads key/value head ``h // (heads // kv_heads)``.
            Default ``heads``.

    Attributes:
        reach: per axis, the pattern's largest ``|key - query|`` on ``grid`` (with
            ``rel_pos_bias``).

    Shapes:
        ``x`` is ``(batch, *grid, dim)`` or ``(batch, tokens, dim)``; the output has its shape.

    Example:
        >>> import patterngen as pg
        >>> layer = LocalSelfAttention(96, 4, pg.window(7), backend="numba")  # doctest: +SKIP
        >>> layer(torch.randn(2, 14, 14, 96)).shape  # doctest: +SKIP
        torch.Size([2, 14, 14, 96])
    """

    def __init__(self, dim: int, heads: int, pattern, grid=None, backend: str = "auto",
                 qkv_bias: bool = True, rel_pos_bias: bool = False, kv_heads: int | None = None):
        super().__init__()
        if isinstance(pattern, str):
            from .parse import parse

            pattern = parse(pattern)
        if not isinstance(pattern, Pattern):
            raise PatternError(f"Expected a pattern such as pg.window(7), got {pattern!r}.")
        for name, value in (("dim", dim), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PatternError(f"Invalid {name}={value!r}; expected an integer >= 1.")
        if dim % heads:
            raise PatternError(f"dim must be a multiple of heads: {dim=}, {heads=}.")
        if kv_heads is not None and (isinstance(kv_heads, bool) or not isinstance(kv_heads, int)
                                     or kv_heads < 1 or heads % kv_heads):
            raise PatternError(f"Invalid {kv_heads=}; expected a divisor of {heads=} (query "
                               f"head h reads key/value head h // (heads // kv_heads)).")
        self.kv_heads = kv_heads or heads
        self.dim, self.heads, self.pattern, self.backend = dim, heads, pattern, backend
        self.grid = None if grid is None else as_grid(grid).require_numeric("LocalSelfAttention")
        self.rel_pos_bias = rel_pos_bias
        self.qkv = nn.Linear(dim, dim + 2 * self.kv_heads * (dim // heads), bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self._compiled: dict = {}
        self.register_parameter("rel_pos_bias_table", None)
        self._precompile()
        if not rel_pos_bias:
            return
        from . import backends

        cls = backends.get_backend(backend)
        if not getattr(cls, "SUPPORTS_REL_POS_BIAS", False):
            raise PatternError(
                f"rel_pos_bias=True needs a backend that adds a relative position bias; backend "
                f"{cls.name!r} does not (SUPPORTS_REL_POS_BIAS is not set). Use another backend "
                f"(sdpa, flex, auto) or rel_pos_bias=False.")
        if self.grid is None:
            raise PatternError(
                f"rel_pos_bias=True needs grid=: the table's shape follows the reach of "
                f"{pattern!r} on the grid it is built for (e.g. grid=(56, 56)).")
        self.reach = bias.reach(as_ir(pattern, self.grid))
        self.rel_pos_bias_table = nn.Parameter(torch.zeros(bias.table_shape(self.reach, heads)))
        nn.init.trunc_normal_(self.rel_pos_bias_table, std=0.02)

    def _grid_of(self, x: torch.Tensor) -> tuple:
        inner = tuple(x.shape[1:-1])
        if x.dim() < 3 or x.shape[-1] != self.dim:
            raise PatternError(f"LocalSelfAttention(dim={self.dim}) expects (batch, *grid, "
                               f"{self.dim}) or (batch, tokens, {self.dim}); got "
                               f"x.shape={tuple(x.shape)}.")
        if self.grid is None:
            if len(inner) > 3:
                raise PatternError(f"x.shape={tuple(x.shape)} has {len(inner)} grid axes; "
                                   f"patterngen grids have 1 to 3.")
            return inner
        if inner == self.grid or inner == (math.prod(self.grid),):
            return self.grid
        table = (f" (the relative position table, {tuple(self.rel_pos_bias_table.shape)}, was "
                 f"built for that grid)" if self.rel_pos_bias else "")
        raise PatternError(
            f"x.shape={tuple(x.shape)} does not match grid={self.grid}{table}: expected (batch, "
            f"{', '.join(map(str, self.grid))}, {self.dim}) or (batch, {math.prod(self.grid)}, "
            f"{self.dim}).")

    def _precompile(self) -> None:
        """With ``grid`` given, compile the attention for the parameters' device and dtype
        now, so that ``torch.compile(layer, fullgraph=True)`` finds it compiled: compiling
        inside a traced forward would break the graph."""
        if self.grid is not None:
            weight = self.qkv.weight
            attn = self.attention(self.grid, weight.device, weight.dtype)
            attn.prepare(weight.device, weight.dtype, self.dim // self.heads, self.heads)

    def _apply(self, fn, *args, **kwargs):
        # .to(), .cuda(), .half() move the parameters: compile for where they are now
        out = super()._apply(fn, *args, **kwargs)
        self._precompile()
        return out

    def attention(self, grid: tuple, device: torch.device, dtype: torch.dtype):
        """The compiled attention for ``grid`` on ``device`` with ``dtype`` (cached)."""
        key = (grid, str(device), dtype)
        if key not in self._compiled:
            attn = compile_pattern(self.pattern, grid, backend=self.backend,
                                   device=device.type, dtype=str(dtype).removeprefix("torch."))
            self._compiled[key] = attn
        return self._compiled[key]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a table saved for another grid or pattern has another shape: say which, rather than
        # torch's bare size mismatch, and never reshape it silently
        key = prefix + "rel_pos_bias_table"
        if self.rel_pos_bias and key in state_dict:
            got, want = tuple(state_dict[key].shape), tuple(self.rel_pos_bias_table.shape)
            if got != want:
                raise PatternError(
                    f"state_dict[{key!r}] has shape {got}, but this layer's table is {want}: "
                    f"{self.pattern!r} on grid={self.grid} reaches {self.reach}. A table "
                    f"trained for another grid or pattern is not reshaped; build the layer for "
                    f"the grid it was trained on, or convert the table explicitly.")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self._grid_of(x)
        batch, tokens, head_dim = x.shape[0], math.prod(grid), self.dim // self.heads
        qkv = self.qkv(x.reshape(batch, tokens, -1))
        qkv = qkv.reshape(batch, tokens, self.heads + 2 * self.kv_heads, head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], 1)
        attn = self.attention(grid, x.device, x.dtype)
        extra = {"rel_bias": self.rel_pos_bias_table} if self.rel_pos_bias else {}
        # (batch, heads or kv_heads, tokens, head_dim) views: the executors copy what they must
        out = attn(q, k, v, **extra)
        out = out.transpose(1, 2).reshape(batch, tokens, self.dim)
        return self.proj(out).reshape(x.shape)

    def extra_repr(self) -> str:
        bias = ", rel_pos_bias=True" if self.rel_pos_bias else ""
        kv = f", kv_heads={self.kv_heads}" if self.kv_heads != self.heads else ""
        return (f"dim={self.dim}, heads={self.heads}, pattern={self.pattern!r}, "
                f"grid={self.grid}, backend={self.backend!r}{bias}{kv}")
