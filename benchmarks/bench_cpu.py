"""CPU benchmark: patterngen's numba backend against the attention a user would otherwise pick.

In one run, on the same float32 inputs, with torch on 2 threads, it times (median after
warm-up) patterngen ``numba``; patterngen ``sdpa`` and ``flex`` when they are registered and
import; dense ``scaled_dot_product_attention`` with the materialised boolean mask;
FlexAttention compiled on the CPU (``torch.compile(flex_attention)`` with ``create_block_mask``,
block sizes 64 and 128, the best reported and the mask-building time apart; forward only); and
the hand-written peers: Swin's partition into windows for W3 (with matmul and softmax, and
with one SDPA call on the windows), CCNet's row/column scores with one joint softmax for W4.
W2-s2 and W2-k8-s8 are NATTEN-strided windows (stride 2; stride = size, blocked), beside W2 and
the same 8x8 window without stride (W2-k8).
W2-bias and W3-bias add a relative position bias table (``rel_bias``, per head) to W2 and W3;
their dense peer adds the table gathered to tokens x tokens to the mask. Every method is
checked once against the dense oracle. Rates are
GFLOP/s on attended FLOPs (4 * head_dim per attended pair and head), beside the machine's
float32 matmul rate measured here.

Usage:
    python benchmarks/bench_cpu.py [--quick] [--workloads W1,W2] [--backward] [--json out.json]
                                   [--omp-passive]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import patterngen as pg
from patterngen import backends
from patterngen.ir import torch_ops

THREADS = 2


@dataclass(frozen=True)
class Workload:
    name: str
    spec: pg.Pattern
    grid: tuple
    heads: int
    head_dim: int
    batch: int = 1
    peer: str | None = None
    bias: bool = False


WORKLOADS = [
    Workload("W1", pg.window(256, causal=True), (8192,), 8, 64),
    Workload("W2", pg.window(7), (64, 64), 4, 32),
    Workload("W2-d64", pg.window(7), (64, 64), 4, 64),
    Workload("W3", pg.block(7), (56, 56), 4, 32, peer="swin"),
    Workload("W4", pg.criss_cross(), (64, 64), 4, 32, peer="ccnet"),
    Workload("W5", pg.window((3, 7, 7)), (8, 32, 32), 4, 32),
    Workload("W2-bias", pg.window(7), (64, 64), 4, 32, bias=True),
    # NATTEN's stride: groups of 2x2 queries share a 7x7 window; stride = size is blocked
    # attention (8x8 tiles), beside the same 8x8 window without stride
    Workload("W2-s2", pg.window(7, stride=2), (64, 64), 4, 32),
    Workload("W2-k8", pg.window(8), (64, 64), 4, 32),
    Workload("W2-k8-s8", pg.window(8, stride=8), (64, 64), 4, 32),
    Workload("W3-bias", pg.block(7), (56, 56), 4, 32, bias=True),
]


def timed(fn, repeats: int, warmup: int = 1, budget_s: float = 20.0) -> float:
    """Median wall time of ``fn()`` in ms; fewer repeats when one call is slow."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        if len(times) >= 3 and time.perf_counter() - start > budget_s:
            break
    return 1e3 * statistics.median(times)


def matmul_gflops(repeats: int) -> float:
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    ms = timed(lambda: a @ b, repeats, warmup=2)
    return 2 * n ** 3 / ms / 1e6


# --------------------------------------------------------------------------------------------
# peers


def swin_attention(q, k, v, grid, window, fused=False):
    """Swin W-MSA: partition into ``window x window`` tiles, batched matmul softmax (or, with
    ``fused``, one ``scaled_dot_product_attention`` call on the windows), merge."""
    b, h, _, d = q.shape
    hh, ww = grid
    nh, nw = hh // window, ww // window

    def part(x):
        x = x.reshape(b, h, nh, window, nw, window, d).permute(0, 1, 2, 4, 3, 5, 6)
        return x.reshape(b, h, nh * nw, window * window, d)

    qw, kw, vw = part(q), part(k), part(v)
    if fused:
        out = F.scaled_dot_product_attention(qw, kw, vw)
    else:
        out = torch.softmax((qw * d ** -0.5) @ kw.transpose(-1, -2), dim=-1) @ vw
    out = out.reshape(b, h, nh, nw, window, window, d).permute(0, 1, 2, 4, 3, 5, 6)
    return out.reshape(b, h, hh * ww, d)


def ccnet_attention(q, k, v, grid):
    """CCNet criss-cross: column and row scores, the centre once, one joint softmax."""
    b, h, _, d = q.shape
    hh, ww = grid
    q4, k4, v4 = (x.reshape(b, h, hh, ww, d) * (d ** -0.5 if x is q else 1) for x in (q, k, v))
    e_col = torch.einsum("bhiwd,bhjwd->bhiwj", q4, k4)  # query (i, w) with key (j, w)
    e_col = e_col.masked_fill(torch.eye(hh, dtype=torch.bool)[:, None, :], float("-inf"))
    e_row = torch.einsum("bhiwd,bhivd->bhiwv", q4, k4)  # query (i, w) with key (i, v)
    att = torch.softmax(torch.cat([e_col, e_row], dim=-1), dim=-1)
    a_col, a_row = att[..., :hh], att[..., hh:]
    out = torch.einsum("bhiwj,bhjwd->bhiwd", a_col, v4) + torch.einsum("bhiwv,bhivd->bhiwd",
                                                                       a_row, v4)
    return out.reshape(b, h, hh * ww, d)


