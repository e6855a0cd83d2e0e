"""Per-executor rates for the planner, measured once per machine and cached on disk.

The planner (:mod:`patterngen.plan`) predicts an executor's time from exact counts as

    ms = calls * call_ms + pairs * head_dim * pair_ns / 1e6        (forward)

times ``backward_factor`` for forward + backward, where ``pairs`` are the pairs the executor
computes (padding and masked pairs included). :func:`measure` fits ``call_ms`` and ``pair_ns``
from two problem sizes per executor (a few seconds, with a progress line on stderr) and
:func:`rates` caches the result in ``calibration.json`` under the patterngen cache directory,
keyed by device, dtype, torch version and thread count. It never runs at import; a stale,
corrupt or foreign file, or one that lacks an executor or holds a rate that is not a finite
number in its range, is measured again with a warning. ``PATTERNGEN_CALIBRATION=default``
skips measuring and uses :meth:`Rates.default` (one calibration of the project's 2-core
machine), which the test suite does.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import trust
from .errors import PatternError

__all__ = ["Rates", "rates", "measure", "calibration_path"]

log = logging.getLogger(__name__)

#: bump when the meaning of a stored rate changes, so old files are measured again
VERSION = 1


@dataclass(frozen=True)
class Rate:
    """One executor's cost: ``call_ms`` per call, ``pair_ns`` per pair and head_dim element
    (forward), ``backward_factor`` = forward+backward time / forward time.

    Raises:
        PatternError: a value that is not a finite number in its range (``call_ms`` and
            ``pair_ns`` at least 0, ``backward_factor`` at least 1), so that no prediction
            is NaN or negative.
    """

    call_ms: float
    pair_ns: float
    backward_factor: float

    def __post_init__(self):
        for name, low in (("call_ms", 0.0), ("pair_ns", 0.0), ("backward_factor", 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not low <= value < math.inf:
                raise PatternError(f"Rate: {name}={value!r}; expected a finite number "
                                   f">= {low}.")


@dataclass(frozen=True)
class Rates:
    """Rates of every executor on one device and dtype.

    Attributes:
        executors: ``{name: Rate}`` for ``dense``, ``gather``, ``numba``, ``sdpa``, ``flex``
            and ``merge`` (whose ``pair_ns`` is per token and head_dim element merged).
        source: ``"measured"`` or ``"default"``.
    """

    executors: dict = field(default_factory=dict)
    source: str = "default"

    def predict(self, name: str, pairs: int, head_dim: int, calls: int = 1,
                backward: bool = False, tokens: int = 0) -> float:
        """Predicted milliseconds of ``calls`` calls of executor ``name`` computing ``pairs``
        pairs (``tokens`` merged rows for ``merge``)."""
        if name not in self.executors:
            raise PatternError(f"No rate for executor {name!r}; known: {sorted(self.executors)}.")
        r = self.executors[name]
        work = (tokens if name == "merge" else pairs) * head_dim
        ms = calls * r.call_ms + work * r.pair_ns / 1e6
        return ms * (r.backward_factor if backward else 1.0)

    @staticmethod
    def default(device: str = "cpu") -> "Rates":
        """On CPU, a calibration of the project's 2-core machine (float32, torch 2.13, two
        threads; ``benchmarks/bench_plan.py --recalibrate``, rounded); on CUDA, placeholders
        that only order the executors (dense fused kernels first) until :func:`measure`
        runs there."""
        if device == "cuda":
            table = {"dense": Rate(0.02, 0.0005, 3.0), "gather": Rate(1e9, 1.0, 3.0),
                     "numba": Rate(1e9, 1.0, 3.0), "sdpa": Rate(0.05, 0.001, 3.0),
                     "flex": Rate(0.03, 0.0008, 3.0), "merge": Rate(0.0, 0.0005, 3.0)}
        else:
            # no flex: FlexAttention on CPU compiles for seconds, is forward-only, and its
            # time follows its block layout in ways one rate does not fit (bench_cpu.py: 1.1x
            # numba on a 1-D window, 10x on a 7x7 neighbourhood), so the planner leaves it
            # to an explicit backend="flex"
            table = {"dense": Rate(0.14, 0.064, 4.6), "gather": Rate(0.13, 0.23, 4.8),
                     "numba": Rate(0.13, 0.23, 4.8), "sdpa": Rate(0.12, 0.042, 4.7),
                     "merge": Rate(0.0, 0.004, 3.0)}
        return Rates(table, "default")


def calibration_path() -> Path:
    """``$PATTERNGEN_CACHE/calibration.json`` (or ``~/.cache/patterngen``), the directory
    private to the user; when it cannot be written or others could write to it, a private
    temporary directory for this process, with a warning (:mod:`patterngen.trust`)."""
    root = os.environ.get("PATTERNGEN_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "patterngen"
    return trust.usable_dir(base, "patterngen: the calibration directory",
                            "set PATTERNGEN_CACHE to a directory only you can write") \
        / "calibration.json"


def _stored_rates(entry, device: str) -> dict:
    """The ``{name: Rate}`` of one stored calibration, every executor of
    :meth:`Rates.default` present and every rate valid.

    Raises:
        ValueError: naming what is missing or wrong.
    """
    if not isinstance(entry, dict):
        raise ValueError(f"expected an object of executors, got {entry!r}")
    missing = sorted(set(Rates.default(device).executors) - set(entry))
    if missing:
        raise ValueError(f"no rate for executors {missing}")
    table = {}
    for name, r in entry.items():
        if not isinstance(r, dict):
            raise ValueError(f"rate of {name!r} is {r!r}, not an object")
        try:
            table[name] = Rate(**r)
        except (TypeError, PatternError) as e:
            raise ValueError(f"rate of {name!r}: {e}") from None
    return table


def check_dtype(dtype: str, where: str) -> None:
    """Raise ``PatternError`` unless ``dtype`` names a torch dtype (``"float32"``)."""
    import torch

    if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise PatternError(f"{where}: dtype={dtype!r} is not a torch dtype; expected a name "
                           f"such as 'float32', 'float64', 'bfloat16' or 'float16'.")


def _key(device: str, dtype: str) -> str:
    import torch

    return f"v{VERSION}|{device}|{dtype}|torch {torch.__version__}|threads " \
           f"{torch.get_num_threads()}"


_MEMO: dict = {}


def rates(device: str = "cpu", dtype: str = "float32", refresh: bool = False) -> Rates:
    """This machine's rates for ``device`` and ``dtype``: from the cache file, else measured
    (:func:`measure`) and stored. ``refresh`` measures again.

    Raises:
        PatternError: ``dtype`` is not a torch dtype.
    """
    check_dtype(dtype, "rates")
    if os.environ.get("PATTERNGEN_CALIBRATION") == "default":
        return Rates.default(device)
    key = _key(device, dtype)
    if key in _MEMO and not refresh:
        return _MEMO[key]
    path = calibration_path()
    stored = {}
    if path.exists():
        try:
            stored = json.loads(path.read_text())
            if not isinstance(stored, dict):
                raise ValueError(f"expected a JSON object, got {type(stored).__name__}")
            if key in stored and not refresh:
                table = _stored_rates(stored[key], device)
                _MEMO[key] = Rates(table, "measured")
                return _MEMO[key]
        except (ValueError, TypeError, OSError, RecursionError) as e:
            warnings.warn(f"patterngen: calibration file {path} is unreadable ({e}); "
                          f"measuring again.", stacklevel=2)
            stored = {}
    measured = measure(device, dtype)
    stored[key] = {name: asdict(r) for name, r in measured.executors.items()}
    try:
        trust.write_private(path, json.dumps(stored, indent=1).encode())
    except OSError as e:
        warnings.warn(f"patterngen: cannot write calibration file {path} ({e}); the rates "
                      f"hold for this process only.", stacklevel=2)
    _MEMO[key] = measured
    return measured


def _best_ms(fn, repeats: int = 7) -> float:
    """Best of ``repeats`` after a warm-up: on shared cores the fastest run is the one least
    disturbed by other tenants, and the rates are meant to compare executors, not tenants."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def _fit(small: tuple, large: tuple) -> tuple[float, float]:
    """``(call_ms, pair_ns)`` of the line through ``(work, ms)`` points (clamped at 0)."""
    (w1, t1), (w2, t2) = small, large
    slope = max((t2 - t1) / max(w2 - w1, 1), 1e-9)
    return max(t1 - slope * w1, 0.0), slope * 1e6


