"""GPU benchmark: patterngen's sdpa and flex backends beside the kernels a user would pick.

Workloads (bf16 on CUDA):

- W1: 1-D causal sliding window of 2,048 keys on 32,768 tokens;
- W2: 7x7 neighbourhood (``pg.window(7)``) on 128x128, head_dim 64;
- W3: Swin 7x7 windows (``pg.block(7)``) on 56x56 and 112x112;
- W5: 3-D neighbourhood ``pg.window((3, 7, 7))`` on 16x64x64;
- W2-s2, W2-k8, W2-k8-s8: NATTEN's stride on W2's grid: a 7x7 window shared by 2x2 query
  groups, and an 8x8 window without and with stride 8 (blocked attention);
- W4-128, axial-128: criss-cross (CCNet) and axial attention along axis 0 on 128x128.

Implementations: ``pg-auto`` (the planner's choice: dense terms on the fused kernels),
``pg-sdpa`` and ``pg-flex`` (patterngen), ``flex+cbm`` (FlexAttention with a
hand-written mask_mod and ``create_block_mask``), ``dense-sdpa`` (full attention, no mask: the
fused flash kernel on every pair) and ``natten`` when NATTEN is importable. Each is timed
forward and forward+backward (median of CUDA-event timings after warm-up, compile included in
warm-up); TFLOP/s count *attended* FLOPs only: ``4 * head_dim`` per attended pair per head
forward, 3.5x that forward+backward (FlashAttention's convention), so dense attention is
charged for the pairs the pattern needs, not the ones it computes. Outputs are compared once
against ``pg-sdpa`` (max abs difference). The run stops adding work after ``--budget`` seconds
(default 330, so the whole run stays under 6 minutes) and says what it skipped.

Run:
    python benchmarks/gpu_bench.py               # on a CUDA machine; JSON to $OUT if set
    python benchmarks/gpu_bench.py --dry-run     # tiny sizes on CPU, float32 (seconds)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

import patterngen as pg


def sliding_causal(window):
    def mask_mod(b, h, q, k):
        return (q >= k) & (q - k < window)
    return mask_mod


def neighbourhood(shape, sizes, group=None):
    """NATTEN's clamped window, written as attention-gym writes it; with ``group`` (NATTEN's
    stride), a group's queries take the window of its centre query (the right one of two),
    the last, short group that of the axis' last position, as NATTEN's flex mask_mod does."""
    strides = [math.prod(shape[a + 1:]) for a in range(len(shape))]
    group = group or (1,) * len(shape)

    def mask_mod(b, h, q, k):
        out = None
        for s, n, size, g in zip(strides, shape, sizes, group):
            qa, ka = (q // s) % n, (k // s) % n
            leader = torch.clamp((qa // g) * g + g // 2, max=n - 1)
            left, right = size // 2, size - 1 - size // 2
            centre = torch.clamp(leader, left, n - 1 - right)
            part = (ka >= centre - left) & (ka <= centre + right)
            out = part if out is None else out & part
        return out
    return mask_mod


def windows(shape, size):
    strides = [math.prod(shape[a + 1:]) for a in range(len(shape))]

    def mask_mod(b, h, q, k):
        out = None
        for s, n in zip(strides, shape):
            part = ((q // s) % n) // size == ((k // s) % n) // size
            out = part if out is None else out & part
        return out
    return mask_mod


def criss_cross(shape, column_only=False):
    """CCNet's row and column (or, with ``column_only``, axial attention along axis 0)."""
    w = shape[1]

    def mask_mod(b, h, q, k):
        column = (q % w) == (k % w)
        return column if column_only else column | ((q // w) == (k // w))
    return mask_mod


def workloads(tiny: bool) -> list[dict]:
    if tiny:
        return [
            dict(name="W1", pattern=pg.window(64, causal=True), grid=(512,), batch=1, heads=2,
                 head_dim=16, mask_mod=sliding_causal(64)),
            dict(name="W2", pattern=pg.window(7), grid=(16, 16), batch=1, heads=2, head_dim=16,
                 mask_mod=neighbourhood((16, 16), (7, 7))),
            dict(name="W3-14", pattern=pg.block(7), grid=(14, 14), batch=2, heads=2,
                 head_dim=16, mask_mod=windows((14, 14), 7)),
            dict(name="W5", pattern=pg.window((3, 3, 3)), grid=(4, 8, 8), batch=1, heads=2,
                 head_dim=16, mask_mod=neighbourhood((4, 8, 8), (3, 3, 3))),
            dict(name="W2-s2", pattern=pg.window(7, stride=2), grid=(16, 16), batch=1,
                 heads=2, head_dim=16, mask_mod=neighbourhood((16, 16), (7, 7), (2, 2))),
            dict(name="W2-k8-s8", pattern=pg.window(8, stride=8), grid=(16, 16), batch=1,
                 heads=2, head_dim=16, mask_mod=neighbourhood((16, 16), (8, 8), (8, 8))),
            dict(name="W4", pattern=pg.criss_cross(), grid=(16, 16), batch=1, heads=2,
                 head_dim=16, mask_mod=criss_cross((16, 16))),
            dict(name="axial", pattern=pg.axis(0), grid=(16, 16), batch=1, heads=2,
                 head_dim=16, mask_mod=criss_cross((16, 16), column_only=True)),
        ]
    return [
        dict(name="W1", pattern=pg.window(2048, causal=True), grid=(32768,), batch=1, heads=16,
             head_dim=64, mask_mod=sliding_causal(2048)),
        dict(name="W2", pattern=pg.window(7), grid=(128, 128), batch=4, heads=8, head_dim=64,
             mask_mod=neighbourhood((128, 128), (7, 7))),
        dict(name="W3-56", pattern=pg.block(7), grid=(56, 56), batch=32, heads=4, head_dim=32,
             mask_mod=windows((56, 56), 7)),
        dict(name="W3-112", pattern=pg.block(7), grid=(112, 112), batch=8, heads=4,
             head_dim=32, mask_mod=windows((112, 112), 7)),
        dict(name="W5", pattern=pg.window((3, 7, 7)), grid=(16, 64, 64), batch=1, heads=8,
             head_dim=64, mask_mod=neighbourhood((16, 64, 64), (3, 7, 7))),
        dict(name="W2-s2", pattern=pg.window(7, stride=2), grid=(128, 128), batch=4, heads=8,
             head_dim=64, mask_mod=neighbourhood((128, 128), (7, 7), (2, 2))),
        dict(name="W2-k8", pattern=pg.window(8), grid=(128, 128), batch=4, heads=8,
             head_dim=64, mask_mod=neighbourhood((128, 128), (8, 8))),
        dict(name="W2-k8-s8", pattern=pg.window(8, stride=8), grid=(128, 128), batch=4,
             heads=8, head_dim=64, mask_mod=neighbourhood((128, 128), (8, 8), (8, 8))),
        # row-major, criss-cross's and the column's block masks are fully dense for
        # FlexAttention; the term-wise plan runs them as batches of 128-token problems
        dict(name="W4-128", pattern=pg.criss_cross(), grid=(128, 128), batch=4, heads=8,
             head_dim=64, mask_mod=criss_cross((128, 128))),
        dict(name="axial-128", pattern=pg.axis(0), grid=(128, 128), batch=4, heads=8,
             head_dim=64, mask_mod=criss_cross((128, 128), column_only=True)),
    ]


class Timer:
    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn, repeats):
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t) * 1e3)
        return statistics.median(times)


