"""The executors that leave torch, as ``torch.library`` operators.

``torch.compile`` and ``torch.export`` cannot trace numpy arrays and numba kernels; FlexAttention
and NATTEN register their kernels as operators for the same reason. The numba kernels
(``backends/numba/autograd.py``) and the term-wise planner's runs (``backends/planned.py``)
are custom ops in the ``patterngen`` namespace, each with a fake (meta) implementation that
gives the output shapes and an autograd formula that calls the matching backward op; this
module holds what they share. The ops take tensors and plain values only: the compiled pattern is found
by a *key* (:func:`register`), a stable digest of the backend, its IR and its options, so a
compiled or exported graph holds a string, not a Python object. A process that loads an
exported program compiles the same pattern first, which registers the same key.

The schemas carry the relative position bias table and the softcap (``Tensor? rel_bias,
float? softcap``); the backward operators return the table's gradient.

Eager calls do not go through the operators: they run the same implementation and autograd
formula as a ``torch.autograd.Function`` (:func:`traced_or_eager`). A custom op's first call
imports ``torch._dynamo`` (its implementation is wrapped to keep dynamo out), which cost a
process's first forward about 0.9 s of CPU time, and each call pays torch.library's dispatch
(about 20 us); only tracing needs the operator.

Example:
    >>> import torch, patterngen as pg
    >>> attn = pg.compile(pg.window(3), grid=(8,), backend="numba")
    >>> q = k = v = torch.randn(1, 2, 8, 4)
    >>> out, lse = torch.ops.patterngen.numba_fwd(q, k, v, attn.op_key, 0.5, None, None)
    >>> out.shape, lse.shape
    (torch.Size([1, 2, 8, 4]), torch.Size([1, 2, 8]))
"""

from __future__ import annotations

import hashlib
import threading

import torch
from torch import Tensor

from patterngen.errors import PatternError

__all__ = ["register", "lookup", "widened", "lse_dtype", "eager_function", "traced_or_eager",
           "NAMESPACE"]

NAMESPACE = "patterngen"
_COMPILED: dict = {}
_LOCK = threading.Lock()


def register(backend, *options) -> str:
    """The key of ``backend`` (registered for the ops to find): its name and a digest of its
    IR, labels and ``options``, stable across processes."""
    text = repr((backend.name, backend.ir, backend.ir.label, options))
    key = f"{backend.name}:{hashlib.sha256(text.encode()).hexdigest()[:20]}"
    with _LOCK:
        _COMPILED.setdefault(key, backend)
    return key


def lookup(key: str):
    """The compiled backend registered under ``key``.

    Raises:
        PatternError: for a key no pattern compiled in this process has.
    """
    try:
        return _COMPILED[key]
    except KeyError:
        raise PatternError(
            f"No compiled pattern has op key {key!r} in this process; compile the pattern "
            f"(pg.compile) before running a graph or exported program that calls it.") from None


def widened(t: Tensor):
    """A float32/float64 numpy view of ``t`` (half precision runs in float32)."""
    t = t.detach()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return t.contiguous().numpy()


def lse_dtype(dtype):
    """The log-sum-exp's dtype for inputs of ``dtype`` (float32 below float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def eager_function(name: str, forward, setup_context, backward) -> type:
    """A ``torch.autograd.Function`` from an operator's implementation ``forward(*inputs)``
    and its ``register_autograd`` formula (``setup_context(ctx, inputs, output)``,
    ``backward(ctx, *grads)``)."""
    return type(name, (torch.autograd.Function,), dict(
        forward=staticmethod(forward), setup_context=staticmethod(setup_context),
        backward=staticmethod(backward)))


def traced_or_eager(op, function):
    """``op(*args)`` while ``torch.compile`` or ``torch.export`` traces, else
    ``function.apply(*args)``: the same results and gradients without the op dispatch."""
    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        return function.apply(*args)

    call.op = op
    return call
