"""Compile time of the numba backend: a new pattern's first forward and first backward.

Every case runs in a fresh Python process (numba's in-process caches start empty) with its own
``PATTERNGEN_CACHE`` directory:

- ``cold``: the cache directory is empty: everything the pattern needs is compiled;
- ``warm runtime``: another pattern ran forward and backward in an earlier process on the same
  cache directory, so what patterns share (the runtime helpers) is on disk, and only this
  pattern's own kernels compile;
- ``cached``: the same pattern ran before: everything loads from disk;
- ``same structure``: a pattern of the same shape as the one that ran before (``SIBLING``:
  another window size), whose kernels read other bounds from their table.

``--roots`` runs the same cases on several checkouts (e.g. the code before a change, unpacked
with ``git archive``, and this one), interleaved, and reports medians. An unpacked root gets a
``patterngen/backends`` link to its own ``backends/``: without it, it imported the installed
checkout's backends, so earlier comparisons timed one backend under several roots.
``--demo`` also times ``patterngen demo --backend numba`` from an empty cache, once per root.
``--speed W2,W3`` instead checks that a change left the kernels' speed alone: on each root, in rounds that alternate the roots, the
numba forward and forward+backward of those workloads of ``benchmarks/bench_cpu.py`` (its
definitions and its timer, kernels compiled before timing), medians over the rounds.

Usage:
    python benchmarks/bench_compile.py [--repeats 3] [--roots /tmp/before,.] [--demo]
    python benchmarks/bench_compile.py --speed W1,W2,W2-d64,W3,W4,W5 --roots /tmp/before,.
        [--clock thread-cpu]
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
#: NEW's shape with other extents: the same kernels, other bounds
SIBLING = ("pg.window(3, dilation=2) | pg.axis(0)", [16, 16])


#: what a speed round runs: bench_cpu's workloads on numba, forward and forward+backward (ms)
_SPEED = r"""
import importlib.util, json, math, sys
import numba, torch, patterngen as pg
spec = importlib.util.spec_from_file_location("bench_cpu", sys.argv[1])
bench = sys.modules["bench_cpu"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)
import statistics, time
threads = bench.THREADS if sys.argv[3] == "wall" else 1
torch.set_num_threads(threads)
numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))

def timed(fn, repeats):
    if sys.argv[3] == "wall":
        return bench.timed(fn, repeats)
    fn()
    times = []
    for _ in range(repeats):  # CPU time of this thread: what other tenants take is not counted
        t = time.thread_time()
        fn()
        times.append(time.thread_time() - t)
    return 1e3 * statistics.median(times)

out = {}
for w in bench.WORKLOADS:
    if w.name not in sys.argv[2].split(","):
        continue
    attn = pg.compile(w.spec, w.grid, backend="numba")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(w.batch, w.heads, math.prod(w.grid), w.head_dim, generator=gen)
               for _ in range(3))
    forward = timed(lambda: attn(q, k, v), 9)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    both = timed(lambda: attn(qg, kg, vg).sum().backward(), 9)
    out[w.name] = (forward, both)
print(json.dumps(out))
"""


def _speed(root: Path, workloads: str, clock: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _SPEED,
                           str(root / "benchmarks" / "bench_cpu.py"), workloads, clock],
                          env=_env(root, None), cwd=tempfile.gettempdir(), capture_output=True,
                          text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"speed round failed under {root}:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _own_backends(root: Path) -> None:
    """Make ``root`` import its own ``backends/`` as ``patterngen.backends``: an unpacked
    checkout has none under ``patterngen/``, and the import would otherwise fall through to the
    installed (editable) project's, so every root would time the same backends."""
    link = root / "patterngen" / "backends"
    if not link.exists() and (root / "backends").is_dir():
        link.symlink_to(root.resolve() / "backends", target_is_directory=True)


def _env(root: Path, cache: str | None) -> dict:
    if root.resolve() != Path(__file__).resolve().parents[1]:
        _own_backends(root)
    env = dict(os.environ)
    if cache is not None:  # numba's caches too: the runtime's would sit beside its source, warm
        env.update(PATTERNGEN_CACHE=cache, NUMBA_CACHE_DIR=cache)
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
        out["same structure"] = _case(root, cache, SIBLING)
    with tempfile.TemporaryDirectory() as cache:
        _case(root, cache, OTHER)
        out["warm runtime"] = _case(root, cache, NEW)
    return out


def _demo(root: Path) -> float:
    with tempfile.TemporaryDirectory() as cache:
        plot = Path(cache) / "demo.png"
        start = time.perf_counter()
        command = "import sys; from patterngen.cli import main; sys.exit(main(sys.argv[1:]))"
        done = subprocess.run([sys.executable, "-c", command, "demo", "--backend", "numba",
                               "--plot", str(plot)],
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
    parser.add_argument("--speed", metavar="WORKLOADS",
                        help="time these bench_cpu workloads' kernels instead of compiles")
    parser.add_argument("--clock", choices=("wall", "thread-cpu"), default="wall",
                        help="with --speed: bench_cpu's wall timer on its threads, or one "
                             "thread's CPU time (steadier on a shared machine)")
    parser.add_argument("--json", help="write the raw figures to this file")
    args = parser.parse_args(argv)
    roots = [Path(r).resolve() for r in args.roots.split(",")]
    if args.speed:
        _speed_table(roots, args)
        return
    runs = {str(r): [] for r in roots}
    for _ in range(args.repeats):
        for root in roots:
            runs[str(root)].append(_scenarios(root))
    demos = {str(root): _demo(root) for root in roots} if args.demo else {}

    print(f"new pattern {NEW[0]} on {NEW[1]}, float32, head_dim 32, 2 threads; "
          f"median of {args.repeats} fresh processes (s)")
    print(f"{'root':<40} {'scenario':<14} {'import':>7} {'forward':>8} {'backward':>9}")
    for root, rows in runs.items():
        for scenario in rows[0] if rows else ():
            med = {key: statistics.median(r[scenario][key] for r in rows)
                   for key in ("import", "forward", "backward")}
            print(f"{root:<40} {scenario:<14} {med['import']:7.2f} {med['forward']:8.2f} "
                  f"{med['backward']:9.2f}")
    for root, seconds in demos.items():
        print(f"{root:<40} patterngen demo from an empty cache: {seconds:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"runs": runs, "demo": demos}, indent=1))


def _speed_table(roots, args) -> None:
    rounds = {str(r): [] for r in roots}
    for _ in range(args.repeats):
        for root in roots:
            rounds[str(root)].append(_speed(root, args.speed, args.clock))
    clock = ("bench_cpu's timer, wall ms" if args.clock == "wall"
             else "one thread, its CPU ms (other tenants' load left out)")
    print(f"numba kernels, median over {args.repeats} interleaved rounds; {clock}")
    print(f"{'workload':<9} " + " ".join(f"{Path(r).name + ' fwd':>14} {'fwd+bwd':>8}"
                                         for r in rounds))
    for name in args.speed.split(","):
        cells = []
        for rows in rounds.values():
            forward = statistics.median(r[name][0] for r in rows)
            both = statistics.median(r[name][1] for r in rows)
            cells.append(f"{forward:14.2f} {both:8.2f}")
        print(f"{name:<9} " + " ".join(cells))
    if args.json:
        Path(args.json).write_text(json.dumps(rounds, indent=1))


if __name__ == "__main__":
    main()
