"""Torch layers built on compiled patterns.

A layer holds its pattern's *declaration* (the expression text, the backend and the softcap),
never a compiled attention: the attention for an input's grid, device and dtype is compiled on
the first call that needs it and kept in a process-wide cache keyed by the declaration. So a
layer pickles small (``torch.save(model)``), loads in a fresh process, builds on the meta
device without planning or calibrating, and runs on any grid.

``torch.compile`` and ``torch.export`` see one operator, ``patterngen::attention``, whose
arguments are the tensors, the declaration and the grid: compiling and planning happen inside
it, outside the traced region, on first use (in another process too: importing
``patterngen`` registers it once torch has loaded). Its backward runs the
attention's forward again and then its backward (about one forward more than eager mode).

Example:
    >>> import torch, patterngen as pg
    >>> layer = LocalSelfAttention(dim=32, heads=2, pattern=pg.window(3))
    >>> layer.extra_repr()
    "dim=32, heads=2, pattern=window(3), grid=None, backend='auto'"
"""

from __future__ import annotations

import functools
import json
import math
import threading

import torch
from torch import nn

from . import bias
from .operators import register_pending
from .compile import compile as compile_pattern
from .errors import PatternError
from .grid import as_grid
from .parse import as_ir, parse
from .spec import Pattern, block

__all__ = ["LocalSelfAttention", "LocalCrossAttention", "SwinBlock", "from_timm_swin", "DropPath",
           "declaration", "attention", "attend", "fit_table", "ordered_attention"]

#: compiled attention per (declaration, grid, device, dtype)
_COMPILED: dict = {}
_LOCK = threading.Lock()


def declaration(pattern, backend: str = "auto", softcap=None, end_cuts=None) -> str:
    """The text that rebuilds a layer's attention: pattern expression, backend and softcap.

    ``end_cuts`` (one per axis) also separates, on every grid, the last ``end_cuts[a]`` lines
    of axis ``a`` from the others: Swin's region mask after its roll and padding
    (:class:`SwinBlock`), which depends on the grid.

    Raises:
        PatternError: for a pattern whose text does not parse back to it.
    """
    text = repr(pattern)
    if parse(text) != pattern:
        raise PatternError(f"{text} does not parse back to the same pattern; a layer stores "
                           f"its pattern as text, so it needs one that does.")
    d = {"pattern": text, "backend": backend, "softcap": bias.check_softcap(softcap)}
    if end_cuts is not None:
        d["end_cuts"] = [int(c) for c in end_cuts]
    return json.dumps(d, sort_keys=True)


def attention(decl: str, grid: tuple, device, dtype, key_grid=None):
    """The attention compiled for declaration ``decl`` on ``grid``, ``device`` and ``dtype``
    (compiled on first use, then cached for the process); ``key_grid``: the keys' grid when
    it is another (:class:`LocalCrossAttention`)."""
    device = torch.device(device)
    key = (decl, tuple(int(n) for n in grid), str(device), dtype)
    if key_grid is not None:
        key += (tuple(int(n) for n in key_grid),)
    found = _COMPILED.get(key)
    if found is not None:
        return found
    d = json.loads(decl)
    options = {} if d["softcap"] is None else {"softcap": d["softcap"]}
    pattern = parse(d["pattern"])
    if d.get("end_cuts"):
        # one tile boundary per axis, end_cuts[a] lines before its end (none for a cut of 0)
        pattern = pattern & block(key[1], offset=tuple(
            (n - c) % n for n, c in zip(key[1], d["end_cuts"])))
    attn = compile_pattern(pattern, key[1], backend=d["backend"], device=device.type,
                           dtype=str(dtype).removeprefix("torch."), key_grid=key_grid,
                           **options)
    with _LOCK:
        return _COMPILED.setdefault(key, attn)


