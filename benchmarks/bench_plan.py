"""How far the planner's predictions are from measured times, on the CPU benchmark's workloads.

For each workload of ``bench_cpu.py`` and each strategy the planner can price (term by term,
or the whole pattern on numba or sdpa), prints the predicted and the measured forward time
(and forward+backward with ``--backward``), their ratio, and which strategy ``auto`` chose.
The rates are this machine's (``patterngen.calibrate``; measured once and cached, or again with
``--recalibrate``).

Run:
    python benchmarks/bench_plan.py [--backward] [--recalibrate] [--workloads W3,W4]
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

import patterngen as pg
from patterngen import calibrate

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from bench_cpu import THREADS, WORKLOADS, timed  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backward", action="store_true", help="also forward+backward")
    parser.add_argument("--recalibrate", action="store_true", help="measure the rates again")
    parser.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS))
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    rates = calibrate.rates("cpu", "float32", refresh=args.recalibrate)
    print(f"rates ({rates.source}): " + "; ".join(
        f"{name} {r.call_ms:.3g} ms/call + {r.pair_ns:.3g} ns/pair/dim, x{r.backward_factor:.2g}"
        " fwd+bwd" for name, r in rates.executors.items()))
    wanted = args.workloads.split(",")
    print("| workload | strategy | chosen | pass | predicted ms | measured ms | measured / "
          "predicted |")
    print("|---|---|---|---|---|---|---|")
    for w in WORKLOADS:
        if w.name not in wanted:
            continue
        gen = torch.Generator().manual_seed(0)
        tokens = math.prod(w.grid)
        q, k, v = (torch.randn(w.batch, w.heads, tokens, w.head_dim, generator=gen)
                   for _ in range(3))
        passes = [False, True] if args.backward else [False]
        for backward in passes:
            plan = pg.plan(w.spec, w.grid, head_dim=w.head_dim, heads=w.heads, batch=w.batch,
                           backward=backward, rates=rates)
            for strategy, predicted in plan.options.items():
                if not isinstance(predicted, float):
                    continue
                attn = pg.compile(w.spec, w.grid, backend="auto", strategy=strategy,
                                  rates=rates)
                if backward:
                    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
                    ms = timed(lambda: attn(qg, kg, vg).sum().backward(), args.repeats)
                else:
                    with torch.no_grad():
                        ms = timed(lambda: attn(q, k, v), args.repeats)
                chosen = "yes" if strategy == plan.strategy else ""
                print(f"| {w.name} | {strategy} | {chosen} | "
                      f"{'fwd+bwd' if backward else 'fwd'} | {predicted:.3g} | {ms:.3g} | "
                      f"{ms / predicted:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
