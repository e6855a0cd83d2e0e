"""Measured cost beside symbolic cost: run a compiled pattern, time it, and compare.

For each grid size :func:`profile` reports the symbolic pairs and FLOPs evaluated at that size,
the pairs counted from the IR, the pairs a block-sparse layout executes (when
:mod:`patterngen.layout` is installed), the compile time (building the backend plus its first
call, where JIT compilers do their work) apart from the run time (median of ``repeats`` calls
after ``warmup``), the achieved GFLOP/s on attended FLOPs, and its share of the machine's peak,
which is *measured* once per process and device with a large float32 matmul.

Conventions: FLOPs are :attr:`patterngen.CostReport.flops` (``4 * head_dim`` per attended pair
and head, forward only; softmax not counted). Timings are wall-clock, synchronised on CUDA.

Example:
    >>> import patterngen as pg
    >>> prof = profile(pg.window(3), grid=(8, 8), head_dim=8, heads=2, backend="auto",
    ...                repeats=3)  # doctest: +SKIP
    >>> prof.rows[0].counted_pairs  # doctest: +SKIP
    576
"""

from __future__ import annotations

import functools
import math
import statistics
import sys
import time
from dataclasses import dataclass, replace

from . import ir, limits
from .compile import compile as compile_pattern
from .cost import CostReport, cost, mean_over_heads
from .errors import PatternError
from .grid import as_grid
from .parse import as_ir

__all__ = ["profile", "Profile", "Measurement", "measured_peak", "SYMBOLIC_AXES",
           "SYMBOLIC_KEY_AXES"]

#: axis names for the symbolic report, by grid rank
SYMBOLIC_AXES = {1: ("n",), 2: ("H", "W"), 3: ("T", "H", "W")}
#: the key grid's axis names, when keys live on another grid
SYMBOLIC_KEY_AXES = {1: ("m",), 2: ("h", "w"), 3: ("t", "h", "w")}


def _synchronize(device: str):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


@functools.cache
def measured_peak(device: str = "cpu") -> float:
    """The machine's float32 matmul rate in GFLOP/s on ``device`` (best of 5, cached).

    A square float32 matmul (1024 on CPU, 4096 on CUDA) is about the fastest dense work the
    device does, so attention's share of it says how far a kernel is from the hardware.
    """
    import torch

    n = 4096 if str(device).startswith("cuda") else 1024
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = math.inf
    for _ in range(6):  # the first run warms up allocators and thread pools
        _synchronize(device)
        t0 = time.perf_counter()
        a @ b
        _synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


@dataclass(frozen=True)
class Measurement:
    """One grid size of a :class:`Profile`.

    Attributes:
        grid: the numeric grid.
        backend: the backend that ran.
        symbolic_pairs: the symbolic pairs (per head) at this size.
        counted_pairs: pairs counted from the IR (per head; mean over heads for ``heads()``).
        executed_pairs: pairs the block layout executes (per head), or ``None``.
        executed_from: where :attr:`executed_pairs` comes from.
        flops: attended FLOPs of one call.
        compile_ms: backend construction plus first call.
        times_ms: every timed call.
        predicted_ms: the planner's prediction for this backend and these sizes
            (:func:`patterngen.plan.plan`), or ``None`` where it has no rate for the backend.
    """

    grid: tuple
    backend: str
    symbolic_pairs: int
    counted_pairs: int
    executed_pairs: int | None
    executed_from: str
    flops: int
    compile_ms: float
    times_ms: tuple
    peak_gflops: float
    predicted_ms: float | None = None

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def gflops(self) -> float:
        return self.flops / (self.median_ms * 1e-3) / 1e9

    @property
    def peak_share(self) -> float:
        return self.gflops / self.peak_gflops


