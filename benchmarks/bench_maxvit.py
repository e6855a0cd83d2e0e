"""MaxViT's block and grid attention: patterngen's ``auto`` against the code MaxViT runs.

MaxViT (timm's ``maxxvit.py``) alternates *block* attention (each token with the G x G tokens
of its window, ``window_partition``) and *grid* attention (each token with the G x G tokens of
its residue class modulo ``H / G``, ``grid_partition``), each followed by the reverse of its
partition. In patterngen they are ``pg.block(G)`` and ``pg.window(G, dilation=H // G)``.

The MaxViT side is written here from timm's definitions: the partition of each of q, k, v
(with the heads folded into the batch: the same data movement as patterngen's view), attention
inside each window as timm's ``Attention2d``/``AttentionCl`` computes it, either batched
matmul, softmax, matmul (``fused_attn`` off) or ``scaled_dot_product_attention`` (on), and the
reverse. Both sides take q, k, v as ``(batch, heads, H, W, head_dim)`` and return the output in
that shape; each is checked once against the other in float64 before timing. (timm partitions
``x`` once before its qkv projection and reverses once after the output projection; here the
projections are left out on both sides.)

Every configuration times its candidates interleaved, sample by sample (a sample is as many
calls as make the fastest candidate's span 2 ms, the same for all), median of the rounds;
``auto / timm`` is patterngen's time over the faster of timm's two kernels (above 1:
patterngen is slower). ``pred`` is the planner's predicted time for ``auto``'s call.

Run:
    python benchmarks/bench_maxvit.py                          # 56, 28, 14; batch 2 and 8
    python benchmarks/bench_maxvit.py --sizes 56 --batches 2 --rounds 9 --threads 1
    python benchmarks/bench_maxvit.py --threads 1 --cpu-time   # on a machine others load
    python benchmarks/bench_maxvit.py --faults                 # and the page faults per call
"""

from __future__ import annotations

import argparse
import math
import random
import resource
import statistics
import time

import torch
import torch.nn.functional as F

import patterngen as pg
from patterngen import calibrate

THREADS = 2


