"""Autograd: the kernels as ``torch.library`` operators with a registered autograd formula.

``patterngen::numba_fwd(q, k, v, key, scale, rel_bias, softcap) -> (out, lse)`` and
``patterngen::numba_bwd(q, k, v, out, lse, dout, key, scale, rel_bias, softcap) -> (dq, dk,
dv)`` (numpy in, numpy out, no copies for float32/float64); the compiled pattern is found by
its key (:mod:`patterngen.backends.ops`), so ``torch.compile`` and ``torch.export`` see one
operator and never trace into the launcher. bfloat16 and float16 inputs run the float32
kernels: they are converted on the way in and the results on the way out, so out, dq, dk and
dv come back in the input's dtype; the log-sum-exp is float32 (float64 for float64). The
backward receives the forward's output and log-sum-exp (FlashAttention-2:
``D = rowsum(dO * out)``), or a term-wise plan's merged ones.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from patterngen.backends.ops import NAMESPACE, lookup, lse_dtype, widened
from patterngen.errors import PatternError

__all__ = ["numba_fwd", "numba_bwd", "WIDENED"]

#: input dtypes the kernels compute in float32 and return in their own dtype
WIDENED = ("bfloat16", "float16")


def _refuse(rel_bias, softcap) -> None:
    if rel_bias is not None or softcap is not None:
        raise PatternError("numba: the kernels add no rel_bias or softcap yet; use "
                           "backend='sdpa' or 'flex' for them.")


@torch.library.custom_op(f"{NAMESPACE}::numba_fwd", mutates_args=(), device_types="cpu")
def numba_fwd(q: Tensor, k: Tensor, v: Tensor, key: str, scale: float,
              rel_bias: Optional[Tensor], softcap: Optional[float]) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of the kernels of ``key`` on ``(batch, heads, tokens, dim)`` tensors."""
    _refuse(rel_bias, softcap)
    backend = lookup(key)
    out, lse = backend.forward_numpy(widened(q), widened(k), widened(v), backend.shape, scale)
    return torch.from_numpy(out).to(q.dtype), torch.from_numpy(lse)


@numba_fwd.register_fake
def _(q, k, v, key, scale, rel_bias, softcap):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=lse_dtype(q.dtype))


@torch.library.custom_op(f"{NAMESPACE}::numba_bwd", mutates_args=(), device_types="cpu")
def numba_bwd(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
              key: str, scale: float, rel_bias: Optional[Tensor],
              softcap: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk, dv)`` of the kernels of ``key`` from the forward's ``out`` and ``lse``."""
    _refuse(rel_bias, softcap)
    backend = lookup(key)
    grads = backend.backward_numpy(*(widened(t) for t in (q, k, v, out, dout)),
                                   lse.detach().contiguous().numpy(), backend.shape, scale)
    return tuple(torch.from_numpy(g).to(q.dtype) for g in grads)


@numba_bwd.register_fake
def _(q, k, v, out, lse, dout, key, scale, rel_bias, softcap):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, key, scale, rel_bias, softcap = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.key, ctx.scale = key, scale


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = numba_bwd(q, k, v, out, lse, dout.contiguous(), ctx.key, ctx.scale, None,
                           None)
    return dq, dk, dv, None, None, None, None


numba_fwd.register_autograd(_backward, setup_context=_setup)
