"""Autograd: the kernels as ``torch.library`` operators with a registered autograd formula.

``patterngen::numba_fwd(q, k, v, key, scale, rel_bias, softcap) -> (out, lse)`` and
``patterngen::numba_bwd(q, k, v, out, lse, dout, key, scale, rel_bias, softcap) -> (dq, dk,
dv, drel_bias)`` (numpy in, numpy out, no copies for float32/float64); the compiled pattern is
found by its key (:mod:`patterngen.backends.ops`), so ``torch.compile`` and ``torch.export``
see one operator and never trace into the launcher. bfloat16 and float16 inputs run the
float32 kernels: they are converted on the way in and the results on the way out, so out, dq,
dk, dv and the table's gradient come back in the input's dtype; the log-sum-exp is float32
(float64 for float64). ``drel_bias`` is an empty tensor when there is no table (an operator
returns tensors only). Eager calls run the same implementation and formula as an
``autograd.Function`` instead of the operators
(:func:`patterngen.backends.ops.traced_or_eager`). The backward receives the forward's output
and log-sum-exp (FlashAttention-2: ``D = rowsum(dO * out)``), or a term-wise plan's merged
ones.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from patterngen.backends.merge import acc_dtype
from patterngen.backends.ops import (NAMESPACE, eager_function, lookup,
                                     traced_or_eager, widened)

__all__ = ["numba_fwd", "numba_bwd", "WIDENED"]

#: input dtypes the kernels compute in float32 and return in their own dtype
WIDENED = ("bfloat16", "float16")


def _table(rel_bias):
    """The table as the kernels read it (``None`` stays ``None``)."""
    return None if rel_bias is None else widened(rel_bias)


def _forward_impl(q: Tensor, k: Tensor, v: Tensor, key: str, scale: float,
                  rel_bias: Optional[Tensor], softcap: Optional[float]) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of the kernels of ``key`` on ``(batch, heads, tokens, dim)`` tensors."""
    backend = lookup(key)
    out, lse = backend.forward_numpy(widened(q), widened(k), widened(v), backend.shape, scale,
                                     _table(rel_bias), softcap)
    return torch.from_numpy(out).to(q.dtype), torch.from_numpy(lse)


def _backward_impl(q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor,
                   key: str, scale: float, rel_bias: Optional[Tensor],
                   softcap: Optional[float]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, drel_bias)`` of the kernels of ``key`` from the forward's ``out`` and
    ``lse``; ``drel_bias`` is empty without a table."""
    backend = lookup(key)
    grads = backend.backward_numpy(*(widened(t) for t in (q, k, v, out, dout)),
                                   lse.detach().contiguous().numpy(), backend.shape, scale,
                                   _table(rel_bias), softcap)
    dq, dk, dv, *dbias = (torch.from_numpy(g).to(q.dtype) for g in grads)
    return dq, dk, dv, dbias[0] if dbias else q.new_empty(0)


_forward_op = torch.library.custom_op(f"{NAMESPACE}::numba_fwd", _forward_impl, mutates_args=(),
                                      device_types="cpu")
numba_bwd = torch.library.custom_op(f"{NAMESPACE}::numba_bwd", _backward_impl,
                                    mutates_args=(), device_types="cpu")


@_forward_op.register_fake
def _(q, k, v, key, scale, rel_bias, softcap):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=acc_dtype(q.dtype))


@numba_bwd.register_fake
def _(q, k, v, out, lse, dout, key, scale, rel_bias, softcap):
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(0) if rel_bias is None else torch.empty_like(rel_bias))


def _setup(ctx, inputs, output):
    q, k, v, key, scale, rel_bias, softcap = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, rel_bias)
    ctx.key, ctx.scale, ctx.softcap = key, scale, softcap


def _backward_with(backward):
    """The autograd formula, calling ``backward`` (the operator when traced, the
    implementation in eager mode)."""
    def formula(ctx, dout, dlse):
        q, k, v, out, lse, rel_bias = ctx.saved_tensors
        dq, dk, dv, dbias = backward(q, k, v, out, lse, dout.contiguous(), ctx.key, ctx.scale,
                                     rel_bias, ctx.softcap)
        return dq, dk, dv, None, None, dbias if rel_bias is not None else None, None
    return formula


_forward_op.register_autograd(_backward_with(numba_bwd), setup_context=_setup)
#: ``(out, lse)``: the operator while torch.compile/export trace, else the same
#: implementation and formula as an autograd.Function (see backends/ops.py)
numba_fwd = traced_or_eager(_forward_op, eager_function(
    "NumbaFunction", _forward_impl, _setup, _backward_with(_backward_impl)))
