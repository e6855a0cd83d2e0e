"""``compile(pattern, grid, backend)``: lower a pattern and hand it to a registered backend."""

from __future__ import annotations

import math

from . import limits
from .errors import BackendUnavailable
from .parse import as_ir

__all__ = ["compile"]


def compile(pattern, grid=None, backend="auto", device="cpu", dtype="float32", key_grid=None,
            **options):
    """Compile ``pattern`` on ``grid`` into a callable ``attn(q, k, v) -> out`` with autograd.

    Args:
        pattern: a spec or a lowered IR.
        grid: the token grid, e.g. ``(64, 64)``.
        key_grid: the keys' grid when k and v live on another grid than q (same rank): the
            query at ``x`` attends the keys the pattern gives the key coordinate
            ``floor((x + 0.5) * n_k / n_q)`` per axis (docs/cross.md).
        backend: a registered name (``"numba"``, ``"sdpa"``, ``"flex"``) or ``"auto"``, which
            follows :func:`patterngen.plan.plan`: each term of the union on its cheapest
            executor, or the whole pattern on one backend, by predicted time (``attn.plan``).
        device, dtype: what the inputs will be (used by ``"auto"`` and capability checks).
        **options: backend options (documented on each backend class; for ``"auto"``:
            ``head_dim``, ``heads``, ``batch``, ``backward`` to plan for, ``strategy``,
            ``rates``, ``scale``).

    Raises:
        BackendUnavailable: when the named backend cannot run the pattern on ``device`` with
            ``dtype``, with its reasons.
        UnknownBackend: for a name no backend has.
    """
    from patterngen import backends

    lowered = as_ir(pattern, grid, key_grid)
    for g in (lowered.grid, lowered.keys):
        if g.numeric:
            limits.check("PATTERNGEN_MAX_TOKENS", math.prod(g.shape),
                         f"compile: grid {g}'s tokens")
    cls = backends.get_backend(backend)
    if backend == "auto":
        return cls(lowered, device=device, dtype=dtype, **options)
    reasons = cls.not_supported_reasons(lowered, device, dtype)
    if reasons:
        raise BackendUnavailable(f"Backend {backend!r} cannot run {lowered.label} on "
                                 f"device={device!r}, dtype={dtype!r}: " + "; ".join(reasons))
    return cls(lowered, **options)