def mask_mod_for(lowered):
    """FlexAttention ``mask_mod`` from the IR's terms (flat indices decoded row-major)."""
    ops, shape = torch_ops(), lowered.grid.shape

    def coords(idx):
        out = []
        for n in reversed(shape):
            out.append(idx % n)
            idx = idx // n
        return tuple(reversed(out))

    def mask_mod(b, h, q_idx, kv_idx):
        qc, kc = coords(q_idx), coords(kv_idx)
        hit = None
        for term in lowered.terms:
            t = term.contains(qc, kc, shape, ops)
            hit = t if hit is None else hit | t
        return hit

    return mask_mod


# --------------------------------------------------------------------------------------------
# one workload


def run_workload(w: Workload, args) -> list[dict]:
    lowered = pg.lower(w.spec, w.grid)
    tokens = math.prod(w.grid)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(w.batch, w.heads, tokens, w.head_dim, generator=gen)
               for _ in range(3))
    flops = 4 * w.head_dim * lowered.pairs() * w.heads * w.batch
    repeats = 3 if args.quick else 9

    mask = torch.from_numpy(pg.materialize(w.spec, w.grid)) if tokens <= 8192 else None
    bias_table = None
    if w.bias:  # values large enough for the oracle check to see a missing bias
        reach = pg.bias.reach(lowered)
        bias_table = (0.5 * torch.randn(w.heads, *(2 * r + 1 for r in reach), generator=gen)
                      ).requires_grad_()
    ref = None
    if mask is not None and tokens <= 4096:
        table64 = None if bias_table is None else bias_table.double()
        ref = pg.dense_attention(q.double(), k.double(), v.double(), mask, grid=w.grid,
                                 rel_bias=table64).float()
    elif mask is not None:  # too large for the float64 oracle: the fused dense kernel
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    methods = {}
    for name in ("auto", "numba", "sdpa", "flex"):  # auto: the planner's choice per call
        try:
            methods[f"pg {name}"] = _pg_method(name, w, lowered)
            if bias_table is not None:
                attn = methods[f"pg {name}"]
                methods[f"pg {name}"] = lambda q, k, v, a=attn: a(q, k, v, rel_bias=bias_table)
        except Exception as e:  # a backend another engineer is still writing
            methods[f"pg {name}"] = f"n/a ({type(e).__name__}: {str(e)[:60]})"
    if mask is not None and bias_table is not None:
        methods["dense SDPA + mask + bias"] = _dense_bias_peer(w, mask, bias_table)
    elif mask is not None:
        methods["dense SDPA + mask"] = lambda q, k, v: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask)
    else:
        methods["dense SDPA + mask"] = "n/a (mask too large)"
    if w.peer == "swin":
        methods["Swin partition"] = lambda q, k, v: swin_attention(q, k, v, w.grid, 7)
        methods["Swin partition + SDPA"] = lambda q, k, v: swin_attention(q, k, v, w.grid, 7,
                                                                         fused=True)
    if w.peer == "ccnet":
        methods["CCNet"] = lambda q, k, v: ccnet_attention(q, k, v, w.grid)

    rows = []
    for label, fn in methods.items():
        rows.append(_measure(label, fn, q, k, v, ref, flops, repeats, args.backward))
        if getattr(fn, "lanes", None) and "note" not in rows[-1]:
            rows[-1]["note"] = f"{fn.lanes} lanes"
        if getattr(fn, "plans", None) and "note" not in rows[-1]:
            rows[-1]["note"] = "plans: " + ", ".join(
                f"{'fwd+bwd' if p.backward else 'fwd'} {p.strategy}" for p in fn.plans)
    if bias_table is None:  # its mask_mod has no score_mod for a table
        rows.append(_measure_flex(w, lowered, q, k, v, ref, flops, repeats, args))
    for r in rows:
        r["workload"], r["flops"] = w.name, flops
    print(table(rows, args.peak, args.backward), file=sys.stderr)
    return rows


def _pg_method(name, w, lowered):
    cls = backends.get_backend(name)
    reasons = cls.not_supported_reasons(lowered, "cpu", "float32")
    if reasons:
        raise RuntimeError("; ".join(reasons))
    return pg.compile(w.spec, w.grid, backend=name)


