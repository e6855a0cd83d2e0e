"""Compile time of the numba backend: a new pattern's first forward and first backward.

Every case runs in a fresh Python process (numba's in-process caches start empty) with its own
``PATTERNGEN_CACHE`` directory:

- ``cold``: the cache directory is empty: everything the pattern needs is compiled;
- ``warm runtime``: another pattern ran forward and backward in an earlier process on the same
  cache directory, so what patterns share (the runtime helpers) is on disk, and only this
  pattern's own kernels compile;
- ``cached``: the same pattern ran before: everything loads from disk.

``--roots`` runs the same cases on several checkouts (e.g. the code before a change, unpacked
with ``git archive``, and this one), interleaved, and reports medians. ``--demo`` also times
``patterngen demo`` from an empty cache, once per root.

Usage:
    python benchmarks/bench_compile.py [--repeats 3] [--roots /tmp/before,.] [--demo]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

#: what a case's process runs: one pattern, float32, 2 heads, head_dim 32, forward then backward
_CASE = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, patterngen as pg
torch.set_num_threads(2)
spec = eval(sys.argv[1], {"pg": pg})
grid = tuple(json.loads(sys.argv[2]))
t1 = time.perf_counter()
attn = pg.compile(spec, grid, backend="numba")
q, k, v = (torch.randn(1, 2, *grid, 32, requires_grad=True) for _ in range(3))
t2 = time.perf_counter()
out = attn(q, k, v)
t3 = time.perf_counter()
out.sum().backward()
t4 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "forward": t3 - t2, "backward": t4 - t3}))
"""

#: the pattern whose compile is timed, and the one that warms the runtime before it
NEW = ("pg.window(5, dilation=2) | pg.axis(0)", [16, 16])
OTHER = ("pg.window(3)", [12, 12])


def _env(root: Path, cache: str) -> dict:
    env = dict(os.environ, PATTERNGEN_CACHE=cache)
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    return env


def _case(root: Path, cache: str, pattern) -> dict:
    spec, grid = pattern
    done = subprocess.run([sys.executable, "-c", _CASE, spec, json.dumps(grid)],
                          env=_env(root, cache), cwd=tempfile.gettempdir(),
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"case failed under {root}:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _scenarios(root: Path) -> dict[str, dict]:
    """One run of each scenario on ``root``, each on a fresh cache directory."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        out["cold"] = _case(root, cache, NEW)
        out["cached"] = _case(root, cache, NEW)
    with tempfile.TemporaryDirectory() as cache:
        _case(root, cache, OTHER)
        out["warm runtime"] = _case(root, cache, NEW)
    return out


def _demo(root: Path) -> float:
    with tempfile.TemporaryDirectory() as cache:
        plot = Path(cache) / "demo.png"
        start = time.perf_counter()
        command = "import sys; from patterngen.cli import main; sys.exit(main(sys.argv[1:]))"
        done = subprocess.run([sys.executable, "-c", command, "demo", "--plot", str(plot)],
                              env=_env(root, cache), cwd=tempfile.gettempdir(),
                              capture_output=True, text=True, check=False)
        if done.returncode:
            raise RuntimeError(f"demo failed under {root}:\n{done.stderr}")
        return time.perf_counter() - start


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--roots", default=".",
                        help="comma-separated checkouts to compare, run interleaved")
    parser.add_argument("--demo", action="store_true", help="also time `patterngen demo`")
    parser.add_argument("--json", help="write the raw figures to this file")
    args = parser.parse_args(argv)
    roots = [Path(r).resolve() for r in args.roots.split(",")]
    runs = {str(r): [] for r in roots}
    for _ in range(args.repeats):
        for root in roots:
            runs[str(root)].append(_scenarios(root))
    demos = {str(root): _demo(root) for root in roots} if args.demo else {}

    print(f"new pattern {NEW[0]} on {NEW[1]}, float32, head_dim 32, 2 threads; "
          f"median of {args.repeats} fresh processes (s)")
    print(f"{'root':<40} {'scenario':<14} {'import':>7} {'forward':>8} {'backward':>9}")
    for root, rows in runs.items():
        for scenario in rows[0]:
            med = {key: statistics.median(r[scenario][key] for r in rows)
                   for key in ("import", "forward", "backward")}
            print(f"{root:<40} {scenario:<14} {med['import']:7.2f} {med['forward']:8.2f} "
                  f"{med['backward']:9.2f}")
    for root, seconds in demos.items():
        print(f"{root:<40} patterngen demo from an empty cache: {seconds:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "demo": demos}, indent=1))


if __name__ == "__main__":
    main()
