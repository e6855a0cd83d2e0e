"""Input checks shared by every backend: shapes, dtypes and devices, with clear errors."""

from __future__ import annotations

import math

from patterngen import ir
from patterngen.cost import check_kv_heads
from patterngen.errors import PatternError


def flatten_qkv(q, k, v, shape: tuple, backend: str, key_shape: tuple | None = None):
    """Check ``q, k, v`` against a compiled grid and flatten them to ``(batch, heads, N, dim)``.

    Accepts ``(batch, heads, *grid, dim)`` or ``(batch, heads, tokens, dim)``; ``k`` and ``v``
    may have fewer heads than ``q``, a divisor of them (grouped key/value heads). With
    ``key_shape`` (keys on another grid) ``k`` and ``v`` have that grid or its tokens.

    Returns:
        ``(q, k, v, restore)``: flattened views and a function that reshapes an output like
        the flattened ``q`` back to the caller's layout.

    Raises:
        PatternError: naming the tensor, what was expected and what was received.
    """
    import torch

    tokens = math.prod(shape)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise PatternError(
                f"{backend}: {name} must be a torch.Tensor, got {type(t).__name__}.")
    if not (q.dtype == k.dtype == v.dtype):
        raise PatternError(f"{backend}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}.")
    if not (q.device == k.device == v.device):
        raise PatternError(
            f"{backend}: q, k, v devices differ: {q.device}, {k.device}, {v.device}.")
    if key_shape is not None:
        return _flatten_cross(q, k, v, shape, key_shape, backend)
    if not (k.shape == v.shape and q.dim() == k.dim() >= 2 and q.shape[0] == k.shape[0]
            and q.shape[2:] == k.shape[2:]):
        raise PatternError(
            f"{backend}: q, k, v shapes differ: q={tuple(q.shape)}, k={tuple(k.shape)}, "
            f"v={tuple(v.shape)}; expected one (batch, heads, *grid, head_dim) shape (k and v "
            f"may have fewer heads than q).")
    check_kv_heads(q.shape[1], k.shape[1], backend)
    gridded = (q.dim() == len(shape) + 3 and tuple(q.shape[2:-1]) == tuple(shape))
    flat = q.dim() == 4 and q.shape[2] == tokens
    if not (gridded or flat):
        raise PatternError(
            f"{backend}: q has shape {tuple(q.shape)}; the pattern was compiled for grid "
            f"{'x'.join(map(str, shape))}, so expected (batch, heads, {', '.join(map(str, shape))}"
            f", head_dim) or (batch, heads, {tokens}, head_dim).")
    out_shape = q.shape
    b, d = q.shape[0], q.shape[-1]
    q, k, v = (t.reshape(b, t.shape[1], tokens, d) for t in (q, k, v))
    return q, k, v, (lambda out: out.reshape(out_shape))


def _layout_of(t, shape: tuple, name: str, backend: str, role: str) -> bool:
    """Whether ``t`` is gridded (``(batch, heads, *shape, dim)``) rather than flat; raises
    for neither."""
    tokens = math.prod(shape)
    if t.dim() == len(shape) + 3 and tuple(t.shape[2:-1]) == tuple(shape):
        return True
    if t.dim() == 4 and t.shape[2] == tokens:
        return False
    sizes = ", ".join(map(str, shape))
    raise PatternError(
        f"{backend}: {name} has shape {tuple(t.shape)}; the {role} grid is "
        f"{'x'.join(map(str, shape))} ({tokens} tokens), so expected (batch, heads, {sizes}, "
        f"head_dim) or (batch, heads, {tokens}, head_dim).")


def _flatten_cross(q, k, v, shape: tuple, key_shape: tuple, backend: str):
    """:func:`flatten_qkv` when ``k`` and ``v`` live on the grid ``key_shape``."""
    if not (k.shape == v.shape and q.dim() >= 3 and k.dim() >= 3 and q.shape[0] == k.shape[0]
            and q.shape[-1] == k.shape[-1]):
        raise PatternError(
            f"{backend}: q={tuple(q.shape)}, k={tuple(k.shape)}, v={tuple(v.shape)}; expected "
            f"k and v of one shape, and q, k, v of one batch and head_dim.")
    check_kv_heads(q.shape[1], k.shape[1], backend)
    _layout_of(q, shape, "q", backend, "query")
    _layout_of(k, key_shape, "k", backend, "key")
    out_shape = q.shape
    b, d = q.shape[0], q.shape[-1]
    q = q.reshape(b, q.shape[1], math.prod(shape), d)
    k, v = (t.reshape(b, t.shape[1], math.prod(key_shape), d) for t in (k, v))
    return q, k, v, (lambda out: out.reshape(out_shape))


