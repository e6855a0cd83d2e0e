"""A fake backend (the dense oracle behind the backend interface), shared by the tests of
profile, nn, cli and the registry, so they do not depend on a real backend's compile time."""

import torch

import patterngen as pg
from patterngen import backends

FAKE = "test_fake_dense"


class FakeDense(backends.Backend):
    """The dense oracle as a backend, so the tests of profile, nn and cli compile nothing."""

    name = FAKE
    SUPPORTED_DEVICES = ("cpu", "cuda")

    def __init__(self, ir, **options):
        self.mask = torch.as_tensor(pg.materialize(ir))

    def __call__(self, q, k, v):
        b, h, d = q.shape[0], q.shape[1], q.shape[-1]
        flat = (t.reshape(b, h, -1, d) for t in (q, k, v))
        return pg.dense_attention(*flat, self.mask.to(q.device)).reshape(q.shape)


def register_fake_backend() -> str:
    """Register the fake backend once per process (the registry refuses duplicates)."""
    if FAKE not in backends.available():
        backends.register_backend(FAKE, FakeDense)
    return FAKE


