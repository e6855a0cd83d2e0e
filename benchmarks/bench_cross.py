"""Local cross-attention between grids of different sizes: patterngen against what a user
writes today.

Two workloads, float32, batch 1, 4 heads, head_dim 64:

- ``up4``: 4x upsampling, ``window(5)``, 64x64 queries over 16x16 keys;
- ``fpn``: an FPN level attending to the next, ``window(7)``, 32x32 queries over 64x64 keys.

Methods, each checked once against the dense float64 oracle:

- ``pg <backend>``: ``pg.compile(pattern, grid, key_grid=..., backend=...)`` for each of
  ``--backends`` (default ``auto,numba,sdpa``; ``auto`` prints the strategy it chose, its
  predicted time and the measured median over the predicted);
- ``gather``: each query's key neighbourhood gathered by an index table (``k[:, :, idx]``, the
  ``F.unfold`` of the key map read at ``c(x)``) and a batched matmul softmax: memory
  ``queries x window x head_dim`` per head;
- ``dense``: ``F.scaled_dot_product_attention`` with the materialised ``queries x keys`` mask.

Forward (under ``no_grad``) and forward+backward (``out.sum().backward()``) run interleaved, one
call of each method per round, so a busy machine slows them alike, in an order drawn afresh
each round (seeded): the method that follows dense SDPA's large scores finds q, k and v out
of cache, and in a fixed order the same method always did (FPN, one thread: whichever of
``pg auto`` and ``pg numba`` ran first took 1.07-1.10x the other's time, the same kernels);
the table gives medians
(ms), each method's ratio to the first backend's (above 1: that backend faster) and the
largest intermediate each method holds (MiB): numba's ``out`` and log-sum-exp, sdpa's scores
of its executed pairs (an upper bound: the fused kernel works in chunks).

Usage:
    python benchmarks/bench_cross.py [--rounds 15] [--threads 2] [--backends auto,numba,sdpa]
        [--workloads up4,fpn]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch
import torch.nn.functional as F

import patterngen as pg

WORKLOADS = {
    "up4": (pg.window(5), (64, 64), (16, 16)),
    "fpn": (pg.window(7), (32, 32), (64, 64)),
}
HEADS, HEAD_DIM = 4, 64


def neighbourhoods(pattern, grid, key_grid):
    """``(idx, valid)``: each query's keys as flat key indices, padded to the most keys of
    any query (``valid`` marks the real ones); from the rule's mask, computed once."""
    mask = torch.as_tensor(pg.materialize(pattern, grid, key_grid=key_grid))
    width = int(mask.sum(1).max())
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
    return order, torch.gather(mask, 1, order)


def gather_attention(q, k, v, idx, valid):
    """Attention of each query over its gathered keys: ``(B, h, Q, W, d)`` keys and values."""
    kg, vg = k[:, :, idx], v[:, :, idx]
    scores = torch.einsum("bhqd,bhqwd->bhqw", q, kg) * q.shape[-1] ** -0.5
    probs = scores.masked_fill(~valid, float("-inf")).softmax(-1)
    return torch.einsum("bhqw,bhqwd->bhqd", probs, vg)


def held_by(attn, tokens: int) -> int:
    """Bytes of the largest intermediate of a compiled pattern: sdpa's executed scores, else
    the output and log-sum-exp (float32)."""
    if attn.name == "sdpa":
        return 4 * HEADS * sum(attn.executed_pairs)
    return 4 * HEADS * tokens * (HEAD_DIM + 1)