def fit_table(table, reach: tuple, grid: tuple):
    """The centre of ``table`` that a pattern reaching ``reach`` on ``grid`` reads.

    A table is indexed by key minus query around its centre, so a grid where the pattern
    reaches less (Swin's windows on any grid of at least one window) reads its middle entries.

    Raises:
        PatternError: when the pattern reaches further on ``grid`` than the table covers.
    """
    have = tuple((n - 1) // 2 for n in table.shape[1:])
    if len(have) != len(reach) or any(r > h for r, h in zip(reach, have)):
        raise PatternError(
            f"On grid={tuple(grid)} the pattern reaches {tuple(reach)} (largest |key - query| "
            f"per axis), but the relative position table {tuple(table.shape)} covers {have}; "
            f"run it on a grid where the pattern reaches at most that, or build the layer "
            f"for this grid.")
    if tuple(reach) == have:
        return table
    return table[(slice(None), *(slice(h - r, h + r + 1) for h, r in zip(have, reach)))]


def ordered_attention(decl: str, grid: tuple, x):
    """The attention of ``decl`` on ``grid`` for inputs like ``x`` where a layer calls it in
    its token order (``attn.token_order``, ``backends/planned/``'s ``TokenOrder``): a
    ``backend="auto"`` pattern that is one dense term, which then runs on the ordered inputs
    as they are; ``None`` otherwise, and under ``torch.compile`` (the layer calls its
    operator)."""
    if torch.compiler.is_compiling():
        return None
    attn = attention(decl, grid, x.device, x.dtype)
    if not hasattr(type(attn), "token_order"):
        return None
    try:
        order = attn.token_order
    except PatternError:
        return None
    return attn if order.direct(x) else None


def _run(q, k, v, rel_bias, decl, grid, scale):
    attn = attention(decl, grid, q.device, q.dtype)
    extra = {} if rel_bias is None else {"rel_bias": fit_table(rel_bias, attn.reach, grid)}
    if scale is not None:
        extra["scale"] = scale
    return attn(q, k, v, **extra)


def _autograd_on():
    """A guard under which autograd records again inside an operator's implementation (the
    dispatcher excludes autograd below an operator's autograd formula; torch's own
    higher-order operators re-enter it the same way)."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.AutogradOther, keys.AutogradNestedTensor):
        exclude = exclude.remove(key)
    return torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude)


def _op_backward(q, k, v, rel_bias, dout, decl, grid, scale):
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    if rel_bias is not None:
        inputs.append(rel_bias.detach().requires_grad_())
    with _autograd_on(), torch.enable_grad():
        out = _run(*inputs[:3], inputs[3] if rel_bias is not None else None, decl, grid, scale)
        grads = torch.autograd.grad(out, inputs, dout, allow_unused=True)
    grads = [torch.zeros(t.shape, dtype=t.dtype, device=t.device) if g is None
             else g.contiguous() for g, t in zip(grads, inputs)]
    return (*grads[:3], grads[3] if rel_bias is not None else q.new_empty(0))


def _run_contiguous(q, k, v, rel_bias, decl, grid, scale):
    # the operators' outputs are contiguous whatever the inputs' strides (views of a fused qkv
    # projection), so that their fake kernels can say so
    return _run(q, k, v, rel_bias, decl, grid, scale).contiguous()


_attention_op = torch.library.custom_op(
    "patterngen::attention", _run_contiguous, mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? rel_bias, str decl, SymInt[] grid, "
           "float? scale) -> Tensor")
_attention_bwd = torch.library.custom_op(
    "patterngen::attention_bwd", _op_backward, mutates_args=(),
    schema="(Tensor q, Tensor k, Tensor v, Tensor? rel_bias, Tensor dout, str decl, "
           "SymInt[] grid, float? scale) -> (Tensor, Tensor, Tensor, Tensor)")


@_attention_op.register_fake
def _(q, k, v, rel_bias, decl, grid, scale):
    return q.new_empty(q.shape)


@_attention_bwd.register_fake
def _(q, k, v, rel_bias, dout, decl, grid, scale):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            q.new_empty(0) if rel_bias is None else rel_bias.new_empty(rel_bias.shape))


def _setup(ctx, inputs, output):
    q, k, v, rel_bias, decl, grid, scale = inputs
    ctx.save_for_backward(q, k, v, rel_bias)
    ctx.decl, ctx.grid, ctx.scale = decl, grid, scale


def _formula(ctx, dout):
    q, k, v, rel_bias = ctx.saved_tensors
    dq, dk, dv, dbias = _attention_bwd(q, k, v, rel_bias, dout.contiguous(), ctx.decl,
                                       ctx.grid, ctx.scale)
    return dq, dk, dv, dbias if rel_bias is not None else None, None, None, None


_attention_op.register_autograd(_formula, setup_context=_setup)


def attend(q, k, v, rel_bias, decl: str, grid: tuple, scale=None):
    """Attention of ``(batch, heads, tokens, head_dim)`` tensors under declaration ``decl``
    on ``grid``: eager calls run the compiled attention directly, traced calls
    (``torch.compile``, ``torch.export``) the ``patterngen::attention`` operator."""
    if torch.compiler.is_compiling():
        return _attention_op(q, k, v, rel_bias, decl, list(grid), scale)
    return _run(q, k, v, rel_bias, decl, tuple(int(n) for n in grid), scale)


class LocalSelfAttention(nn.Module):
    """Multi-head self-attention restricted to a pattern, with fused qkv and output projections.

    The attention is compiled at the first forward on each grid, device and dtype (cached for
    the process, shared by layers with the same declaration). With ``backend="auto"`` it runs
    as :func:`patterngen.plan.plan` chooses: each term of the pattern on its cheapest executor
    (dense batches, the numba gather kernels), merged by log-sum-exp, or the whole pattern on
    one backend (numba, sdpa, flex), by time predicted from this machine's calibrated rates
    (measured on the first plan that needs them, a few seconds, progress on stderr).

    Args:
        dim: channels of the input and output; a multiple of ``heads``.
        heads: attention heads; ``pg.heads(...)`` patterns cycle over them.
        pattern: a spec such as ``pg.window(7)``, or its expression text.
        grid: the token grid of flat ``(batch, tokens, dim)`` inputs, and, with
            ``rel_pos_bias``, the grid the table is sized for; gridded inputs may have
            another grid.
        backend: a registered backend name or ``"auto"``.
        qkv_bias: bias in the qkv projection.
        rel_pos_bias: a learned relative position bias, ``rel_pos_bias_table`` of shape
            ``(heads, 2 * reach[0] + 1, ...)`` indexed by key minus query
            (:mod:`patterngen.bias`), initialised as Swin does (truncated normal, std 0.02).
            Its shape follows the pattern's reach on ``grid``, so ``grid`` is required. On
            another grid the layer reads the table's centre where the pattern reaches less,
            and refuses a grid where it reaches further. Under autocast the table keeps its
            dtype and is cast for the call, as a weight is.
        softcap: ``None``, or ``c > 0``: scores become ``c * tanh(s / c)``.
        channels_first: inputs are ``(batch, dim, *grid)`` (a conv feature map) instead of
            ``(batch, *grid, dim)``. The layout is never guessed from the shape.
        kv_heads: key/value heads (grouped-query attention; 1: multi-query), a divisor of
            ``heads``; query head ``h`` reads key/value head ``h // (heads // kv_heads)``.
            Default ``heads``.

    Attributes:
        reach: per axis, the pattern's largest ``|key - query|`` on ``grid`` (with
            ``rel_pos_bias``).

    Shapes:
        ``x`` is ``(batch, *grid, dim)`` or ``(batch, tokens, dim)`` (``(batch, dim, *grid)``
        with ``channels_first``); the output has its shape.

    Example:
        >>> import patterngen as pg
        >>> layer = LocalSelfAttention(96, 4, pg.window(7), backend="numba")  # doctest: +SKIP
        >>> layer(torch.randn(2, 14, 14, 96)).shape  # doctest: +SKIP
        torch.Size([2, 14, 14, 96])
    """

    def __init__(self, dim: int, heads: int, pattern, grid=None, backend: str = "auto",
                 qkv_bias: bool = True, rel_pos_bias: bool = False, softcap=None,
                 channels_first: bool = False, kv_heads: int | None = None):
        super().__init__()
        if isinstance(pattern, str):
            pattern = parse(pattern)
        if not isinstance(pattern, Pattern):
            raise PatternError(f"Expected a pattern such as pg.window(7), got {pattern!r}.")
        for name, value in (("dim", dim), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PatternError(f"Invalid {name}={value!r}; expected an integer >= 1.")
        if dim % heads:
            raise PatternError(f"dim must be a multiple of heads: {dim=}, {heads=}.")
        if not isinstance(channels_first, bool):
            raise PatternError(f"Invalid channels_first={channels_first!r}; expected True "
                               f"(inputs (batch, dim, *grid)) or False ((batch, *grid, dim)).")
        if kv_heads is not None and (isinstance(kv_heads, bool) or not isinstance(kv_heads, int)
                                     or kv_heads < 1 or heads % kv_heads):
            raise PatternError(f"Invalid {kv_heads=}; expected a divisor of {heads=} (query "
                               f"head h reads key/value head h // (heads // kv_heads)).")
        self.kv_heads = kv_heads or heads
        self.dim, self.heads, self.pattern, self.backend = dim, heads, pattern, backend
        self.grid = None if grid is None else as_grid(grid).require_numeric("LocalSelfAttention")
        self.rel_pos_bias, self.softcap = rel_pos_bias, bias.check_softcap(softcap)
        self.channels_first = channels_first
        self.decl = declaration(pattern, backend, softcap)
        self.qkv = nn.Linear(dim, dim + 2 * self.kv_heads * (dim // heads), bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.register_parameter("rel_pos_bias_table", None)
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
        inner = tuple(x.shape[2:] if self.channels_first else x.shape[1:-1])
        channels = x.shape[1] if self.channels_first else x.shape[-1]
        if x.dim() < 3 or channels != self.dim:
            layout = ("(batch, {0}, *grid)" if self.channels_first else
                      "(batch, *grid, {0}) or (batch, tokens, {0})").format(self.dim)
            hint = ("" if self.channels_first or x.dim() < 3 or x.shape[1] != self.dim else
                    "; for a (batch, dim, *grid) feature map pass channels_first=True")
            raise PatternError(f"LocalSelfAttention(dim={self.dim}) expects {layout}; got "
                               f"x.shape={tuple(x.shape)}{hint}.")
        if len(inner) > 3:
            raise PatternError(f"x.shape={tuple(x.shape)} has {len(inner)} grid axes; "
                               f"patterngen grids have 1 to 3.")
        if self.grid is not None and inner != self.grid and len(inner) == len(self.grid):
            other = tuple(x.shape[1:-1] if self.channels_first else x.shape[2:])
            if other == self.grid and (x.shape[-1] if self.channels_first else x.shape[1]) \
                    == self.dim:
                raise PatternError(
                    f"x.shape={tuple(x.shape)} is ambiguous: with channels_first="
                    f"{self.channels_first} its grid is {inner}, with channels_first="
                    f"{not self.channels_first} it is this layer's grid={self.grid}. The "
                    f"layout is not guessed: build the layer with channels_first="
                    f"{not self.channels_first} for such inputs, or grid=None.")
        if self.grid is None or len(inner) == len(self.grid):
            return inner
        if inner == (math.prod(self.grid),):
            return self.grid
        table = (f" (the relative position table, {tuple(self.rel_pos_bias_table.shape)}, was "
                 f"built for that grid)" if self.rel_pos_bias else "")
        raise PatternError(
            f"x.shape={tuple(x.shape)} does not match grid={self.grid}{table}: expected (batch, "
            f"{', '.join(map(str, self.grid))}, {self.dim}) or (batch, {math.prod(self.grid)}, "
            f"{self.dim}).")

    def attention(self, grid: tuple, device: torch.device, dtype: torch.dtype):
        """The compiled attention for ``grid`` on ``device`` with ``dtype`` (cached)."""
        return attention(self.decl, grid, device, dtype)

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
        if self.channels_first:
            x = x.movedim(1, -1)
        attn = ordered_attention(self.decl, grid, x)
        if attn is not None:
            out = self.in_order(x, attn).reshape(x.shape)
            return out.movedim(-1, 1) if self.channels_first else out
        shape = x.shape
        batch, tokens, head_dim = x.shape[0], math.prod(grid), self.dim // self.heads
        qkv = self.qkv(x.reshape(batch, tokens, self.dim))
        qkv = qkv.reshape(batch, tokens, self.heads + 2 * self.kv_heads, head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], 1)
        table = self.rel_pos_bias_table
        # under autocast q is in the compute dtype and the table, a weight, is cast to it
        table = None if table is None else table.to(q.dtype)
        # (batch, heads or kv_heads, tokens, head_dim) views: the executors copy what they must
        out = attend(q, k, v, table, self.decl, grid)
        out = self.proj(out.transpose(1, 2).reshape(batch, tokens, self.dim)).reshape(shape)
        return out.movedim(-1, 1) if self.channels_first else out

    def in_order(self, x: torch.Tensor, attn) -> torch.Tensor:
        """The layer on ``x`` ``(batch, *grid, dim)`` with the compiled attention ``attn``
        called in its token order (:func:`ordered_attention`): ``x`` partitioned once before the
        qkv projection, the output put back once after the output projection, as Swin and
        MaxViT do."""
        order = attn.token_order
        batch, positions, head_dim = x.shape[0], order.positions, self.dim // self.heads
        qkv = self.qkv(order.to_order(x)).reshape(
            batch, positions, self.heads + 2 * self.kv_heads, head_dim).transpose(1, 2)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], 1)
        table = self.rel_pos_bias_table
        extra = {} if table is None else {
            "rel_bias": fit_table(table.to(q.dtype), attn.reach, order.grid)}
        out = attn(q, k, v, ordered=True, **extra)
        out = self.proj(out.transpose(1, 2).reshape(batch, positions, self.dim))
        return order.from_order(out)

    def extra_repr(self) -> str:
        extra = "".join(f", {name}={value!r}" for name, value in (
            ("rel_pos_bias", self.rel_pos_bias), ("softcap", self.softcap),
            ("channels_first", self.channels_first)) if value)
        kv = f", kv_heads={self.kv_heads}" if self.kv_heads != self.heads else ""
        return (f"dim={self.dim}, heads={self.heads}, pattern={self.pattern!r}, "
                f"grid={self.grid}, backend={self.backend!r}{extra}{kv}")


class LocalCrossAttention(nn.Module):
    """Multi-head local cross-attention: queries from ``x`` on one grid, keys and values from
    ``context`` on another grid of the same rank (docs/cross.md).

    The query at ``x`` attends the keys the pattern gives the key coordinate
    ``floor((x + 0.5) * n_k / n_q)`` per axis (:func:`patterngen.lower` with ``key_grid``):
    ``window(5)`` from a 64x64 map over a 16x16 one is a learned 4x upsampling.

    Args:
        dim: channels of ``x`` and of the output; a multiple of ``heads``.
        heads: attention heads.
        pattern: a spec such as ``pg.window(5)``, or its expression text, in key-grid units.
        grid, key_grid: the grids of flat ``(batch, tokens, channels)`` inputs (gridded
            inputs carry their own).
        context_dim: channels of ``context`` (default ``dim``).
        backend: a backend that runs key grids (``"auto"`` or ``"numba"``).
        qkv_bias: bias in the q and kv projections.
        softcap: ``None``, or ``c > 0``: scores become ``c * tanh(s / c)``.
        kv_heads: key/value heads, a divisor of ``heads`` (default ``heads``).

    Shapes:
        ``x``: ``(batch, *grid, dim)`` or ``(batch, tokens, dim)``; ``context``:
        ``(batch, *key_grid, context_dim)`` or ``(batch, key tokens, context_dim)``; the
        output has ``x``'s shape.
    """

    def __init__(self, dim: int, heads: int, pattern, grid=None, key_grid=None,
                 context_dim: int | None = None, backend: str = "auto", qkv_bias: bool = True,
                 softcap=None, kv_heads: int | None = None):
        super().__init__()
        if isinstance(pattern, str):
            pattern = parse(pattern)
        if not isinstance(pattern, Pattern):
            raise PatternError(f"Expected a pattern such as pg.window(5), got {pattern!r}.")
        context_dim = dim if context_dim is None else context_dim
        kv_heads = heads if kv_heads is None else kv_heads
        for name, value in (("dim", dim), ("heads", heads), ("context_dim", context_dim),
                            ("kv_heads", kv_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PatternError(f"Invalid {name}={value!r}; expected an integer >= 1.")
        if dim % heads or heads % kv_heads:
            raise PatternError(f"dim must be a multiple of heads and heads of kv_heads: {dim=}, "
                               f"{heads=}, {kv_heads=}.")
        self.dim, self.heads, self.kv_heads, self.context_dim = dim, heads, kv_heads, context_dim
        self.pattern, self.backend, self.softcap = pattern, backend, bias.check_softcap(softcap)
        self.grid, self.key_grid = (None if g is None else as_grid(g).require_numeric(
            "LocalCrossAttention") for g in (grid, key_grid))
        self.decl = declaration(pattern, backend, softcap)
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(context_dim, 2 * kv_heads * (dim // heads), bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    @staticmethod
    def _grid(t: torch.Tensor, grid, channels: int, name: str) -> tuple:
        inner = tuple(t.shape[1:-1])
        if t.dim() < 3 or t.shape[-1] != channels or len(inner) > 3:
            raise PatternError(f"LocalCrossAttention: {name}.shape={tuple(t.shape)}; expected "
                               f"(batch, *grid, {channels}) with 1 to 3 grid axes, or (batch, "
                               f"tokens, {channels}).")
        if grid is None or inner == grid:
            return inner
        if inner == (math.prod(grid),):
            return grid
        raise PatternError(f"LocalCrossAttention: {name}.shape={tuple(t.shape)} does not match "
                           f"its grid {grid}: expected (batch, {', '.join(map(str, grid))}, "
                           f"{channels}) or (batch, {math.prod(grid)}, {channels}).")

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        grid = self._grid(x, self.grid, self.dim, "x")
        key_grid = self._grid(context, self.key_grid, self.context_dim, "context")
        if x.shape[0] != context.shape[0]:
            raise PatternError(f"LocalCrossAttention: x has batch {x.shape[0]} and context "
                               f"{context.shape[0]}; expected the same.")
        batch, tokens, keys = x.shape[0], math.prod(grid), math.prod(key_grid)
        head_dim = self.dim // self.heads
        q = self.q(x.reshape(batch, tokens, self.dim)).reshape(
            batch, tokens, self.heads, head_dim).transpose(1, 2)
        kv = self.kv(context.reshape(batch, keys, self.context_dim)).reshape(
            batch, keys, 2 * self.kv_heads, head_dim).transpose(1, 2)
        k, v = kv.split([self.kv_heads, self.kv_heads], 1)
        attn = attention(self.decl, grid, x.device, q.dtype, key_grid)
        out = attn(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, self.dim)).reshape(x.shape)

    def extra_repr(self) -> str:
        kv = f", kv_heads={self.kv_heads}" if self.kv_heads != self.heads else ""
        ctx = f", context_dim={self.context_dim}" if self.context_dim != self.dim else ""
        return (f"dim={self.dim}, heads={self.heads}, pattern={self.pattern!r}, "
                f"grid={self.grid}, key_grid={self.key_grid}{ctx}, "
                f"backend={self.backend!r}{kv}")


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's ``DropPath``): in training, each sample's branch
    is zeroed with probability ``p`` and the others scaled by ``1 / (1 - p)``."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise PatternError(f"Invalid drop_path={p!r}; expected 0 <= drop_path < 1.")
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _Mlp(nn.Module):
    """timm's ``Mlp``: ``fc1``, activation, dropout, ``fc2``, dropout (timm's key names)."""

    def __init__(self, dim: int, hidden: int, act_layer, drop: float):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), act_layer(), nn.Linear(hidden, dim)
        self.drop1, self.drop2 = nn.Dropout(drop), nn.Dropout(drop)

    def forward(self, x):
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def _pair(value, name: str) -> tuple:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise PatternError(f"Invalid {name}={value!r}; expected an int or two ints.")
    return pair


class SwinBlock(nn.Module):
    """timm's ``SwinTransformerBlock`` with its window attention run by patterngen.

    ``x + drop_path(attn(norm1(x)))`` then ``x + drop_path(mlp(norm2(x)))`` on ``(batch, H, W,
    dim)`` inputs, as timm computes it: ``norm1``, the roll by ``-shift``, zero padding of
    ``H`` and ``W`` up to multiples of the window (the padded tokens are keys, as in timm),
    attention within windows plus the relative position bias (and, when shifted, timm's region
    mask: the last ``shift`` rows and columns of the padded grid apart from the others), the
    crop and the roll back. Every grid runs (timm's ``always_partition=True,
    dynamic_mask=True``; for grids of at least one window timm's defaults give the same). The
    region mask is exact where timm adds -100 to the scores. With ``input_resolution`` the
    window and shift are clamped as timm's default ``always_partition=False`` clamps them: an
    axis no longer than the window gets a window of its length and no shift. On maps the
    windows tile, ``backend="auto"`` runs ``block(window, offset=shift)`` in its token order
    instead (:func:`ordered_attention`): the roll and window partition one gather of ``x``
    before ``qkv``, their reverse one after ``proj``, as timm orders them.

    Parameter names are timm's, except ``attn.rel_pos_bias_table`` (key minus query,
    :func:`from_timm_swin` converts a timm state dict).

    Args:
        dim, heads: channels and attention heads.
        window: ``M`` or ``(M_h, M_w)``.
        shift: ``0`` (W-MSA) or ``s`` / ``(s_h, s_w)`` with ``0 <= s < M`` (SW-MSA).
        mlp_ratio: MLP hidden size over ``dim``.
        qkv_bias: bias in the qkv projection.
        proj_drop: dropout after the attention projection and in the MLP (timm's ``drop``).
        attn_drop: must be 0: the kernels never hold the attention probabilities to drop.
        drop_path: stochastic depth of both branches.
        act_layer, norm_layer: as timm's.
        backend: a patterngen backend name or ``"auto"``.
        input_resolution: timm's ``(H, W)``; ``None`` partitions every grid as given.
        always_partition: with ``input_resolution``, keep the window and shift as given.
    """

    def __init__(self, dim: int, heads: int, window=7, shift=0, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, proj_drop: float = 0.0, attn_drop: float = 0.0,
                 drop_path: float = 0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm,
                 backend: str = "auto", input_resolution=None, always_partition: bool = False):
        super().__init__()
        self.window, self.shift = _pair(window, "window"), _pair(shift, "shift")
        if input_resolution is not None and not always_partition:
            # timm's _calc_window_shift
            res = _pair(input_resolution, "input_resolution")
            self.window = tuple(min(r, w) for r, w in zip(res, self.window))
            self.shift = tuple(0 if r <= w else s
                               for r, w, s in zip(res, self.window, self.shift))
        if not all(0 <= s < m for s, m in zip(self.shift, self.window)):
            raise PatternError(f"Invalid shift={shift!r}; expected 0 <= shift < window="
                               f"{self.window} on each axis.")
        if attn_drop:
            raise PatternError(f"attn_drop={attn_drop!r} is not supported: patterngen's "
                               f"kernels never hold the attention probabilities; use 0.")
        self.norm1, self.norm2 = norm_layer(dim), norm_layer(dim)
        self.attn = LocalSelfAttention(dim, heads, block(self.window), grid=self.window,
                                       backend=backend, qkv_bias=qkv_bias, rel_pos_bias=True)
        if any(self.shift):
            self.attn.decl = declaration(block(self.window), backend, end_cuts=self.shift)
        self.proj_drop = nn.Dropout(proj_drop)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio), act_layer, proj_drop)
        self.drop_path1, self.drop_path2 = DropPath(drop_path), DropPath(drop_path)

    @functools.cached_property
    def tiled_decl(self) -> str:
        """On maps the windows tile, timm's roll and region mask are exactly
        ``block(window, offset=shift)`` (docs/swin.md), whose token order is the roll and the
        window partition in one gather, done once on ``x``. Derived, not stored by
        ``__init__``, so a block pickled before it existed still runs."""
        return declaration(block(self.window, offset=self.shift), self.attn.backend)

    def _attn(self, x):
        h, w = x.shape[1], x.shape[2]
        if self.attn.backend == "auto" and not (h % self.window[0] or w % self.window[1]):
            attn = ordered_attention(self.tiled_decl, (h, w), x)
            if attn is not None:
                return self.proj_drop(self.attn.in_order(x, attn))
        if any(self.shift):
            x = torch.roll(x, shifts=(-self.shift[0], -self.shift[1]), dims=(1, 2))
        pad_h, pad_w = (-h) % self.window[0], (-w) % self.window[1]
        x = self.proj_drop(self.attn(nn.functional.pad(x, (0, 0, 0, pad_w, 0, pad_h))))
        x = x[:, :h, :w]
        if any(self.shift):
            x = torch.roll(x, shifts=self.shift, dims=(1, 2))
        return x

    def forward(self, x):
        if x.dim() != 4 or x.shape[-1] != self.attn.dim:
            raise PatternError(f"SwinBlock(dim={self.attn.dim}) expects (batch, H, W, "
                               f"{self.attn.dim}); got x.shape={tuple(x.shape)}.")
        x = x + self.drop_path1(self._attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        return f"window={self.window}, shift={self.shift}"


def from_timm_swin(state_dict: dict, window) -> dict:
    """A timm Swin state dict (blocks' ``attn.relative_position_bias_table``) converted for
    :class:`SwinBlock`: each table becomes ``attn.rel_pos_bias_table`` by
    :func:`patterngen.bias.from_swin`, and timm's derived buffers (``relative_position_index``,
    ``attn_mask``) are dropped; other keys are kept.

    Args:
        state_dict: timm's, e.g. ``block.state_dict()`` or a whole model's.
        window: ``M`` or ``(M_h, M_w)``.
    """
    out = {}
    for key, value in state_dict.items():
        name = key.rsplit(".", 1)[-1]
        if name in ("relative_position_index", "attn_mask"):
            continue
        if name == "relative_position_bias_table":
            key, value = key[:-len(name)] + "rel_pos_bias_table", bias.from_swin(value, window)
        out[key] = value
    return out


# when importing this module brought torch in, the other operators register now that it is built
register_pending(__name__)