def non_finite(*tensors) -> bool:
    """Whether one of ``tensors`` (k and v) holds a NaN or an infinity (one pass over each;
    not checked inside ``torch.compile``, where a data-dependent branch would break the
    graph)."""
    import torch

    if torch.compiler.is_compiling():
        return False
    # one reduction each, into nothing new: the extremes are NaN or infinite exactly where a
    # value is (torch.isfinite runs four elementwise passes on CPU, measured 10x the time;
    # (x * 0).sum() 2-4x, its product a new tensor whose pages faulted on every call)
    extremes = [e for t in tensors if t.numel() for e in torch.aminmax(t)]
    return bool(extremes) and not bool(torch.isfinite(sum(extremes)))


def unit_stride(*tensors):
    """The tensors, each copied to contiguous only when its last dimension is strided.

    The fused kernels called directly (``aten._scaled_dot_product_flash_attention_for_cpu``,
    its backward, CUDA's ``_scaled_dot_product_efficient_attention``) read each row of
    ``head_dim`` elements as unit-stride without checking it; a view of a channels-first
    tensor (a 1x1 convolution's q, k, v) gave garbage there. ``F.scaled_dot_product_attention``
    checks the same stride and falls back to its math path."""
    return tuple(t if t.shape[-1] == 1 or t.stride(-1) == 1 else t.contiguous()
                 for t in tensors)


def kv_heads_of(p: int, npat: int, heads: int, kv_heads: int):
    """What selects, from k and v, the key/value heads that the query heads of listed pattern
    ``p`` of ``npat`` (heads ``p, p + npat, ...``) read, in their order, each read by equally
    many of them: a slice when the groups nest in the pattern count or the reverse; else an
    index tensor of one kv head per query head (k and v are then copied for these heads)."""
    group = heads // kv_heads
    if npat == 1 or group % npat == 0:
        return slice(None)
    if npat % group == 0:
        return slice(p // group, None, npat // group)
    import torch

    return torch.tensor([h // group for h in ir.heads_of(p, npat, heads)])


def take_heads(t, sel):
    """``t[:, sel]`` for a slice or an index tensor."""
    return t[:, sel] if isinstance(sel, slice) else t.index_select(1, sel.to(t.device))


def select_rows(x3, index, out=None, flat=None):
    """``x3.index_select(1, index)`` for a ``(blocks, n, d)`` ``x3``, written into ``out`` (a
    contiguous tensor of ``blocks * len(index) * d`` elements, no autograd) when given.

    torch's CPU ``index_select`` runs along dim 1 on one thread and along dim 0 on every
    thread: where :func:`flat_gather` holds, ``x3`` is gathered as ``(blocks * n, d)`` by one
    index into all its rows (``flat``, the caller's kept :func:`flat_rows`, else built here by
    an arange and an add). At two threads that took 0.54-0.89x the time along dim 1 (the
    build included; 4-24 blocks of 256-4096 rows, 1024-16384 rows gathered, head_dim 32 and
    64; 1.1x for 2 blocks of 784), 0.73-0.76x forward and backward; at one thread 1.0-1.6x,
    so there it stays along dim 1 (AVX512)."""
    import torch

    blocks, n, d = x3.shape
    m = index.numel()
    if flat_gather(x3):
        if flat is None:
            flat = (torch.arange(0, blocks * n, n, device=index.device)[:, None]
                    + index).view(-1)
        src, dim, index, shape = x3.view(blocks * n, d), 0, flat, (blocks * m, d)
    else:
        src, dim, shape = x3, 1, (blocks, m, d)
    if out is None:
        return src.index_select(dim, index).view(blocks, m, d)
    return torch.index_select(src, dim, index, out=out.view(shape)).view(blocks, m, d)


def flat_gather(x3) -> bool:
    """Whether :func:`select_rows` gathers ``x3`` along dim 0 of its rows: contiguous, on CPU,
    with several threads."""
    import torch

    return x3.device.type == "cpu" and torch.get_num_threads() > 1 and x3.is_contiguous()


def flat_rows(index, blocks: int, n: int):
    """``index`` (positions among ``n`` rows) in each of ``blocks`` blocks of ``n`` rows, as
    one index into all ``blocks * n`` rows: what ``index_select`` along dim 0 of ``(blocks *
    n, d)`` takes, which torch's CPU runs on every thread (along dim 1 of ``(blocks, n, d)``
    on one; ``DenseTerm._select``)."""
    import numpy as np
    import torch

    return torch.as_tensor((np.arange(blocks)[:, None] * n + index.cpu().numpy()).reshape(-1),
                           device=index.device)