def measure(device: str = "cpu", dtype: str = "float32") -> Rates:
    """Measure every executor that runs on ``device`` with ``dtype`` on two problem sizes.

    Each executor runs a pattern that is its natural case (blocks for the dense batch, a
    neighbourhood for the gather kernel and the block-sparse backend), forward and
    forward+backward, best of 7 after a warm-up.
    """
    import torch

    from . import spec
    from .compile import compile as compile_pattern

    defaults = Rates.default(device).executors
    dt = getattr(torch, dtype)
    head_dim, heads = 32, 2
    # sizes where the per-pair cost, not the call, dominates the larger point: the rates are
    # used for whole workloads (16x16 and 40x40 neighbourhoods overstated numba's pair cost
    # 2-4x on the CPU benchmark's workloads)
    cases = {
        "dense": (spec.block(8), ((16, 16), (48, 48))),
        "gather": (spec.window(5), ((24, 24), (64, 64))),
        "sdpa": (spec.window(5), ((24, 24), (64, 64))),
    }
    table = dict(defaults)
    start = time.perf_counter()
    for name, (pattern, grids) in cases.items():
        points, factors = [], []
        backend = "numba" if name == "gather" else name
        for grid in grids:
            print(f"\rpatterngen: calibrating {name} on {device}/{dtype} grid "
                  f"{'x'.join(map(str, grid))} ...", end="", file=sys.stderr, flush=True)
            try:
                if name == "dense":
                    # the default rates only plan this run: measuring must not recurse
                    attn = compile_pattern(pattern, grid, backend="auto", device=device,
                                           dtype=dtype, strategy="terms", terms="dense",
                                           rates=Rates.default(device))
                else:
                    attn = compile_pattern(pattern, grid, backend=backend, device=device,
                                           dtype=dtype)
            except PatternError as e:
                log.info("calibration: %s cannot run (%s); keeping its default rate", name, e)
                break
            q, k, v = (torch.randn(1, heads, *grid, head_dim, device=device, dtype=dt)
                       .requires_grad_() for _ in range(3))
            with torch.no_grad():
                fwd = _best_ms(lambda: attn(q, k, v))
            with torch.enable_grad():  # rates may be wanted inside no_grad (pg.profile)
                both = _best_ms(lambda: attn(q, k, v).sum().backward())
            # the pairs the planner prices: what each executor computes (a dense batch's
            # padding and a block layout's masked pairs included; the attended ones for the
            # numba kernels, whose tiles add little)
            pairs = (spec.lower(pattern, grid).pairs() if name == "gather"
                     else attn.layout.executed_pairs if name == "sdpa"
                     else sum(attn.executed_pairs))
            points.append((pairs * heads * head_dim, fwd))
            factors.append(both / max(fwd, 1e-6))
        if len(points) == 2:
            call_ms, pair_ns = _fit(*points)
            table[name] = Rate(call_ms, pair_ns, max(statistics.median(factors), 1.0))
    table["numba"] = table["gather"]
    print(f"\rpatterngen: calibrated {device}/{dtype} in {time.perf_counter() - start:.1f} s"
          + " " * 30, file=sys.stderr)
    return Rates(table, "measured")