def window_partition(x, g: int):
    """timm's ``window_partition``: ``(B, H, W, C)`` -> ``(B * H/g * W/g, g, g, C)``, the
    window ``(a, b)`` holding the tokens ``(a * g + i, b * g + j)``."""
    b, h, w, c = x.shape
    x = x.view(b, h // g, g, w // g, g, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, g, g, c)


def window_reverse(windows, g: int, h: int, w: int):
    c = windows.shape[-1]
    x = windows.view(-1, h // g, w // g, g, g, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, h, w, c)


def grid_partition(x, g: int):
    """timm's ``grid_partition``: ``(B, H, W, C)`` -> ``(B * H/g * W/g, g, g, C)``, the
    window ``(i, j)`` holding the tokens ``(a * H/g + i, b * W/g + j)``."""
    b, h, w, c = x.shape
    x = x.view(b, g, h // g, g, w // g, c).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(-1, g, g, c)


def grid_reverse(windows, g: int, h: int, w: int):
    c = windows.shape[-1]
    x = windows.view(-1, h // g, w // g, g, g, c).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(-1, h, w, c)


PARTITIONS = {"block": (window_partition, window_reverse),
              "grid": (grid_partition, grid_reverse)}


def timm_attention(kind: str, g: int, fused: bool):
    """MaxViT's partitioned attention on ``(B, heads, H, W, d)`` q, k, v."""
    partition, reverse = PARTITIONS[kind]

    def attend(q, k, v):
        b, heads, h, w, d = q.shape
        q, k, v = (partition(t.reshape(b * heads, h, w, d), g).flatten(1, 2)
                   for t in (q, k, v))
        if fused:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * d ** -0.5) @ k.transpose(-2, -1)
            out = attn.softmax(dim=-1) @ v
        return reverse(out.view(-1, g, g, d), g, h, w).view(b, heads, h, w, d)

    return attend


def spec_of(kind: str, g: int, h: int, w: int):
    return pg.block(g) if kind == "block" else pg.window(g, dilation=(h // g, w // g))


def _check(kind, g, grid, timm_fns):
    """timm's kernels equal patterngen's dense terms in float64 (forward and the q, k, v
    gradients; default rates, so that no float64 calibration runs)."""
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randn(1, 2, *grid, 8, generator=gen, dtype=torch.float64,
                          requires_grad=True) for _ in range(3)]
    attn = pg.compile(spec_of(kind, g, *grid), grid, backend="auto", dtype="float64",
                      strategy="terms", terms="dense", rates=calibrate.Rates.default())
    want = attn(*inputs)
    dout = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(want, inputs, dout)
    for fn in timm_fns.values():
        got = fn(*inputs)
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
        for a, b in zip(torch.autograd.grad(got, inputs, dout), grads):
            torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


#: shortest time one timed sample spans: a step shorter than this runs several times per
#: sample (a 0.3 ms call timed alone moved by 10-20% from run to run on the loaded machine)
SAMPLE_S = 0.002


def minor_faults() -> int:
    """The process's minor page faults so far: pages the system mapped and zeroed on first
    touch, which the C allocator asks for again when it has returned freed memory."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved(steps: dict, rounds: int, clock=time.perf_counter, faults: dict = None) -> dict:
    """Median ms per candidate call, the candidates alternating sample by sample, by
    ``clock``; every candidate runs the same number of calls per sample, enough that the
    fastest spans :data:`SAMPLE_S`. The candidates run in a new order each round (seeded):
    a call right after another candidate's pays for the switch, and in a fixed order the
    first candidate always followed the last (MaxViT's 14x14 block attention at batch 2, two
    threads, AVX-512: patterngen's call took 26-37 us more right after one of timm's than
    after itself, of about 230; timm's matmul path 13 us more after patterngen's).
    ``faults``: filled with each candidate's median minor page faults per call."""
    fastest = math.inf
    for step in steps.values():  # warm-up: compile, plan, first allocations
        step()
        t = time.perf_counter()
        step()
        fastest = min(fastest, time.perf_counter() - t)
    calls = max(1, math.ceil(SAMPLE_S / fastest))
    times = {name: [] for name in steps}
    touched = {name: [] for name in steps}
    order, shuffle = list(steps), random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            step = steps[name]
            f, t = minor_faults(), clock()
            for _ in range(calls):
                step()
            times[name].append((clock() - t) / calls)
            touched[name].append((minor_faults() - f) / calls)
    if faults is not None:
        faults.update({name: statistics.median(n) for name, n in touched.items()})
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def run(size: int, batch: int, kind: str, backward: bool, g: int, heads: int, head_dim: int,
        rounds: int, clock=time.perf_counter) -> dict:
    """One row: each candidate's median ms, ``auto``'s plan and prediction, and each
    candidate's minor page faults per call (``faults``)."""
    grid = (size, size)
    spec = spec_of(kind, g, *grid)
    threads = torch.get_num_threads()
    attn = pg.compile(spec, grid, backend="auto", head_dim=head_dim, heads=heads,
                      batch=batch, backward=backward)
    torch.set_num_threads(threads)  # a first calibration for this thread count resets it
    timm_fns = {"timm-matmul": timm_attention(kind, g, False),
                "timm-sdpa": timm_attention(kind, g, True)}
    _check(kind, g, grid, timm_fns)
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(batch, heads, *grid, head_dim, generator=gen,
                           requires_grad=backward) for _ in range(3))

    def step_of(fn):
        def step():
            with torch.set_grad_enabled(backward):
                out = fn(q, k, v)
                if backward:
                    out.sum().backward()
        return step

    faults = {}
    ms = interleaved({"auto": step_of(attn), **{n: step_of(f) for n, f in timm_fns.items()}},
                     rounds, clock, faults)
    plan = attn.plans[-1]
    executor = plan.strategy if plan.strategy != "terms" else "+".join(
        sorted({tp.executor for tp in plan.patterns[0]}))
    return dict(ms, plan=executor, predicted=plan.predicted_ms, faults=faults)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="56,28,14")
    ap.add_argument("--batches", default="2,8")
    ap.add_argument("--kinds", default="block,grid")
    ap.add_argument("--g", type=int, default=7)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--forward-only", action="store_true")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by the process's CPU time, not the wall clock: with --threads 1 "
                         "it holds on a machine that other jobs load")
    ap.add_argument("--faults", action="store_true",
                    help="add each candidate's minor page faults per call (median): memory "
                         "the allocator returned to the system and touched again")
    args = ap.parse_args(argv)
    clock = time.process_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; G={args.g}, heads={args.heads}, "
          f"head_dim={args.head_dim}, float32, median of {args.rounds} interleaved rounds "
          f"({'CPU time' if args.cpu_time else 'wall clock'})")
    extra = " auto / matmul / sdpa faults per call |" if args.faults else ""
    print("| grid | batch | attention | pass | auto plan | auto ms (pred) | timm matmul ms "
          "| timm sdpa ms | auto / timm |" + extra)
    print("|---|---|---|---|---|---|---|---|---|" + "---|" * bool(args.faults))
    passes = [False] if args.forward_only else [False, True]
    for size in map(int, args.sizes.split(",")):
        for batch in map(int, args.batches.split(",")):
            for kind in args.kinds.split(","):
                for backward in passes:
                    r = run(size, batch, kind, backward, args.g, args.heads, args.head_dim,
                            args.rounds, clock)
                    best = min(r["timm-matmul"], r["timm-sdpa"])
                    print(f"| {size}x{size} | {batch} | {kind} | "
                          f"{'fwd+bwd' if backward else 'fwd'} | {r['plan']} | "
                          f"{r['auto']:.2f} ({r['predicted']:.2f}) | {r['timm-matmul']:.2f} | "
                          f"{r['timm-sdpa']:.2f} | {r['auto'] / best:.2f} |"
                          + (" {auto:.0f} / {timm-matmul:.0f} / {timm-sdpa:.0f} |".format(
                              **r["faults"]) if args.faults else ""), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
