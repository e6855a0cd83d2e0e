"""Shared by the examples: run a pattern on the best CPU backend, check it, time it."""

from __future__ import annotations

import argparse
import sys

import torch

import patterngen as pg
from patterngen import backends
from patterngen.profile import profile


def expect(condition: bool, message: str) -> None:
    """Exit with status 1 and ``message`` when a check fails."""
    if not condition:
        print(f"MISMATCH: {message}", file=sys.stderr)
        sys.exit(1)


def parse_args(doc: str) -> argparse.Namespace:
    """The examples' one option: which backend to check and time."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--backend", default="auto",
                        help="backend to check and time (default: the best installed on CPU)")
    return parser.parse_args()


def best_backend(pattern, grid, backend="auto") -> str:
    """``backend``, or for ``"auto"`` the backend the registry selects on CPU."""
    if backend != "auto":
        return backend
    return backends.select(pg.lower(pattern, grid), "cpu", "float32").name


def oracle(pattern, grid, q, k, v):
    """Dense masked attention on ``(batch, heads, *grid, head_dim)`` inputs."""
    b, h, d = q.shape[0], q.shape[1], q.shape[-1]
    flat = (t.reshape(b, h, -1, d) for t in (q, k, v))
    mask = torch.as_tensor(pg.materialize(pattern, grid))
    return pg.dense_attention(*flat, mask).reshape(q.shape)


def check_and_time(pattern, grid, backend="auto", head_dim=16, heads=2, batch=1) -> None:
    """Compare a backend (default: the best) with the dense oracle, then print its profile."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, heads, *grid, head_dim) for _ in range(3))
    want = oracle(pattern, grid, q, k, v)
    name = best_backend(pattern, grid, backend)
    got = pg.compile(pattern, grid, backend=name)(q, k, v)
    error = (got - want).abs().max().item()
    expect(error < 1e-4, f"{name} differs from the dense oracle by {error:.2e} on {pattern!r}")
    print(f"{name} output matches the dense oracle (max abs error {error:.1e})")
    print(profile(pattern, grid=grid, head_dim=head_dim, heads=heads, batch=batch,
                  backend=name, repeats=5, warmup=1))


def cost_line(pattern, grid, head_dim=16, heads=2) -> str:
    """Symbolic pairs and FLOPs against dense attention, at this grid."""
    report = pg.cost(pattern, grid=grid, head_dim=head_dim, heads=heads)
    return (f"{pattern!r} on {'x'.join(map(str, grid))}: {report.pairs} pairs, "
            f"{report.flops} FLOPs; dense {report.dense_flops} FLOPs "
            f"({float(report.speedup):.1f}x fewer)")
