"""Layout speed and memory: patterngen's layout beside FlexAttention's ``create_block_mask``.

``create_block_mask`` evaluates the mask_mod on every (query, key) pair and block-reduces it,
so it is only run where that fits (4,096 and 16,384 tokens); patterngen's layout is also timed
on a 1,048,576-token 1-D window and a 256x256 (and 256x256x64) neighbourhood. Times are medians
of a few runs; peak memory is the traced Python/numpy peak for patterngen (tracemalloc) and the
peak RSS growth of a fresh process running ``create_block_mask`` (torch allocations are not
traced); "same" checks that both find the same non-empty tiles.

Run:
    python benchmarks/bench_layout.py            # the full table
    python benchmarks/bench_layout.py --quick    # small sizes only (seconds)
"""

from __future__ import annotations

import argparse
import resource
import statistics
import subprocess
import sys
import time
import tracemalloc

import patterngen as pg
from patterngen.layout import layout

BLOCK = 128


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def traced_peak(fn):
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_patterngen(pattern, grid, repeats, **kw):
    lay = layout(pattern, grid, block=BLOCK, **kw)
    seconds = median_time(lambda: layout(pattern, grid, block=BLOCK, **kw), repeats)
    peak = traced_peak(lambda: layout(pattern, grid, block=BLOCK, **kw))
    return seconds, peak / 2 ** 20, lay


COMPARE = [(pg.window(256, causal=True), 4096), (pg.window(256, causal=True), 16384),
           (pg.window(7), (64, 64)), (pg.window(7), (128, 128))]


def bench_create_block_mask(case: int, repeats: int):
    """Time ``create_block_mask`` on ``COMPARE[case]`` in a fresh process (clean peak RSS)."""
    out = subprocess.run([sys.executable, __file__, "--child", str(case), str(repeats)],
                         capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), float(out[1]), [int(c) for c in out[2]]


def child(case: int, repeats: int):
    from torch.nn.attention.flex_attention import create_block_mask

    from patterngen.backends.flex import make_mask_mod

    pattern, grid = COMPARE[case]
    mask_mod = make_mask_mod(pg.lower(pattern, grid))
    n = pg.as_grid(grid).tokens
    create_block_mask(mask_mod, 1, 1, 256, 256, device="cpu", BLOCK_SIZE=BLOCK)  # warm-up
    before = rss_mib()
    run = lambda: create_block_mask(mask_mod, 1, 1, n, n, device="cpu", BLOCK_SIZE=BLOCK)  # noqa
    bm = run()
    seconds = median_time(run, repeats)
    nonempty = "".join(str(int(x)) for x in (bm.to_dense()[0, 0] > 0).flatten().tolist())
    print(seconds, rss_mib() - before, nonempty)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(*args.child)

    rows = []
    for case in [0, 2] if args.quick else range(len(COMPARE)):
        pattern, grid = COMPARE[case]
        pt, pm, lay = bench_patterngen(pattern, grid, args.repeats)
        ft, fm, nonempty = bench_create_block_mask(case, max(1, args.repeats // 2))
        same = nonempty == (lay.to_dense() > 0).astype(int).ravel().tolist()
        rows.append((repr(pattern), grid, lay, pt, pm, ft, fm, same))
    large = [(pg.window(4096), 1 << 20, {}), (pg.window(4096, causal=True), 1 << 20, {}),
             (pg.window(7), (256, 256), {}),
             (pg.window(7), (256, 256), dict(order="tiled", tile=(8, 16))),
             (pg.window((3, 7, 7)), (256, 256, 64), {})]
    for pattern, grid, kw in ([] if args.quick else large):
        pt, pm, lay = bench_patterngen(pattern, grid, max(1, args.repeats // 2), **kw)
        rows.append((repr(pattern), grid, lay, pt, pm, None, None, None))

    print(f"block={BLOCK}x{BLOCK}; median of {args.repeats} runs; python {sys.version.split()[0]}")
    print()
    print("| pattern | grid | order | tiles (full/partial) | waste | patterngen ms | "
          "patterngen peak MiB | create_block_mask ms | create_block_mask RSS MiB | same |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for label, grid, lay, pt, pm, ft, fm, same in rows:
        order = lay.order + (f" {'x'.join(map(str, lay.tile))}" if lay.tile else "")
        flex = (f"{ft * 1e3:.1f} | {fm:.0f} | {'yes' if same else 'NO'}" if ft is not None
                else "- | - | -")
        print(f"| {label} | {pg.as_grid(grid)} | {order} | {lay.num_full}/{lay.num_partial} | "
              f"{lay.waste:.2f} | {pt * 1e3:.1f} | {pm:.1f} | {flex} |")


if __name__ == "__main__":
    main()