def methods(name: str, backends: list[str]):
    """``([(method, forward, forward+backward, largest intermediate in bytes)], {method:
    compiled pattern})``."""
    pattern, grid, key_grid = WORKLOADS[name]
    tq, tk = grid[0] * grid[1], key_grid[0] * key_grid[1]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, HEADS, tq, HEAD_DIM, generator=gen)
    k, v = (torch.randn(1, HEADS, tk, HEAD_DIM, generator=gen) for _ in range(2))
    idx, valid = neighbourhoods(pattern, grid, key_grid)
    mask = torch.as_tensor(pg.materialize(pattern, grid, key_grid=key_grid))
    runs, compiled = {}, {}
    for backend in backends:
        sizes = dict(head_dim=HEAD_DIM, heads=HEADS) if backend == "auto" else {}
        attn = pg.compile(pattern, grid, key_grid=key_grid, backend=backend, **sizes)
        runs[f"pg {backend}"] = (attn, held_by(attn, tq))
        compiled[f"pg {backend}"] = attn
    runs.update({
        "gather": (lambda q, k, v: gather_attention(q, k, v, idx, valid),
                   4 * HEADS * tq * idx.shape[1] * HEAD_DIM),
        "dense": (lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                  4 * HEADS * tq * tk),
    })
    want = pg.dense_attention(q.double(), k.double(), v.double(), mask)
    out = []
    for method, (fn, held) in runs.items():
        got = fn(q, k, v)
        err = (got.double() - want).abs().max().item()
        if err > 1e-4:
            raise SystemExit(f"{name} {method}: differs from the oracle by {err:.2e}")
        grads = [t.clone().requires_grad_() for t in (q, k, v)]

        def forward(fn=fn):
            with torch.no_grad():
                fn(q, k, v)

        def training(fn=fn, grads=grads):
            fn(*grads).sum().backward()

        out.append((method, forward, training, held))
    return out, compiled


def main(rounds: int = 15, threads: int = 2, backends: str = "auto,numba,sdpa",
         workloads: str = "up4,fpn") -> None:
    torch.set_num_threads(threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{torch.backends.cpu.get_cpu_capability()}, float32, batch 1, heads {HEADS}, "
          f"head_dim {HEAD_DIM}, medians of {rounds} interleaved rounds")
    print(f"{'workload':<8} {'method':<11} {'fwd ms':>8} {'x':>6} {'fwd+bwd ms':>11} {'x':>6} "
          f"{'held MiB':>9}")
    for name in workloads.split(","):
        if name not in WORKLOADS:
            raise SystemExit(f"--workloads: {name!r} is not one of {', '.join(WORKLOADS)}")
        runs, compiled = methods(name, backends.split(","))
        first = runs[0][0]
        times = {(m, kind): [] for m, *_ in runs for kind in ("fwd", "train")}
        for _, fwd, train, _ in runs:  # warm-up: kernels, plans, first allocations
            fwd(), train()
        for r in range(rounds):
            for method, fwd, train, _ in random.Random(r).sample(runs, len(runs)):
                for kind, fn in (("fwd", fwd), ("train", train)):
                    start = time.perf_counter()
                    fn()
                    times[method, kind].append(1e3 * (time.perf_counter() - start))
        med = {key: statistics.median(v) for key, v in times.items()}
        for method, attn in compiled.items():
            if hasattr(attn, "plans"):  # auto: the strategy it planned for each call it saw
                print(f"{name} {method}: " + ", ".join(
                    f"{'fwd+bwd' if p.backward else 'fwd'} -> {p.strategy} (predicted "
                    f"{p.predicted_ms:.2f} ms, measured / predicted "
                    f"{med[method, 'train' if p.backward else 'fwd'] / p.predicted_ms:.2f})"
                    for p in attn.plans))
        for method, _, _, held in runs:
            f, t = med[method, "fwd"], med[method, "train"]
            print(f"{name:<8} {method:<11} {f:8.2f} {f / med[first, 'fwd']:6.2f} "
                  f"{t:11.2f} {t / med[first, 'train']:6.2f} {held / 2 ** 20:9.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--backends", default="auto,numba,sdpa",
                        help="comma-separated patterngen backends; ratios are to the first")
    parser.add_argument("--workloads", default="up4,fpn",
                        help=f"comma-separated, of {', '.join(WORKLOADS)}")
    args = parser.parse_args()
    main(args.rounds, args.threads, args.backends, args.workloads)
