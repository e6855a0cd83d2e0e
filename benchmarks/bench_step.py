"""A training step against the forward: forward+backward / forward, the two interleaved.

For bench_cpu's workloads, on one backend, it times the forward (``torch.no_grad``) and the
step bench_cpu times (``fn(q, k, v).sum().backward()``) call by call, one after the other, and
reports each one's median and their ratio. bench_cpu times all of one then all of the other,
so a change in the machine's speed between the two (this machine's shared cores) moves its
ratio; here both see the same moments. Also the allocator's state: each step's gradients are
new memory, and the forward run between steps is what a training loop runs.

Usage:
    python benchmarks/bench_step.py [--workloads W2,W5] [--backend numba] [--repeats 21]

To compare two checkouts, run it under each (``PYTHONPATH=<root>``, with ``<root>``'s own
``backends/`` linked as ``patterngen/backends``, as ``bench_compile.py --roots`` does),
alternating.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import patterngen as pg
from bench_cpu import THREADS, WORKLOADS


def step_ratio(workload, backend: str, repeats: int) -> tuple[float, float]:
    """Median ms of the forward and of the step, timed alternately ``repeats`` times each."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(workload.batch, workload.heads, math.prod(workload.grid),
                           workload.head_dim, generator=g) for _ in range(3))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    fn = pg.compile(workload.spec, workload.grid, backend=backend)

    def forward():
        with torch.no_grad():
            fn(q, k, v)

    def step():
        fn(qg, kg, vg).sum().backward()

    for _ in range(2):
        forward()
        step()
    times = ([], [])
    for _ in range(repeats):
        for fn_, out in zip((forward, step), times):
            start = time.perf_counter()
            fn_()
            out.append(time.perf_counter() - start)
    return tuple(statistics.median(t) * 1e3 for t in times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="W2,W2-d64,W3,W4,W5",
                        help="comma-separated names of bench_cpu's workloads")
    parser.add_argument("--backend", default="numba")
    parser.add_argument("--repeats", type=int, default=21)
    args = parser.parse_args(argv)
    names = args.workloads.split(",")
    unknown = set(names) - {w.name for w in WORKLOADS}
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; valid: {[w.name for w in WORKLOADS]}")
    torch.set_num_threads(THREADS)
    import numba

    numba.set_num_threads(min(THREADS, numba.config.NUMBA_NUM_THREADS))
    print(f"{args.backend}, {THREADS} threads; medians of {args.repeats}, interleaved")
    print("workload  fwd ms  fwd+bwd ms  fwd+bwd / fwd")
    for w in WORKLOADS:
        if w.name in names:
            fwd, both = step_ratio(w, args.backend, args.repeats)
            print(f"{w.name:8}  {fwd:6.2f}  {both:10.2f}  {both / fwd:13.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