def build(impl: str, wl: dict, device, dtype, compile_flex: bool):
    """``(fn, build_ms, note)``; ``fn`` is None when the implementation cannot run here."""
    n = math.prod(wl["grid"])
    t = time.perf_counter()
    dname = str(dtype).split(".")[-1]
    if impl == "pg-sdpa":
        attn = pg.compile(wl["pattern"], wl["grid"], backend="sdpa", device=device.type,
                          dtype=dname)
        note = f"block {attn.layout.block} {attn.layout.order}"
        return attn, (time.perf_counter() - t) * 1e3, note
    if impl == "pg-auto":
        attn = pg.compile(wl["pattern"], wl["grid"], backend="auto", device=device.type,
                          dtype=dname, head_dim=wl["head_dim"], heads=wl["heads"],
                          batch=wl["batch"])
        return attn, (time.perf_counter() - t) * 1e3, f"plan {attn.plan.strategy}"
    if impl == "pg-flex":
        attn = pg.compile(wl["pattern"], wl["grid"], backend="flex", device=device.type,
                          dtype=dname, order="auto", compile=compile_flex)
        attn.block_mask_for(wl["heads"], device)
        return attn, (time.perf_counter() - t) * 1e3, f"order {attn.layout.order}"
    if impl == "flex+cbm":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        # eager create_block_mask materialises tokens^2 values: compile it for big grids, as
        # FlexAttention's docs advise (the compile is then part of the build time)
        big = n > 16384 and compile_flex
        cbm = torch.compile(create_block_mask) if big else create_block_mask
        bm = cbm(wl["mask_mod"], None, None, n, n, device=device)
        fa = torch.compile(flex_attention) if compile_flex else flex_attention
        return ((lambda q, k, v: fa(q, k, v, block_mask=bm)), (time.perf_counter() - t) * 1e3,
                "compiled create_block_mask" if big else "")
    if impl == "dense-sdpa":
        return ((lambda q, k, v: F.scaled_dot_product_attention(q, k, v)), 0.0,
                "full attention: every pair, a different output")
    if impl == "natten":
        try:
            from natten import functional as nf
        except ImportError as e:
            return None, 0.0, f"not importable ({e.__class__.__name__})"
        fn = {1: getattr(nf, "na1d", None), 2: getattr(nf, "na2d", None),
              3: getattr(nf, "na3d", None)}[len(wl["grid"])]
        pattern = wl["pattern"]
        if fn is None or not isinstance(pattern, pg.spec.Window):
            return None, 0.0, "no matching NATTEN op"
        kernel = pattern.size if isinstance(pattern.size, tuple) else (pattern.size,) * len(
            wl["grid"])
        causal = pattern.causal if isinstance(pattern.causal, tuple) else (pattern.causal,) * len(
            wl["grid"])
        # older NATTEN (before 0.20) has no stride argument: pass it only when it is used
        extra = {} if pattern.stride == 1 else dict(stride=pattern.stride)
        b, h, d = wl["batch"], wl["heads"], wl["head_dim"]

        def run(q, k, v):  # NATTEN takes (batch, *grid, heads, dim)
            def heads_last(x):
                return x.view(b, h, *wl["grid"], d).movedim(1, -2)
            out = fn(heads_last(q), heads_last(k), heads_last(v),
                     kernel_size=kernel if len(kernel) > 1 else kernel[0],
                     is_causal=causal if len(causal) > 1 else causal[0], **extra)
            return out.movedim(-2, 1).reshape(b, h, -1, d)
        return run, 0.0, "heads-last transposes included"
    raise ValueError(impl)


