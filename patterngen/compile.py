"""``compile(pattern, grid, backend)``: lower a pattern and hand it to a registered backend."""

from __future__ import annotations

from .errors import BackendUnavailable
from .spec import as_ir

__all__ = ["compile"]


def compile(pattern, grid=None, backend="auto", device="cpu", dtype="float32", **options):
    """Compile ``pattern`` on ``grid`` into a callable ``attn(q, k, v) -> out`` with autograd.

    Args:
        pattern: a spec or a lowered IR.
        grid: the token grid, e.g. ``(64, 64)``.
        backend: a registered name (``"numba"``, ``"sdpa"``, ``"flex"``) or ``"auto"``, which
            picks the first backend that supports ``device`` and ``dtype``.
        device, dtype: what the inputs will be (used by ``"auto"`` and capability checks).
        **options: backend options (documented on each backend class).

    Raises:
        BackendUnavailable: with every backend's reasons when none fits.
    """
    from patterngen import backends

    lowered = as_ir(pattern, grid)
    if backend == "auto":
        cls = backends.select(lowered, device, dtype)
    else:
        cls = backends.get_backend(backend)
        reasons = cls.not_supported_reasons(lowered, device, dtype)
        if reasons:
            raise BackendUnavailable(f"Backend {backend!r} cannot run {lowered.label} on "
                                     f"device={device!r}, dtype={dtype!r}: " + "; ".join(reasons))
    return cls(lowered, **options)
