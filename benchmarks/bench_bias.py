"""What a relative position bias table costs on the sdpa and numba backends: W2 and W3 with and
without it.

The four cases of each workload and backend (forward under ``no_grad``, forward+backward; each
without and with a per-head table that requires grad) run interleaved, one call each per round,
so a busy machine slows them alike; medians and minima over the rounds, float32, 2 torch
threads (``--threads``), and each backend's cost of the table as the ratio of the medians.
``--softcap C`` compiles every case with that softcap (its cost is then the ratio to a run
without it). bench_cpu.py has the same workloads (W2-bias, W3-bias) beside the other backends
and the dense peer, run one after the other.

Usage:
    python benchmarks/bench_bias.py [--rounds 21] [--threads 2] [--softcap C] [backend ...]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

import patterngen as pg

WORKLOADS = {"W2": (pg.window(7), (64, 64)), "W3": (pg.block(7), (56, 56))}


def cases(backends=("sdpa", "numba"), softcap=None, heads=4, head_dim=32):
    """``[(label, fn)]``: per workload and backend, forward and forward+backward, without and
    with a table."""
    out = []
    for (name, (pattern, grid)), backend in itertools.product(WORKLOADS.items(), backends):
        attn = pg.compile(pattern, grid, backend=backend, softcap=softcap)
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, heads, grid[0] * grid[1], head_dim, generator=gen)
                   for _ in range(3))
        table = 0.5 * torch.randn(heads, *(2 * r + 1 for r in attn.reach), generator=gen)
        table.requires_grad_()
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

        def forward(table=None, attn=attn, q=q, k=k, v=v):
            with torch.no_grad():
                attn(q, k, v, rel_bias=table)

        def backward(table=None, attn=attn, q=qg, k=kg, v=vg):
            attn(q, k, v, rel_bias=table).sum().backward()

        for label, fn in (("fwd", forward), ("fwd+bwd", backward)):
            out.append((f"{name} {backend} {label}", fn))
            out.append((f"{name} {backend} {label} bias", lambda fn=fn, table=table: fn(table)))
    return out


def main(rounds: int = 21, backends=("sdpa", "numba"), threads: int = 2, softcap=None) -> None:
    torch.set_num_threads(threads)
    runs = cases(backends, softcap)
    times = {label: [] for label, _ in runs}
    for _, fn in runs:  # warm-up: plans, index tensors, first-call allocations
        fn()
        fn()
    for _ in range(rounds):
        for label, fn in runs:
            start = time.perf_counter()
            fn()
            times[label].append(1e3 * (time.perf_counter() - start))
    print(f"torch {torch.__version__}, {threads} threads, softcap={softcap}, {rounds} "
          f"interleaved rounds")
    for label, ms in times.items():
        median = statistics.median(ms)
        cost = ""
        if label.endswith(" bias"):
            cost = f"   bias costs {median / statistics.median(times[label[:-5]]) - 1:+6.1%}"
        print(f"{label:28s} median {median:8.2f} ms   min {min(ms):8.2f} ms{cost}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("backends", nargs="*", default=["sdpa", "numba"])
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--softcap", type=float, default=None)
    args = parser.parse_args()
    main(args.rounds, tuple(args.backends), args.threads, args.softcap)
