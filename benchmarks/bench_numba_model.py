"""How far the planner's price of the numba kernels is from their measured time, pattern by
pattern: windows of 3 to 65 keys, dilation 1 to 4, 1-D, 2-D and 3-D grids, stride, blocks and
unions, forward and forward+backward, one query at a time and in tiles (the lane plan the
backend picks). Prints predicted, measured (median) and measured / predicted per row, then
the spread.

The rates are this machine's (``patterngen.calibrate``), measured once and cached; the
patterns here are not the calibration's. CPU time (``--cpu``) is steadier than wall time on
shared cores at one thread.

Run:
    python benchmarks/bench_numba_model.py                  # two threads, wall time
    python benchmarks/bench_numba_model.py --threads 1 --cpu
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

import patterngen as pg
from patterngen import calibrate
from bench_plan import CLOSE, LOOSE

#: ``(name, pattern, grid)``: none of them is a calibration pattern
CASES = [
    ("w3 1d", pg.window(3), (16384,)),
    ("w17 1d", pg.window(17), (8192,)),
    ("w65 1d", pg.window(65), (4096,)),
    ("w128c 1d", pg.window(128, causal=True), (4096,)),
    ("w33 d2 1d", pg.window(33, dilation=2), (4096,)),
    ("w9 d4 1d", pg.window(9, dilation=4), (8192,)),
    ("blk64 1d", pg.block(64), (4096,)),
    ("w3 2d", pg.window(3), (96, 96)),
    ("w7 2d", pg.window(7), (64, 64)),
    ("w13 2d", pg.window(13), (48, 48)),
    ("w7 d2 2d", pg.window(7, dilation=2), (64, 64)),
    ("w5 d3 2d", pg.window(5, dilation=3), (64, 64)),
    ("w7 s2 2d", pg.window(7, stride=2), (64, 64)),
    ("blk7 2d", pg.block(7), (56, 56)),
    ("blk7 shift", pg.block(7, offset=3), (56, 56)),
    ("cc 2d", pg.criss_cross(), (48, 48)),
    ("w3x5x5 3d", pg.window((3, 5, 5)), (6, 20, 20)),
    ("w3x7x7 3d", pg.window((3, 7, 7)), (8, 24, 24)),
    ("w64+g 1d", pg.window(64) | pg.global_tokens([0, 1]), (4096,)),
    ("axis0 2d", pg.axis(0), (48, 48)),
]


def _time(fn, rounds: int, cpu: bool) -> float:
    clock = time.process_time if cpu else time.perf_counter
    fn()
    times = []
    for _ in range(rounds):
        start = clock()
        fn()
        times.append(clock() - start)
    return 1e3 * statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu", action="store_true", help="process CPU time, not wall time")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--only", default=None, help="comma-separated case names")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rates = calibrate.rates("cpu", "float32")
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads, "
          f"head_dim {args.head_dim}, {args.heads} heads; rates: {rates.source}")
    print("| pattern | lanes | pass | predicted ms | measured ms | measured / predicted |")
    print("|---|---|---|---|---|---|")
    ratios = {"fwd": [], "fwd+bwd": []}
    wanted = None if args.only is None else set(args.only.split(","))
    for name, spec, grid in CASES:
        if wanted is not None and name not in wanted:
            continue
        attn = pg.compile(spec, grid, backend="numba")
        q, k, v = (torch.randn(1, args.heads, math.prod(grid), args.head_dim)
                   for _ in range(3))
        grads = [x.clone().requires_grad_() for x in (q, k, v)]
        for backward, pass_ in ((False, "fwd"), (True, "fwd+bwd")):
            plan = pg.plan(spec, grid, head_dim=args.head_dim, heads=args.heads,
                           backward=backward, rates=rates, executors=("numba",))
            predicted = plan.options["numba"]
            if backward:
                def step():
                    attn(*grads).sum().backward()
            else:
                def step():
                    with torch.no_grad():
                        attn(q, k, v)
            ms = _time(step, args.rounds, args.cpu)
            ratios[pass_].append(ms / predicted)
            print(f"| {name} | {attn.lanes} | {pass_} | {predicted:.3g} | {ms:.3g} | "
                  f"{ms / predicted:.2f} |", flush=True)
    for pass_, got in ratios.items():
        within = ", ".join(f"{sum(lo <= r <= hi for r in got)} of {len(got)} within "
                           f"[{lo}, {hi}]" for lo, hi in (CLOSE, LOOSE))
        print(f"{pass_}: measured / predicted {min(got, default=0):.2f} .. "
              f"{max(got, default=0):.2f}; {within}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
