"""Autograd: the kernels as a ``torch.autograd.Function`` (numpy in, numpy out, no copies).

bfloat16 and float16 inputs run the float32 kernels: they are converted on the way in and the
results on the way out, so out, dq, dk and dv come back in the input's dtype. The forward
saves the float32 output and log-sum-exp for the backward (FlashAttention-2:
``D = rowsum(dO * out)``).
"""

from __future__ import annotations

import functools

#: input dtypes the kernels compute in float32 and return in their own dtype
WIDENED = ("bfloat16", "float16")


@functools.cache
def attention_function():
    """The ``torch.autograd.Function`` class (built on first use: torch imports lazily)."""
    import torch

    def widen(t):
        t = t.detach()
        return t.float().numpy() if t.dtype in (torch.bfloat16, torch.float16) else t.numpy()

    class NumbaAttention(torch.autograd.Function):
        """``out = softmax(q k^T * scale, masked) v`` by the generated kernels."""

        @staticmethod
        def forward(ctx, q, k, v, backend, shape, scale):
            out, lse = backend.forward_numpy(widen(q), widen(k), widen(v), shape, scale)
            out, lse = torch.from_numpy(out), torch.from_numpy(lse)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.backend, ctx.shape, ctx.scale = backend, shape, scale
            return out.to(q.dtype)

        @staticmethod
        def backward(ctx, dout):
            q, k, v, out, lse = ctx.saved_tensors
            dout = widen(dout.contiguous())
            grads = ctx.backend.backward_numpy(widen(q), widen(k), widen(v), out.numpy(),
                                               dout, lse.numpy(), ctx.shape, ctx.scale)
            return (*(torch.from_numpy(g).to(q.dtype) for g in grads), None, None, None)

    return NumbaAttention
