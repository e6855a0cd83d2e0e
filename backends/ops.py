"""The executors that leave torch, as ``torch.library`` operators.

``torch.compile`` and ``torch.export`` cannot trace numpy arrays and numba kernels; FlexAttention
and NATTEN register their kernels as operators for the same reason. The numba kernels
(``backends/numba/autograd.py``) and the term-wise planner's runs (``backends/planned/``)
are custom ops in the ``patterngen`` namespace, each with a fake (meta) implementation that
gives the output shapes and an autograd formula that calls the matching backward op; this
module holds what they share. The ops take tensors and plain values only: the compiled
pattern is found by a *key* (:func:`register`), the backend's name, a stable digest, and the
IR and options themselves as JSON, so a compiled or exported graph holds a string, not a
Python object. A process that meets a key it has not registered (a loaded exported program) rebuilds the
compiled pattern from the key on first use (:func:`lookup`).

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

import dataclasses
import hashlib
import json
import threading

import torch
from torch import Tensor

from patterngen.errors import PatternError

__all__ = ["register", "register_rebuild", "lookup", "widened", "eager_function",
           "traced_or_eager", "NAMESPACE"]

NAMESPACE = "patterngen"
_COMPILED: dict = {}
_LOCK = threading.Lock()


def _nodes() -> dict:
    """The classes a key may name: the IR's nodes and the grid, nothing else."""
    from patterngen import ir
    from patterngen.grid import Grid

    atoms, todo = {}, [ir.Atom]
    while todo:
        cls = todo.pop()
        atoms[cls.__name__] = cls
        todo += cls.__subclasses__()
    return {**atoms, **{c.__name__: c for c in (ir.Rel, ir.Term, ir.IR, ir.HeadsIR, Grid)}}


def _encode(x):
    """``x`` (IR nodes, tuples, numbers, strings, ``None``) as JSON values."""
    if x is None or isinstance(x, (bool, str, float)):
        return x
    if isinstance(x, int) or type(x).__module__ == "numpy" and hasattr(x, "__index__"):
        return int(x)
    if isinstance(x, (tuple, list)):
        return [_encode(v) for v in x]
    if dataclasses.is_dataclass(x) and _nodes().get(type(x).__name__) is type(x):
        return {"node": type(x).__name__,
                **{f.name: _encode(getattr(x, f.name)) for f in dataclasses.fields(x)}}
    raise TypeError(f"cannot write {type(x).__name__} into an op key")


def _decode(x):
    """The inverse of :func:`_encode` (JSON arrays become tuples); only IR nodes are built."""
    if isinstance(x, list):
        return tuple(_decode(v) for v in x)
    if isinstance(x, dict):
        fields = {k: _decode(v) for k, v in x.items() if k != "node"}
        cls = _nodes().get(x.get("node"))
        if cls is None:
            raise PatternError(f"an op key names {x.get('node')!r}, which is not an IR node")
        return cls(**fields)
    return x


def register(backend, *options) -> str:
    """The key of ``backend`` (registered for the ops to find): its name, a digest, and its IR
    and ``options`` as JSON (:func:`lookup` rebuilds from them), stable across processes."""
    try:
        payload = json.dumps([_encode(backend.ir), _encode(options)], separators=(",", ":"))
    except TypeError:  # a symbolic size or a foreign object: found in this process only
        payload = repr((backend.ir, backend.ir.label, options))
    digest = hashlib.sha256(f"{backend.name}:{payload}".encode()).hexdigest()[:20]
    key = f"{backend.name}:{digest}:{payload}"
    with _LOCK:
        _COMPILED.setdefault(key, backend)
    return key


#: how each backend that registers keys is rebuilt from the IR and options in its key, set by
#: the backend's module (:func:`register_rebuild`) where it defines its operators: a key
#: reaches :func:`lookup` only through those operators, so its backend's module is loaded
_REBUILD: dict = {}


def register_rebuild(name: str, rebuild) -> None:
    """``rebuild(lowered, options)`` compiles again, in this process, the ``name`` backend
    whose key carries ``lowered`` and ``options`` (which registers it under that key)."""
    _REBUILD[name] = rebuild


def lookup(key: str):
    """The compiled backend registered under ``key``; one this process has not compiled is
    rebuilt from the IR and options the key carries (a loaded exported program's).

    Raises:
        PatternError: for a key that carries no pattern, or one that does not rebuild to itself.
    """
    found = _COMPILED.get(key)
    if found is not None:
        return found
    name, digest, payload = (key.split(":", 2) + ["", ""])[:3]
    if name in _REBUILD and payload.startswith("[") and digest == hashlib.sha256(
            f"{name}:{payload}".encode()).hexdigest()[:20]:
        from patterngen import ir

        try:
            lowered, options = _decode(json.loads(payload))
        except (TypeError, ValueError) as e:
            raise PatternError(f"Op key {key[:80]!r}... does not describe a pattern ({e}).") \
                from None
        ir.verify(lowered)
        _REBUILD[name](lowered, options)
        if key in _COMPILED:
            return _COMPILED[key]
        raise PatternError(f"Op key {key[:80]!r}... rebuilds to another key in this process "
                           f"(another patterngen version?); compile the pattern (pg.compile) "
                           f"before running a graph or exported program that calls it.")
    raise PatternError(
        f"No compiled pattern has op key {key!r} in this process, and the key carries none to "
        f"rebuild; compile the pattern (pg.compile) before running a graph or exported "
        f"program that calls it.")


def widened(t: Tensor):
    """A float32/float64 numpy view of ``t`` (half precision runs in float32)."""
    t = t.detach()
    if t.dtype not in (torch.float32, torch.float64):
        t = t.float()
    return t.contiguous().numpy()


def eager_function(name: str, forward, setup_context, backward) -> type:
    """A ``torch.autograd.Function`` from an operator's implementation ``forward(*inputs)``
    and its ``register_autograd`` formula (``setup_context(ctx, inputs, output)``,
    ``backward(ctx, *grads)``)."""
    return type(name, (torch.autograd.Function,), dict(
        forward=staticmethod(forward), setup_context=staticmethod(setup_context),
        backward=staticmethod(backward)))


def traced_or_eager(op, function):
    """``op(*args)`` while ``torch.compile`` or ``torch.export`` traces, else
    ``function.apply(*args)``: the same results and gradients without the op dispatch. A call
    with no gradient to record runs ``function.forward`` itself: ``apply`` binds a
    ``setup_context`` function's arguments through ``inspect.signature`` on every call, 18 us
    of a 0.2 ms call (Python 3.11, torch 2.13)."""
    def call(*args):
        if torch.compiler.is_compiling():
            return op(*args)
        if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad
                                           for a in args):
            return function.apply(*args)
        return function.forward(*args)

    call.op = op
    return call