@dataclass(frozen=True)
class Profile:
    """Measurements of one pattern on one or more grid sizes; prints as a table.

    Attributes:
        label: the pattern's expression.
        symbolic: the cost report on a symbolic grid (``None`` when the pattern needs numbers).
        device, dtype, head_dim, heads, batch: what ran.
        rows: one :class:`Measurement` per size.
        plot: the PNG written, if any.
        key_grid: the keys' grid, when they live on another grid than the queries.
    """

    label: str
    symbolic: CostReport | None
    device: str
    dtype: str
    head_dim: int
    heads: int
    batch: int
    rows: tuple
    plot: str | None = None
    key_grid: tuple | None = None

    def __repr__(self) -> str:
        backend = ", ".join(dict.fromkeys(r.backend for r in self.rows))
        lines = [f"Profile of {self.label} with {backend} on {self.device} "
                 f"(head_dim={self.head_dim}, heads={self.heads}, batch={self.batch}, "
                 f"{self.dtype})"]
        if self.key_grid is not None:
            lines.append(f"  queries on the rows' grid, keys on "
                         f"{'x'.join(map(str, self.key_grid))}")
        if self.symbolic is not None:
            lines.append(f"  symbolic pairs per head: {self.symbolic.pairs} on grid "
                         f"{self.symbolic.grid}; FLOPs: {self.symbolic.flops}")
        lines.append(f"  peak: {self.rows[0].peak_gflops:.1f} GFLOP/s (measured float32 "
                     f"matmul); compile = construction + first call; time = median of "
                     f"{len(self.rows[0].times_ms)}")
        lines.append(f"  executed pairs: {self.rows[0].executed_from}")
        header = ("grid", "tokens", "symbolic pairs", "counted pairs", "executed pairs",
                  "FLOPs", "compile ms", "median ms", "predicted ms", "GFLOP/s", "% peak")
        table = [header] + [(
            "x".join(map(str, r.grid)), str(r.tokens), str(r.symbolic_pairs),
            str(r.counted_pairs), "n/a" if r.executed_pairs is None else str(r.executed_pairs),
            f"{r.flops:.3g}", f"{r.compile_ms:.1f}", f"{r.median_ms:.3f}",
            "n/a" if r.predicted_ms is None else f"{r.predicted_ms:.3f}", f"{r.gflops:.2f}",
            f"{100 * r.peak_share:.1f}%") for r in self.rows]
        widths = [max(len(row[c]) for row in table) for c in range(len(header))]
        lines += ["  " + "  ".join(cell.rjust(w) for cell, w in zip(row, widths))
                  for row in table]
        if self.plot:
            lines.append(f"  plot: {self.plot}")
        return "\n".join(lines)

    __str__ = __repr__


def _mean_over_heads(per_pattern: list[int], heads: int) -> int:
    return round(mean_over_heads(per_pattern, heads))


def _executed_pairs(attn, lowered, heads: int) -> tuple[int, str]:
    """Executed pairs (per head) and where they come from: the backend's own count
    (:class:`~patterngen.backends.Backend`'s ``executed_pairs``), else
    :func:`patterngen.layout.layout` with its default blocks."""
    counted = getattr(attn, "executed_pairs", None)
    if counted is not None:
        return _mean_over_heads(list(counted), heads), "the backend's own count"
    from .layout import layout

    per_pattern = [int(layout(h).executed_pairs) for h in lowered.patterns]
    return _mean_over_heads(per_pattern, heads), "patterngen.layout, default blocks, row-major"


def _measure(pattern, grid, key_grid, symbolic, backend, device, dtype, head_dim, heads, batch,
             warmup, repeats) -> Measurement:
    import torch

    lowered = as_ir(pattern, grid, key_grid)
    shape = lowered.grid.require_numeric("profile")
    key_shape = lowered.keys.require_numeric("profile")
    sizes = dict(zip(SYMBOLIC_AXES[len(shape)], shape))
    if lowered.key_grid is not None:
        sizes.update(zip(SYMBOLIC_KEY_AXES[len(shape)], key_shape))
    numeric = (symbolic.subs(**sizes) if symbolic is not None
               else cost(lowered, head_dim=head_dim, heads=heads, batch=batch))
    counted = _mean_over_heads([h.pairs() for h in lowered.patterns], heads)
    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise PatternError(f"Unknown dtype={dtype!r}; expected a torch dtype name such as "
                           f"'float32'.")
    limits.check("PATTERNGEN_MAX_PROFILE_ELEMENTS",
                 batch * heads * max(math.prod(shape), math.prod(key_shape)) * head_dim,
                 "profile: the elements of each of q, k and v")
    q, k, v = (torch.randn(batch, heads, *s, head_dim, device=device, dtype=torch_dtype)
               for s in (shape, key_shape, key_shape))
    with torch.no_grad():
        _synchronize(device)
        t0 = time.perf_counter()
        attn = compile_pattern(lowered, backend=backend, device=device, dtype=dtype)
        attn(q, k, v)
        _synchronize(device)
        compile_ms = (time.perf_counter() - t0) * 1e3
        for _ in range(warmup):
            attn(q, k, v)
        times = []
        for _ in range(repeats):
            _synchronize(device)
            t0 = time.perf_counter()
            attn(q, k, v)
            _synchronize(device)
            times.append((time.perf_counter() - t0) * 1e3)
    name = getattr(attn, "name", backend)
    strategy = getattr(getattr(attn, "plans", [None])[-1], "strategy", None)
    if strategy is not None:
        name = f"{name} ({strategy})"
    return Measurement(shape, name, int(numeric.pairs), counted,
                       *_executed_pairs(attn, lowered, heads), int(numeric.flops), compile_ms,
                       tuple(times), measured_peak(device),
                       _predicted(lowered, backend, head_dim, heads, batch, device, dtype))


def _predicted(lowered, backend, head_dim, heads, batch, device, dtype) -> float | None:
    """The planner's forward time for ``backend`` on these sizes (``None``: no rate)."""
    from .plan import plan

    try:
        return plan(lowered, head_dim=head_dim, heads=heads, batch=batch, device=device,
                    dtype=dtype, executors=None if backend == "auto" else (backend,)
                    ).predicted_ms
    except PatternError:
        return None


