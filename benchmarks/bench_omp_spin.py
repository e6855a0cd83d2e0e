"""How torch's idle OpenMP threads slow the numba kernels that run right after a torch op.

Times W2's forward kernel (``window(7)`` on 64x64, 4 heads, head_dim 32) alone, then right
after one small torch op followed by a pause, and the backward kernel inside
``out.sum().backward()`` against ``out.backward(ones)`` and alone (median ms). The kernels run
on torch's OpenMP team where torch uses GNU OpenMP (``patterngen.backends.numba.launch``); run it
once as is, once with ``PATTERNGEN_OPENMP=0`` (patterngen's own thread pool, which then shares
the cores with torch's spinning threads) and once more with ``OMP_WAIT_POLICY=PASSIVE`` too.

Usage:
    python benchmarks/bench_omp_spin.py [--repeats 15]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

import patterngen as pg


def median_ms(times) -> float:
    return 1e3 * statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    attn = pg.compile(pg.window(7), (64, 64), backend="numba")
    q, k, v = (torch.randn(1, 4, 4096, 32) for _ in range(3))
    arrays = [t.numpy() for t in (q, k, v)]
    scale = 32 ** -0.5
    a, b = torch.randn(4, 4096, 32), torch.randn(4, 4096, 32)
    out, lse = attn.forward_numpy(*arrays, attn.shape, scale)
    ones = torch.ones_like(q).numpy()
    attn.backward_numpy(*arrays, out, ones, lse, attn.shape, scale)

    from patterngen.backends.numba import launch

    where = "torch's OpenMP team" if launch.team() is not None else "patterngen's thread pool"
    print(f"kernels on {where}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    for pause in (None, 0.0, 0.001, 0.005):
        times = []
        for _ in range(args.repeats):
            if pause is not None:
                a.add_(b)  # one parallel torch op
                time.sleep(pause)
            t = time.perf_counter()
            attn.forward_numpy(*arrays, attn.shape, scale)
            times.append(time.perf_counter() - t)
        label = "alone" if pause is None else f"after a torch op + {1e3 * pause:.0f} ms pause"
        print(f"forward kernel {label}: {median_ms(times):.2f} ms")

    inner = []
    kernel = attn.backward_numpy

    def timed(*xs):
        t = time.perf_counter()
        result = kernel(*xs)
        inner.append(time.perf_counter() - t)
        return result

    attn.backward_numpy = timed
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    alone = []
    for _ in range(args.repeats):
        attn(qg, kg, vg).sum().backward()
        result = attn(qg, kg, vg)
        result.backward(torch.ones_like(result))
        t = time.perf_counter()
        kernel(*arrays, out, ones, lse, attn.shape, scale)
        alone.append(time.perf_counter() - t)
    print(f"backward kernel called directly: {median_ms(alone):.2f} ms; "
          f"inside out.sum().backward(): "
          f"{median_ms(inner[0::2]):.2f} ms; inside out.backward(ones): "
          f"{median_ms(inner[1::2]):.2f} ms")


if __name__ == "__main__":
    main()