IMPLS = ("pg-auto", "pg-sdpa", "pg-flex", "flex+cbm", "dense-sdpa", "natten")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU in float32")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds of benchmarking")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--compile", action="store_true",
                        help="compile FlexAttention in --dry-run too (slow on CPU)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        sys.exit("gpu_bench.py needs a CUDA device; use --dry-run for a CPU smoke run.")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    compile_flex = cuda or args.compile
    if not compile_flex:  # eager FlexAttention is expected in a smoke run
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch")
    timer = Timer(device)
    start = time.perf_counter()
    rows, skipped = [], []
    for wl in workloads(tiny=args.dry_run):
        n = math.prod(wl["grid"])
        b, h, d = wl["batch"], wl["heads"], wl["head_dim"]
        pairs = pg.lower(wl["pattern"], wl["grid"]).pairs()
        flops = 4 * d * pairs * h * b
        gen = torch.Generator(device=device).manual_seed(0)
        q, k, v = (torch.randn(b, h, n, d, device=device, dtype=dtype, generator=gen)
                   for _ in range(3))
        grad = torch.randn(b, h, n, d, device=device, dtype=dtype, generator=gen)
        reference = None
        for impl in IMPLS:
            if time.perf_counter() - start > args.budget:
                skipped.append(f"{wl['name']}/{impl}")
                continue
            row = dict(workload=wl["name"], impl=impl, grid=list(wl["grid"]), tokens=n,
                       batch=b, heads=h, head_dim=d, attended_pairs=pairs)
            try:
                fn, build_ms, note = build(impl, wl, device, dtype, compile_flex)
                row.update(build_ms=build_ms, note=note)
                if fn is None:
                    rows.append(row)
                    continue
                with torch.no_grad():
                    out = fn(q, k, v)
                    if reference is None:
                        reference = out.float()
                    row["max_abs_diff"] = float((out.float() - reference).abs().max())
                    timer(lambda: fn(q, k, v), 2)  # warm-up, compiles included
                    fwd = timer(lambda: fn(q, k, v), args.repeats)
                row.update(fwd_ms=fwd, fwd_tflops=flops / fwd / 1e9)
                if impl in ("pg-flex", "flex+cbm") and not cuda:
                    row["note"] = (note + "; " if note else "") + "no CPU backward"
                else:
                    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))

                    def step():
                        fn(qg, kg, vg).backward(grad)
                    timer(step, 2)
                    both = timer(step, max(3, args.repeats // 2))
                    row.update(fwdbwd_ms=both, fwdbwd_tflops=3.5 * flops / both / 1e9)
            except Exception as e:  # one failing implementation must not stop the table
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
            rows.append(row)
            if cuda:
                torch.cuda.empty_cache()

    env = dict(torch=torch.__version__, device=torch.cuda.get_device_name() if cuda else "cpu",
               dtype=str(dtype), seconds=round(time.perf_counter() - start, 1), skipped=skipped)
    print(f"# patterngen GPU benchmark: {env['device']}, torch {env['torch']}, {env['dtype']}, "
          f"{env['seconds']} s")
    print()
    print("| workload | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | build ms | "
          "max abs diff | note |")
    print("|---|---|---|---|---|---|---|---|---|")

    def fmt(row, key, spec):
        return format(row[key], spec) if key in row else "-"
    for r in rows:
        note = r.get("error") or r.get("note", "")
        print(f"| {r['workload']} | {r['impl']} | {fmt(r, 'fwd_ms', '.3f')} | "
              f"{fmt(r, 'fwd_tflops', '.3g')} | {fmt(r, 'fwdbwd_ms', '.3f')} | "
              f"{fmt(r, 'fwdbwd_tflops', '.3g')} | {fmt(r, 'build_ms', '.1f')} | "
              f"{fmt(r, 'max_abs_diff', '.2e')} | {note} |")
    if skipped:
        print(f"\nskipped (over the {args.budget:.0f} s budget): {', '.join(skipped)}")
    out_dir = os.environ.get("OUT")
    if out_dir:
        with open(os.path.join(out_dir, "gpu_bench.json"), "w") as f:
            json.dump(dict(env=env, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
