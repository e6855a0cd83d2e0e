"""Sharded attention on gloo ranks of this machine: time per step and bytes moved.

For W2 (``window(7)`` on 64x64, 4 heads, head_dim 32) and W5 (``window((3, 7, 7))`` on
8x32x32), both from ``bench_cpu.py``, and W2-global (W2 with a global token, whose second rank
runs on line tables), it runs :func:`patterngen.distributed.compile` on 1 and on
2 gloo ranks over loopback (one spawn each, ``torch`` threads split evenly between the ranks),
with the local part on ``backend="auto"`` (the planner: numba kernels for windows, where the
rank's local problem is the pattern's own atoms) and on ``"sdpa"`` (line tables), and, in the
1-rank spawn, the single-process ``sdpa`` backend on the whole grid. A step's time
is the slowest rank's (a barrier before each repeat, the max all-reduced after), median of
``--repeats``; the forward+backward time includes the transposed exchange. Bytes are counted at
``all_to_all_single`` (rows times row width times element size, both directions) and set
beside the symbolic halo of ``pg.cost(..., ranks=R)``. ``--rounds`` alternates the spawns
(1, 2, 1, 2, ...) and reports the median over rounds; timings on shared cores are noisy.

``--model`` prints instead the scaling model of ``docs/distributed.md`` for 8 to 64 GPUs: the
symbolic halo of an interior rank over published link bandwidths, beside the rank's FLOPs at an
assumed attention rate. ``--reshard`` prints the bytes an axis term along the sharded axis
moves per forward step when gathered and when re-sharded, from the plan's counts (no spawn).

Usage:
    python benchmarks/bench_distributed.py [--repeats 10] [--rounds 3] [--json out.json]
    python benchmarks/bench_distributed.py --model
    python benchmarks/bench_distributed.py --reshard
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist

import patterngen as pg
from patterngen.distributed.halo import exchange_rows, split_lines
from patterngen.distributed.reshard import reshard

WORKLOADS = {
    "W2": (pg.window(7), (64, 64), 4, 32),
    "W5": (pg.window((3, 7, 7)), (8, 32, 32), 4, 32),
    # a global token in the first line: on 2 ranks the second one's local problem is not the
    # pattern's own atoms (the token's line is far away), so it runs on line tables
    "W2-global": (pg.window(7) | pg.global_tokens([(0, 0)]), (64, 64), 4, 32),
}
#: the local executors compared
LOCALS = ("auto", "sdpa")


def _timed(fn, repeats, group_max):
    times = []
    for _ in range(repeats):
        dist.barrier()
        start = time.perf_counter()
        fn()
        times.append(group_max(time.perf_counter() - start))
    return statistics.median(times)


def _worker(rank, world, init, repeats, threads, results, names):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    torch.set_num_threads(threads)
    moved = []
    real = dist.all_to_all_single

    def counted(output, input, output_split_sizes=None, input_split_sizes=None, **kw):
        moved.append((sum(input_split_sizes) + sum(output_split_sizes)) * input.shape[1]
                     * input.element_size())
        return real(output, input, output_split_sizes, input_split_sizes, **kw)

    dist.all_to_all_single = counted

    def group_max(seconds):
        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t)

    report = {}
    for name, local in ((name, local) for name in names for local in LOCALS):
        pattern, grid, heads, dim = WORKLOADS[name]
        sizes = dict(head_dim=dim, heads=heads) if local == "auto" else {}
        attn = pg.distributed.compile(pattern, grid, backend=local, **sizes)
        lo, hi = attn.shards[rank]
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, heads, *grid, dim, generator=gen)[:, :, lo:hi].contiguous()
                   .requires_grad_() for _ in range(3))

        def forward():
            with torch.no_grad():
                attn(q, k, v)

        def step():
            attn(q, k, v).sum().backward()

        forward()
        step()
        moved.clear()
        forward()
        fwd_bytes = sum(moved)
        moved.clear()
        step()
        step_bytes = sum(moved)
        row = dict(forward_ms=1e3 * _timed(forward, repeats, group_max),
                   step_ms=1e3 * _timed(step, repeats, group_max),
                   forward_bytes=fwd_bytes, step_bytes=step_bytes,
                   received_rows=attn.received_rows,
                   local=attn.local_backend + "".join(
                       f" ({'/'.join(sorted({p.strategy for p in plans}))})"
                       for plans in [attn.plans] if plans))
        if world == 1 and local == LOCALS[-1]:
            single = pg.compile(pattern, grid, backend="sdpa")
            row["single_forward_ms"] = 1e3 * _timed(
                lambda: single(q.detach(), k.detach(), v.detach()), repeats, group_max)
            row["single_step_ms"] = 1e3 * _timed(
                lambda: single(q, k, v).sum().backward(), repeats, group_max)
        report[f"{name}/{local}"] = row
    with open(os.path.join(results, f"{world}-{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


def _spawn(world, repeats, threads, names):
    with tempfile.TemporaryDirectory() as tmp:
        ctx = torch.multiprocessing.start_processes(
            _worker, args=(world, "file://" + os.path.join(tmp, "rdv"), repeats, threads, tmp,
                           names),
            nprocs=world, start_method="spawn", join=False)
        deadline = time.monotonic() + 900
        while not ctx.join(timeout=30):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"{world} ranks did not finish within 900 s")
        return [json.load(open(os.path.join(tmp, f"{world}-{r}.json"))) for r in range(world)]


def _symbolic_bytes(pattern, grid, heads, dim, world):
    """Forward halo bytes over all ranks (received; each is sent once) from the cost report."""
    halo = pg.cost(pattern, grid=grid, head_dim=dim, heads=heads, ranks=world).halo
    return sum(int(halo.subs({"rank": r}).bytes_forward) for r in range(world))


#: (name, pattern, grid, heads, head_dim) of the scaling model, bfloat16, batch 1
MODEL = [
    ("image 512x512, window 7", pg.window(7), (512, 512), 16, 64),
    ("video 64x128x128, window 3x7x7", pg.window((3, 7, 7)), (64, 128, 128), 16, 64),
    ("1-D 1M tokens, causal window 4096", pg.window(4096, causal=True), (1 << 20,), 32, 128),
]
#: bytes/s one way per GPU: NVLink 4 (H100 SXM) 900 GB/s both ways; one ConnectX-7 NDR port
#: per GPU, 400 Gb/s (docs/distributed.md cites both)
LINKS = {"NVLink": 450e9, "InfiniBand": 50e9}
#: FLOP/s assumed for a fused local-attention kernel: 40% of H100 SXM's 989 TFLOP/s bf16 dense
RATE = 0.4 * 989e12


def scaling_model():
    """Halo of an interior rank (``rank=1``) and its compute, per forward step, 8 to 64 GPUs.

    ``attn``: the attention FLOPs of the rank; ``layer``: plus the rest of a transformer block
    on its tokens, ``24 * C**2`` FLOPs per token (QKV and output projections ``8 C**2``, a 4x
    MLP ``16 C**2``; ``C = heads * head_dim``). Where the closed form's assumptions fail (a
    shard shorter than the window), the halo is the exact count.
    """
    print(f"{'workload':34} {'GPUs':>4} {'halo MB':>8} {'attn us':>8} {'layer us':>9} "
          + " ".join(f"{name + ' us':>14}" for name in LINKS)
          + f" {'comm/attn':>10} {'comm/layer':>10}")
    for name, pattern, grid, heads, dim in MODEL:
        shape = tuple(f"n{a}" for a in range(len(grid)))
        rep = pg.cost(pattern, grid=shape, head_dim=dim, heads=heads, dtype="bfloat16",
                      ranks="R")
        tokens = math.prod(grid)
        for ranks in (8, 16, 32, 64):
            at = rep.subs(**dict(zip(shape, grid)), R=ranks)
            halo = at.halo.subs({"rank": 1})
            if all(halo.assumptions):
                moved = int(halo.bytes_forward)
            else:
                rows = exchange_rows(pg.lower(pattern, grid), split_lines(grid[0], ranks))
                moved = int(rows[:, 1].sum()) * 2 * heads * dim * 2
            attn = float(at.flops) / ranks / RATE
            layer = attn + 24 * (heads * dim) ** 2 * tokens / ranks / RATE
            # within a node of 8 an interior rank's neighbours are on NVLink; beyond 8 ranks
            # the ranks at node edges wait on InfiniBand, and a step waits on the slowest
            link = LINKS["NVLink"] if ranks <= 8 else LINKS["InfiniBand"]
            print(f"{name:34} {ranks:4} {moved / 1e6:8.2f} {attn * 1e6:8.1f} {layer * 1e6:9.1f} "
                  + " ".join(f"{moved / bw * 1e6:14.1f}" for bw in LINKS.values())
                  + f" {moved / link / attn:10.2f} {moved / link / layer:10.3f}")


#: (name, pattern, grid) of the re-shard table: axis terms along the sharded axis
RESHARD = [
    ("axial 512x512", pg.axis(0), (512, 512)),
    ("criss-cross 128x128", pg.criss_cross(), (128, 128)),
    ("axial | window 7, 128x128", pg.axis(0) | pg.window(7), (128, 128)),
]


def reshard_table(heads=4, dim=32, dtype_bytes=4):
    """Forward bytes over all ranks when the axis terms are gathered and when re-sharded.

    Gathered: K and V (``2 d``) per received token. Re-sharded: the other terms' halo (``2 d``
    per token), q, k and v to the pencils (``3 d``) and the partial ``(out, lse)`` back
    (``d + 1``, float32) per transposed token. Counts from the plan (the tests check them
    against counted exchanges).
    """
    print(f"{'workload':28} {'ranks':>5} {'gather MB':>10} {'re-shard MB':>12} {'chosen':>9}")
    for name, pattern, grid in RESHARD:
        lowered = pg.lower(pattern, grid)
        for ranks in (2, 4, 8, 16):
            shards = split_lines(grid[0], ranks)
            gathered = int(exchange_rows(lowered, shards).sum()) * 2 * dim
            rs = reshard(lowered, shards)
            if rs is None:  # 2 ranks: a tie per head_dim, and the lse column tips it
                print(f"{name:28} {ranks:5} {gathered * heads * dtype_bytes / 1e6:10.2f} "
                      f"{'-':>12} {'gather':>9}")
                continue
            moved = (int(exchange_rows(lowered, shards, rs.terms).sum()) * 2 * dim
                     + int(rs.pencil.sum()) * 3 * dim + int(rs.returned.sum()) * (dim + 1))
            print(f"{name:28} {ranks:5} {gathered * heads * dtype_bytes / 1e6:10.2f} "
                  f"{moved * heads * dtype_bytes / 1e6:12.2f} {'re-shard':>9}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in all")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="comma-separated names of WORKLOADS to run")
    parser.add_argument("--json")
    parser.add_argument("--model", action="store_true", help="print the scaling model only")
    parser.add_argument("--reshard", action="store_true",
                        help="print gathered against re-sharded bytes only")
    args = parser.parse_args()
    if args.model:
        scaling_model()
        return
    if args.reshard:
        reshard_table()
        return
    names = args.workloads.split(",")
    unknown = set(names) - set(WORKLOADS)
    if unknown:
        parser.error(f"--workloads: {sorted(unknown)} unknown; expected names of "
                     f"{list(WORKLOADS)}")
    runs = {1: [], 2: []}
    for _ in range(args.rounds):
        for world in (1, 2):
            runs[world].append(_spawn(world, args.repeats, max(1, args.threads // world),
                                      names))
    out = {}
    print(f"{'workload':8} {'ranks':>5} {'local':>13} {'fwd ms':>8} {'fwd+bwd ms':>11} "
          f"{'bytes fwd':>10} {'bytes fwd+bwd':>13} {'symbolic fwd':>12}")
    for name in names:
        pattern, grid, heads, dim = WORKLOADS[name]
        for world in (1, 2):
            for local in LOCALS:
                key = f"{name}/{local}"
                rows = [r[0][key] for r in runs[world]]
                med = {k: statistics.median(row[k] for row in rows) for k in rows[0]
                       if k != "local"}
                # the executor each rank ran (auto falls back to sdpa where it must)
                ran = "+".join(sorted({rank[key]["local"] for run in runs[world]
                                       for rank in run}))
                counted = [sum(rank[key]["forward_bytes"] for rank in run) // 2
                           for run in runs[world]]
                symbolic = _symbolic_bytes(pattern, grid, heads, dim, world)
                out[f"{name}/{world}/{local}"] = dict(med, local=ran,
                                                      bytes_forward_total=counted[0],
                                                      symbolic_forward_total=symbolic)
                print(f"{name:8} {world:5} {ran:>13} {med['forward_ms']:8.2f} "
                      f"{med['step_ms']:11.2f} {counted[0]:10d} {2 * counted[0]:13d} "
                      f"{symbolic:12d}")
            if world == 1:
                med = {k: statistics.median(r[0][f"{name}/{LOCALS[-1]}"][k]
                                            for r in runs[world])
                       for k in ("single_forward_ms", "single_step_ms")}
                print(f"{name:8} {1:5} {'plain sdpa':>13} {med['single_forward_ms']:8.2f} "
                      f"{med['single_step_ms']:11.2f}   (one process, no process group code)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