def _plot(prof: Profile, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = [r.tokens for r in prof.rows]
    measured = [r.median_ms for r in prof.rows]
    # the symbolic prediction is FLOPs / rate; the rate is fitted in log space (geometric mean)
    rate = math.exp(statistics.fmean(math.log(r.flops / r.median_ms) for r in prof.rows))
    predicted = [r.flops / rate for r in prof.rows]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.loglog(tokens, measured, "o-", label=f"measured ({prof.rows[0].backend}, median)")
    ax.loglog(tokens, predicted, "s--",
              label=f"symbolic FLOPs / {rate * 1e3 / 1e9:.2f} GFLOP/s (fitted)")
    for r in prof.rows:
        ax.annotate("x".join(map(str, r.grid)), (r.tokens, r.median_ms), fontsize=7,
                    textcoords="offset points", xytext=(4, -10))
    ax.set_xlabel("tokens")
    ax.set_ylabel("time per call (ms)")
    ax.set_title(f"{prof.label} on {prof.device} (head_dim={prof.head_dim}, heads={prof.heads})",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def profile(pattern, grid=None, head_dim=32, heads=4, batch=1, backend="auto", device="cpu",
            dtype="float32", sizes=None, warmup=2, repeats=7, plot=None,
            progress=None, key_grid=None) -> Profile:
    """Run ``pattern`` through a backend and set measured time beside symbolic cost.

    Args:
        pattern: a spec (or an IR, for a single grid).
        grid: the grid to measure; or use ``sizes``.
        head_dim, heads, batch: input shape ``(batch, heads, *grid, head_dim)``.
        backend: a registered backend name or ``"auto"``.
        device, dtype: where and in what the inputs live (``"cuda"`` synchronises timings).
        sizes: several grids to sweep (a progress bar goes to stderr).
        warmup, repeats: untimed calls, then timed calls (the median is reported).
        plot: a PNG path: time against tokens on log-log axes, with the symbolic FLOPs scaled
            by the fitted rate drawn beside it.
        progress: show the progress bar (default: when sweeping more than one size).
        key_grid: the keys' grid when k and v live on another grid than q (one ``grid``
            only, not a sweep); the symbolic report names its axes in lower case
            (:data:`SYMBOLIC_KEY_AXES`).

    Returns:
        A :class:`Profile` whose ``repr`` is a table.

    Raises:
        BackendUnavailable: when ``backend`` cannot run the pattern on ``device``/``dtype``.

    Example:
        >>> import patterngen as pg
        >>> pg.profile(pg.window(7), grid=(64, 64), backend="numba")  # doctest: +SKIP
    """
    if sizes is None:
        if grid is None and isinstance(pattern, (ir.IR, ir.HeadsIR)):
            grid = pattern.grid
        if grid is None:
            raise PatternError("profile needs grid=... or sizes=[...], e.g. grid=(64, 64).")
        sizes = [grid]
    elif grid is not None:
        raise PatternError("Pass either grid= or sizes=, not both.")
    elif key_grid is not None:
        raise PatternError(f"profile: key_grid={key_grid!r} goes with one grid=..., not a sweep "
                           f"of sizes={list(sizes)}; profile each (grid, key_grid) pair alone.")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise PatternError(f"Invalid repeats={repeats!r}; expected an integer >= 1.")
    grids = [as_grid(g) for g in sizes]
    if len({g.ndim for g in grids}) > 1:
        raise PatternError(f"Every size needs the same rank, got sizes={list(sizes)}.")
    label = pattern.label if isinstance(pattern, (ir.IR, ir.HeadsIR)) else repr(pattern)
    symbolic = None
    if not isinstance(pattern, (ir.IR, ir.HeadsIR)):
        try:
            symbolic = cost(pattern, grid=SYMBOLIC_AXES[grids[0].ndim], head_dim=head_dim,
                            heads=heads, batch=batch, dtype=dtype,
                            key_grid=None if key_grid is None
                            else SYMBOLIC_KEY_AXES[grids[0].ndim])
        except PatternError:
            pass  # e.g. a flat global-token index in 2-D: each size is costed numerically
    if progress is None:
        progress = len(grids) > 1
    if progress:
        from tqdm import tqdm

        grids = tqdm(grids, desc=f"profile {label}", unit="size", file=sys.stderr)
    rows = tuple(_measure(pattern, g, key_grid, symbolic, backend, str(device), str(dtype),
                          head_dim, heads, batch, warmup, repeats) for g in grids)
    result = Profile(label, symbolic, str(device), str(dtype), head_dim, heads, batch, rows,
                     key_grid=None if key_grid is None else as_grid(key_grid).shape)
    if plot:
        _plot(result, plot)
        result = replace(result, plot=str(plot))
    return result