def _dense_bias_peer(w, mask, table):
    """Dense SDPA whose float mask is the table gathered to (heads, tokens, tokens) each call
    (the index built once), -inf outside the pattern: what a user writes without patterngen."""
    reach = pg.bias.reach(pg.lower(w.spec, w.grid))
    tokens = torch.arange(math.prod(w.grid))
    coords = pg.bias.coordinates(tokens, w.grid)
    index = pg.bias.offset_index([c[:, None] for c in coords], [c[None, :] for c in coords],
                                 reach, torch_ops())
    outside = ~mask

    def attention(q, k, v):
        bias = table.reshape(table.shape[0], -1)[:, index].masked_fill(outside, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    return attention


def _measure(label, fn, q, k, v, ref, flops, repeats, backward) -> dict:
    row = {"method": label}
    if isinstance(fn, str):
        row["note"] = fn
        return row
    try:
        with torch.no_grad():
            out = fn(q, k, v)
        if ref is not None:
            err = (out - ref).abs().max().item()
            if err > 1e-3:
                raise AssertionError(f"differs from the dense oracle by {err:.2e}")
        with torch.no_grad():
            row["ms"] = timed(lambda: fn(q, k, v), repeats)
    except Exception as e:
        row["note"] = f"failed: {type(e).__name__}: {str(e)[:80]}"
        traceback.print_exc(file=sys.stderr)
        return row
    if backward:
        qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

        def step():
            fn(qg, kg, vg).sum().backward()

        try:
            row["ms_fwd_bwd"] = timed(step, repeats)
        except Exception as e:
            row["note"] = f"no backward: {type(e).__name__}: {str(e)[:60]}"
    return row


def _measure_flex(w, lowered, q, k, v, ref, flops, repeats, args) -> dict:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    row = {"method": "FlexAttention compiled"}
    tokens = q.shape[2]
    mask_mod = mask_mod_for(lowered)
    compiled = torch.compile(flex_attention)
    best = None
    for block in (64, 128):
        try:
            t = time.perf_counter()
            block_mask = create_block_mask(mask_mod, None, None, tokens, tokens, device="cpu",
                                           BLOCK_SIZE=block)
            build_ms = 1e3 * (time.perf_counter() - t)
            with torch.no_grad():
                out = compiled(q, k, v, block_mask=block_mask)
                if ref is not None:
                    err = (out - ref).abs().max().item()
                    if err > 1e-3:
                        raise AssertionError(f"differs from the dense oracle by {err:.2e}")
                ms = timed(lambda: compiled(q, k, v, block_mask=block_mask), repeats)
            if best is None or ms < best[0]:
                best = (ms, block, build_ms)
        except Exception as e:
            row["note"] = f"block {block} failed: {type(e).__name__}: {str(e)[:60]}"
            traceback.print_exc(file=sys.stderr)
    if best:
        row["ms"], row["block"], row["mask_ms"] = best
        row["note"] = f"block {best[1]}, mask build {best[2]:.0f} ms; forward only"
    return row


# --------------------------------------------------------------------------------------------
# report


def flops_rate(row: dict) -> float:
    return row["flops"] / row["ms"] / 1e6


def table(rows: list[dict], peak: float, backward: bool) -> str:
    head = ["workload", "method", "fwd ms", "ms / numba ms", "GFLOP/s", "% matmul"]
    if backward:
        head += ["fwd+bwd ms", "fwd+bwd / fwd"]
    head.append("note")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    numba_ms = {r["workload"]: r.get("ms") for r in rows if r["method"] == "pg numba"}
    for r in rows:
        ms, base = r.get("ms"), numba_ms.get(r["workload"])
        cells = [r["workload"], r["method"],
                 f"{ms:.2f}" if ms else "n/a",
                 f"{ms / base:.2f}x" if ms and base else "n/a",
                 f"{flops_rate(r):.1f}" if ms else "n/a",
                 f"{100 * flops_rate(r) / peak:.0f}%" if ms else "n/a"]
        if backward:
            fb = r.get("ms_fwd_bwd")
            cells += [f"{fb:.2f}" if fb else "n/a", f"{fb / ms:.2f}" if fb and ms else "n/a"]
        cells.append(r.get("note", ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 9")
    parser.add_argument("--workloads", default=",".join(w.name for w in WORKLOADS),
                        help="comma-separated names, e.g. W1,W2")
    parser.add_argument("--backward", action="store_true", help="also time forward+backward")
    parser.add_argument("--json", help="write the rows and machine figures to this file")
    parser.add_argument("--omp-passive", action="store_true",
                        help="rerun with OMP_WAIT_POLICY=PASSIVE: torch's idle OpenMP threads "
                             "then sleep instead of spinning beside the numba threads")
    args = parser.parse_args(argv)
    if args.omp_passive and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        # read once, when torch loads its OpenMP runtime: only a new process can change it
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})

    torch.set_num_threads(THREADS)
    import numba

    numba.set_num_threads(min(THREADS, numba.config.NUMBA_NUM_THREADS))
    wanted = args.workloads.split(",")
    unknown = set(wanted) - {w.name for w in WORKLOADS}
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; valid: {[w.name for w in WORKLOADS]}")

    peak = args.peak = matmul_gflops(3 if args.quick else 9)
    rows = []
    for w in WORKLOADS:
        if w.name in wanted:
            rows += run_workload(w, args)
    print(f"torch {torch.__version__}, numba {numba.__version__}, {THREADS} threads, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
          f"float32 matmul (2048^3): {peak:.1f} GFLOP/s\n")
    print(table(rows, peak, args.backward))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"matmul_gflops": peak, "threads": THREADS, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
