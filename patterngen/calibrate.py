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

import functools
import json
import logging
import math
import operator
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import trust
from .call import ITEMSIZE, spilled
from .errors import PatternError

__all__ = ["Rates", "rates", "measure", "calibration_path", "run_times"]

log = logging.getLogger(__name__)

#: bump when the meaning of a stored rate changes, so old files are measured again
VERSION = 17


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


#: the shape classes the calibration measures: dense attention problems of rows x keys at a
#: head_dim, on each kernel (``matmul``: baddbmm, softmax, bmm, FlashAttention-2's backward as
#: matmuls; ``fused``: the fused kernel that returns the log-sum-exp; ``kept``: bmm, softmax,
#: bmm through torch's autograd, which keeps the probabilities for its backward, as a dense
#: term that runs alone does), and the numba kernels one query at a time (``one``), in tiles
#: of queries that share keys (``tiles``) or in tiles spanning rows over a key grid (``span``:
#: a key-major chunk and one finish for all lanes, ``tiling.plan_groups``), their counts
#: (``NUMBA_COUNTS``, :mod:`patterngen.backends.numba.counts`) at each head_dim. Beyond the
#: largest rows the rate per pair is flat (the edge's is used). One key per row on the matmul
#: path (global key tokens) and one row per problem on the fused kernel (global query tokens)
#: cost several times a pair of 16 (the rows' softmax and log-sum-exp, the problem's launch
#: and scan)
ATTEND_ROWS = {"matmul": (16, 64, 256), "fused": (1, 16, 64, 256), "kept": (16, 64, 256)}
ATTEND_KEYS = {"matmul": (1, 16, 64, 128), "fused": (16, 64, 256, 1024), "kept": (16, 64, 128)}
ATTEND_DIMS = (16, 64)
NUMBA_LANES = ("one", "tiles", "span")
NUMBA_DIMS = (16, 32, 64)
#: what the numba kernels are priced on: pairs (times head_dim), queries, key rows of two keys
#: or more visited, keys their forward buffers one at a time and key rows of one key or none
#: (a column's: measured 0.3-0.4x a longer row's setup)
NUMBA_COUNTS = ("numba", "queries", "rows", "loose", "plain")
#: fixed costs per call of each path: a whole-pattern backend's Python, the term-wise path's
#: own, one torch kernel launch, and each part of a term-wise plan that merges its parts
#: beyond its kernel launch (its views, masks and calls, its share of the merge's bookkeeping)
LAUNCHES = ("numba", "sdpa", "terms", "kernel", "part")


def attend_name(kernel: str, rows: int, keys: int, head_dim: int) -> str:
    return f"attend/{kernel}/{rows}x{keys}/d{head_dim}"


def numba_name(lanes: str, head_dim: int, what: str = "numba") -> str:
    return f"{what}/{lanes}/d{head_dim}"


def _names() -> list[str]:
    """Every primitive a calibration holds a rate for."""
    names = [attend_name(kernel, m, n, d) for kernel, keys in ATTEND_KEYS.items()
             for m in ATTEND_ROWS[kernel] for n in keys for d in ATTEND_DIMS]
    names += [numba_name(lanes, d, what) for what in NUMBA_COUNTS for lanes in NUMBA_LANES
              for d in NUMBA_DIMS]
    return names + [f"launch/{p}" for p in LAUNCHES] + ["copy", "roll", "gather", "band", "fill",
                                                        "scan", "merge", "fault", "mask",
                                                        "blockmask", "spill"]


def _bracket(axis: tuple, x: float, log: bool = True):
    """``(i, j, w)``: ``x`` between ``axis[i]`` and ``axis[j]`` at weight ``w`` of ``j``
    (interpolated in log2, clamped to the measured range)."""
    f = math.log2 if log else float
    if x <= axis[0]:
        return 0, 0, 0.0
    if x >= axis[-1]:
        return len(axis) - 1, len(axis) - 1, 0.0
    j = next(i for i, a in enumerate(axis) if a >= x)
    return j - 1, j, (f(x) - f(axis[j - 1])) / (f(axis[j]) - f(axis[j - 1]))


@dataclass(frozen=True)
class Rates:
    """Rates of the primitives the executors launch, on one device and dtype.

    Attributes:
        executors: ``{primitive: Rate}`` (the names of :func:`_names`): ``attend/...`` per
            kernel and shape class (``pair_ns`` per pair and head_dim element), ``numba/...``
            per lane plan and head_dim (the same unit), ``queries/...``, ``rows/...``,
            ``loose/...`` (ns per query, key row, loose key), ``launch/...`` (ms per call),
            ``copy`` (``pair_ns`` per byte copied), ``roll`` (per byte of a rolled dense
            term's views, each row gathered once), ``gather`` (per byte gathered by an
            index), ``band`` (per byte of overlapping windows of key blocks, the
            ``unfold_backward`` of their view, in a backward only), ``fill`` (per byte of
            gradient zero-filled and added, in a backward only), ``fault`` (per byte of
            memory new to the process, zeroed by the system on first touch), ``scan`` (per
            element checked for non-finite values), ``mask`` (per score a dense term's mask
            is added to on the matmul paths), ``blockmask`` (per element of a per-problem mask
            the fused kernel reads, for each batch and head), ``spill`` (per byte of the
            matmul paths' scores beyond the caches, :func:`patterngen.call.spilled`) and
            ``merge`` (per token and head_dim element of each part merged).
        source: ``"measured"`` or ``"default"``.
    """

    executors: dict = field(default_factory=dict)
    source: str = "default"

    def predict(self, name: str, pairs: int, head_dim: int, calls: int = 1,
                backward: bool = False, tokens: int = 0) -> float:
        """Predicted milliseconds of ``calls`` calls of primitive ``name`` over ``pairs``
        pairs (``tokens`` merged rows for ``merge``) of ``head_dim`` elements."""
        if name not in self.executors:
            raise PatternError(f"No rate for {name!r}; known: {sorted(self.executors)}.")
        r = self.executors[name]
        work = (tokens if name == "merge" else pairs) * head_dim
        ms = calls * r.call_ms + work * r.pair_ns / 1e6
        return ms * (r.backward_factor if backward else 1.0)

    def _interp(self, names, weights, geometric: bool = False):
        """``(pair_ns, backward_factor)`` interpolated over named grid points (``geometric``:
        the logarithms of the rates, so that a fixed cost per problem, which makes small
        problems dear per pair, falls off between the points as it does in the kernels)."""
        got = [(self.executors[n], w) for n, w in zip(names, weights) if w]
        if geometric and all(r.pair_ns > 0 for r, _ in got):
            ns = math.exp(sum(math.log(r.pair_ns) * w for r, w in got))
            both = math.exp(sum(math.log(r.pair_ns * r.backward_factor) * w for r, w in got))
            return ns, both / ns
        return (sum(r.pair_ns * w for r, w in got), sum(r.backward_factor * w for r, w in got))

    def unit_rate(self, op) -> tuple[float, float, float]:
        """``(units, ns per unit, backward factor)`` of one :class:`~patterngen.call.Op`."""
        if op.kind in ("attend", "rebuild"):  # rebuild: a kernel's forward work redone in
            # a backward (its ops list it then)
            m, n, d = op.shape
            axes = (ATTEND_ROWS[op.kernel], ATTEND_KEYS[op.kernel], ATTEND_DIMS)
            br = [_bracket(a, x) for a, x in zip(axes, (m, n, d))]
            names, weights = [], []
            for corner in range(8):
                pick = [(b[1], b[2]) if corner >> i & 1 else (b[0], 1 - b[2])
                        for i, b in enumerate(br)]
                names.append(attend_name(op.kernel, *(a[i] for a, (i, _) in zip(axes, pick))))
                weights.append(math.prod(w for _, w in pick))
            ns, factor = self._interp(names, weights, geometric=True)
            return op.count * m * n * d, ns, factor if op.kind == "attend" else 1.0
        if op.kind in NUMBA_COUNTS:
            (d,) = op.shape
            i, j, w = _bracket(NUMBA_DIMS, d)
            ns, factor = self._interp([numba_name(op.kernel, NUMBA_DIMS[i], op.kind),
                                       numba_name(op.kernel, NUMBA_DIMS[j], op.kind)],
                                      [1 - w, w])
            return op.count * (d if op.kind == "numba" else 1), ns, factor
        if op.kind == "restride":  # one pass over the inputs, and again in the backward
            return op.count, self.executors["merge"].pair_ns, 2.0
        if op.kind in ("copy", "recopy"):
            # a rolled view's copy is an index_select by a token index (kernel "roll"), and
            # so is its adjoint in the backward; a recopy is a copy that only a backward
            # makes (its ops list it then)
            r = self.executors["roll" if op.kernel == "roll" else "copy"]
            return op.count, r.pair_ns, 1.0 if op.kind == "recopy" else r.backward_factor
        if op.kind == "mask":  # the merge's backward adds it again; autograd's keeps nothing
            r = self.executors["mask"]
            return op.count, r.pair_ns, 1.0 if op.kernel == "kept" else r.backward_factor
        if op.kind == "launch":
            r = self.executors[f"launch/{op.kernel}"]
            return op.count, 1e6 * r.call_ms, r.backward_factor
        r = self.executors[op.kind]
        return op.count, r.pair_ns, r.backward_factor

    def price(self, work, backward: bool) -> tuple[float, list[str]]:
        """Predicted milliseconds of ``work`` (:class:`~patterngen.call.Op` list), forward or
        forward + backward, and one line per op: its count and the rate it was priced at."""
        total, lines = 0.0, []
        for op in work:
            units, ns, factor = self.unit_rate(op)
            ms = units * ns / 1e6 * (factor if backward else 1.0)
            total += ms
            bwd = f" x {factor:.2f} bwd" if backward else ""
            lines.append(f"{op!r}: {units:.4g} units x {ns:.3g} ns{bwd} = {ms:.3g} ms")
        return total, lines

    @staticmethod
    def default(device: str = "cpu") -> "Rates":
        """On CPU, a calibration of the project's 2-core machine (float32, torch 2.13, two
        threads, rounded); on CUDA, placeholders that only order the executors (dense fused
        kernels first) until :func:`measure` runs there."""
        table = {}
        for name in _names():
            table[name] = _default_cuda(name) if device == "cuda" else _default_cpu(name)
        return Rates(table, "default")


def _default_cuda(name: str) -> Rate:
    if name.startswith("launch/"):
        return Rate(1e9 if name == "launch/numba" else 0.02, 0.0, 3.0)
    if name.split("/")[0] in NUMBA_COUNTS:
        return Rate(0.0, 1.0 if name.startswith("numba/") else 0.0, 3.0)
    return Rate(0.0, 0.0005, 3.0)


#: the CPU default (the project's 2-core machine, float32, one thread, the least disturbed of
#: two calibrations, rounded; the numba kernels' rates and their call from the middle one of
#: three quiet calibrations at one thread, those of tiles spanning rows (``span``) each the
#: median of three at one thread with another job on the other core (loose keys: the
#: one-query kernels'); ``fault`` the least disturbed of 24 runs of its benchmark at one
#: thread under a load of 3.6; ``copy``, ``roll``, ``gather`` and ``scan`` the least of two
#: one-thread calibrations with another job on the other core, their sources out of cache
#: (:data:`COLD_BYTES`: 0.126-0.202, 0.137-0.142, 0.060-0.074 and 0.68-0.69 ns); ``kept``
#: measured beside ``matmul`` in one calibration and scaled by the two ``matmul`` figures,
#: shape by shape; ``launch/part`` from two one-thread calibrations of the same machine
#: under load, 0.091-0.098 ms; the matmul path's rows of one key and
#: the fused kernel's problems of one row from two one-thread calibrations under load, each
#: scaled by the measured ratio to its neighbouring class of 16, the least of the two; the
#: numba kernels' plain rows 0.35x their run rows, from interleaved one-thread runs of
#: columns and windows under load, backward factor 4, the least of three such calibrations'
#: 4.0-6.1; ``mask`` from a one-thread run of Swin's 256 x 49 x 49 scores: 0.08-0.1 ns;
#: ``blockmask`` from CPU-time minima at one thread under load, 0.2-0.4 ns per element and
#: 2.0-2.4 both ways on BLOCKMASK_CASE and on 16 and 96 blocks of 64 x 960). Per kernel
#: ``{(rows, keys): (ns per pair and head_dim element at head_dim 16, at 64, backward
#: factor)}``; the numba kernels' ``{(what, lanes, head_dim): (ns, backward factor)}``; the
#: rest ``(call_ms, ns, backward factor)``
_CPU_ATTEND = {
    "matmul": {
        (16, 1): (3.63, 0.98, 4.5), (64, 1): (1.01, 0.84, 5.3), (256, 1): (0.79, 0.745, 5.6),
        (16, 16): (0.26, 0.12, 2.9), (16, 64): (0.142, 0.073, 3.0),
        (16, 128): (0.146, 0.068, 3.0), (64, 16): (0.228, 0.102, 2.4),
        (64, 64): (0.12, 0.074, 2.7), (64, 128): (0.109, 0.064, 2.8),
        (256, 16): (0.203, 0.1, 2.4), (256, 64): (0.113, 0.073, 2.6),
        (256, 128): (0.112, 0.05, 2.7),
    },
    "fused": {
        (1, 16): (0.79, 0.39, 4.1), (1, 64): (0.39, 0.38, 6.2), (1, 256): (0.29, 0.27, 6.4),
        (1, 1024): (0.25, 0.35, 7.1),
        (16, 16): (0.151, 0.063, 2.8), (16, 64): (0.064, 0.054, 4.0),
        (16, 256): (0.048, 0.035, 4.0), (16, 1024): (0.042, 0.042, 4.0),
        (64, 16): (0.104, 0.063, 4.0), (64, 64): (0.072, 0.057, 2.8),
        (64, 256): (0.044, 0.041, 3.4), (64, 1024): (0.041, 0.032, 3.8),
        (256, 16): (0.121, 0.045, 3.7), (256, 64): (0.065, 0.048, 2.6),
        (256, 256): (0.042, 0.019, 4.6), (256, 1024): (0.03, 0.017, 5.2),
    },
    "kept": {
        (16, 16): (0.13, 0.068, 6.4), (16, 64): (0.1, 0.053, 5.8), (16, 128): (0.1, 0.053, 5.5),
        (64, 16): (0.11, 0.058, 5.0), (64, 64): (0.081, 0.054, 4.5),
        (64, 128): (0.077, 0.047, 4.6), (256, 16): (0.089, 0.055, 4.6),
        (256, 64): (0.077, 0.05, 4.3), (256, 128): (0.076, 0.04, 3.6),
    },
}
_CPU_NUMBA = {("numba", "one", 16): (0.0522, 10.2), ("numba", "one", 32): (0.0852, 3.83),
              ("numba", "one", 64): (0.0396, 4.28), ("numba", "tiles", 16): (0.173, 2.74),
              ("numba", "tiles", 32): (0.101, 2.74), ("numba", "tiles", 64): (0.0502, 3.48),
              ("queries", "one", 16): (158.0, 1.17), ("queries", "one", 32): (65.5, 3.17),
              ("queries", "one", 64): (75.5, 5.86), ("queries", "tiles", 16): (49.1, 2.77),
              ("queries", "tiles", 32): (52.5, 3.81), ("queries", "tiles", 64): (99.4, 3.37),
              ("rows", "one", 16): (0.00863, 1000.0), ("rows", "one", 32): (4.0, 1.4),
              ("rows", "one", 64): (4.0, 1.4), ("rows", "tiles", 16): (0.0, 1.0),
              ("rows", "tiles", 32): (0.0, 1.0), ("rows", "tiles", 64): (0.0, 1.0),
              ("loose", "one", 16): (1.57, 1.0), ("loose", "one", 32): (0.431, 1.0),
              ("loose", "one", 64): (1.42, 1.0), ("loose", "tiles", 16): (1.57, 1.0),
              ("loose", "tiles", 32): (0.431, 1.0), ("loose", "tiles", 64): (1.42, 1.0),
              ("numba", "span", 16): (0.175, 4.34), ("numba", "span", 32): (0.118, 3.52),
              ("numba", "span", 64): (0.0717, 3.69), ("queries", "span", 16): (34.9, 3.36),
              ("queries", "span", 32): (28.3, 7.47), ("queries", "span", 64): (61.0, 4.35),
              ("rows", "span", 16): (28.6, 2.59), ("rows", "span", 32): (29.0, 2.26),
              ("rows", "span", 64): (29.0, 2.26), ("loose", "span", 16): (1.57, 1.0),
              ("loose", "span", 32): (0.431, 1.0), ("loose", "span", 64): (1.42, 1.0),
              **{("plain", lanes, d): (1.4, 4.0) for lanes in NUMBA_LANES for d in NUMBA_DIMS}}
_CPU_OTHER = {"launch/numba": (0.14, 0.0, 2.75), "launch/sdpa": (0.09, 0.0, 2.6),
              "launch/terms": (0.09, 0.0, 2.8), "launch/kernel": (0.011, 0.0, 2.4),
              "launch/part": (0.1, 0.0, 2.4),
              "copy": (0.0, 0.126, 2.0), "roll": (0.0, 0.137, 2.0), "gather": (0.0, 0.06, 4.4),
              "band": (0.0, 0.61, 1.0),
              "fill": (0.0, 0.075, 1.0), "scan": (0.0, 0.68, 1.0), "merge": (0.0, 0.97, 2.4),
              "fault": (0.0, 0.42, 1.0), "mask": (0.0, 0.1, 2.0),
              "blockmask": (0.0, 0.3, 2.2), "spill": (0.0, 0.25, 1.5)}


def _default_cpu(name: str) -> Rate:
    parts = name.split("/")
    if parts[0] == "attend":
        m, n = map(int, parts[2].split("x"))
        ns16, ns64, factor = (_CPU_ATTEND.get(parts[1]) or _CPU_ATTEND["matmul"])[m, n]
        return Rate(0.0, ns16 if parts[3] == "d16" else ns64, factor)
    if parts[0] in NUMBA_COUNTS:
        ns, factor = _CPU_NUMBA[parts[0], parts[1], int(parts[2][1:])]
        return Rate(0.0, ns, factor)
    return Rate(*_CPU_OTHER[name])


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
        more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
        raise ValueError(f"no rate for primitives {missing[:4]}{more}")
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
            same = key.split("|", 1)[1]
            stale = [k for k in stored if isinstance(k, str) and k != key
                     and k.split("|", 1)[-1] == same]
            if stale:
                warnings.warn(f"patterngen: calibration file {path} holds rates of another "
                              f"version of the cost model ({stale[0].split('|')[0]}, this is "
                              f"v{VERSION}); measuring again.", stacklevel=2)
                stored = {k: v for k, v in stored.items() if k not in stale}
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


def run_times(fn, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``fn`` after a warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _best_ms(fn, repeats: int = 7) -> float:
    """Best of ``repeats`` after a warm-up: on shared cores the fastest run is the one least
    disturbed by other tenants, and the rates are meant to compare executors, not tenants."""
    return 1e3 * min(run_times(fn, repeats))


#: units (pairs x head_dim) of one attention micro-benchmark: about a millisecond
_ATTEND_UNITS = 1 << 20

#: score elements, at least, of a matmul-path benchmark's call: torch's CPU elementwise ops
#: and reductions over the scores (the row maxima, the log-sum-exp's) split their work in
#: grains of 32768 elements (ATen's ``GRAIN_SIZE``), so a call with fewer runs them on one
#: thread. At head_dim 64, 2^20 units are 4 problems of 64 x 64 (16384 scores): two threads
#: ran them 1.04x faster than one (a quiet calibration's rates: 0.129 and 0.134 ns), 32
#: problems 1.7x, as the planned calls of hundreds of problems run; so on the kept path,
#: whose softmax and its backward split the same way (a lone dense term's training, W3 and
#: MaxViT's windows of 49 x 49, measured 0.61-0.78 of its price at two threads on classes of
#: 16384 scores)
MATMUL_SCORES = 1 << 16


def attend_problems(kernel: str, rows: int, keys: int, head_dim: int) -> int:
    """Problems in the benchmark of an attention shape class: about ``_ATTEND_UNITS`` units
    (a problem of one row counted as four), on the matmul and kept paths at least
    :data:`MATMUL_SCORES` score elements where a row has several keys (a global key token's
    rows of one key hold few scores in the calls too; 4x their problems measured 1.8-2x
    dearer per unit at two threads, q and the output outgrowing the caches)."""
    problems = max(1, _ATTEND_UNITS // (max(rows, 4) * keys * head_dim))
    if kernel in ("matmul", "kept") and keys > 1:
        problems = max(problems, -(-MATMUL_SCORES // (rows * keys)))
    return problems


#: runs of each micro-benchmark after its warm-up, forward and forward+backward; the least
#: disturbed one is kept
_REPEATS = 3

#: passes over every micro-benchmark, each keeping its best: a machine's state (another
#: tenant, where the allocator's pages land) changes over seconds, so one pass of 2.5 s gave
#: rates 1.3-1.8x apart from one calibration to the next on an idle 2-core machine (AVX-512,
#: two threads; the fused kernel's 64 x 1024 and 64 x 256 problems), three passes 1.03-1.14x
PASSES = 3


class _Progress:
    def __init__(self, device: str, dtype: str):
        self.where, self.start = f"{device}/{dtype}", time.perf_counter()

    def __call__(self, what: str):
        if sys.stderr.isatty():  # one line, rewritten; a log gets the summary only
            print(f"\rpatterngen: calibrating {self.where}: {what:<44}", end="",
                  file=sys.stderr, flush=True)

    def done(self):
        print(f"\rpatterngen: calibrated {self.where} in "
              f"{time.perf_counter() - self.start:.1f} s" + " " * 44, file=sys.stderr)


@dataclass
class _Bench:
    """One micro-benchmark: ``forward()`` and ``both()`` (forward and backward), and how
    many units of work they do; ``best`` keeps the fastest ``(forward, both)`` ms seen."""

    name: str
    forward: object
    both: object
    units: int
    best: list = field(default_factory=lambda: [math.inf, math.inf])
    #: a numba bench's units, queries, key rows, loose keys and plain rows
    #: (:data:`NUMBA_COUNTS`)
    counts: tuple = ()

    def run(self, repeats: int) -> None:
        self.best[0] = min(self.best[0], _best_ms(self.forward, repeats))
        self.best[1] = min(self.best[1], _best_ms(self.both, repeats))


def _problems(p: int, m: int, n: int, d: int, device, dt) -> tuple:
    """Random q, k, v and an output gradient of ``p`` problems of ``m`` rows and ``n`` keys."""
    import torch

    return tuple(torch.randn(1, p, rows, d, device=device, dtype=dt) for rows in (m, n, n, m))


def _fused_bench(q, k, v, dout, mask=None) -> tuple:
    """``(forward, both)`` of the fused kernel on q, k, v (:func:`_problems`), with an
    additive ``mask`` or none."""
    from .backends import dense

    def fwd():
        return dense.fused_forward(q, k, v, mask, 0.1)

    def both():
        out, lse = fwd()
        dense.fused_backward(q, k, v, out, lse, dout, mask, 0.1)
    return fwd, both


def _attend_benches(device, dt) -> list:
    import torch

    from .backends import dense

    threads = torch.get_num_threads() if device == "cpu" else 1
    out = []
    for kernel, keys in ATTEND_KEYS.items():
        if kernel != "fused" and device != "cpu":
            continue  # the matmul paths run on CPU only
        for m in ATTEND_ROWS[kernel]:
            for n in keys:
                for d in ATTEND_DIMS:
                    # a problem of one row costs several times a unit of 16 rows: a quarter
                    # of the problems keeps its benchmark near the others' time (the rate
                    # the same within 10%; rows of one key, measured so, came out 1.3-1.5x
                    # dearer per unit, their fixed cost per call no longer small beside them)
                    p = attend_problems(kernel, m, n, d)
                    if kernel != "fused":
                        q, k, v, dout = _problems(p, m, n, d, device, dt)
                    if kernel == "kept":
                        fwd, both = _kept_bench(q, k, v, dout)
                    elif kernel == "matmul":
                        def fwd(q=q, k=k, v=v):
                            return dense.softmax_attention(q, k, v, None, 0.1, True)

                        def both(q=q, k=k, v=v, dout=dout, fwd=fwd):
                            dense.matmul_backward(q, k, v, *fwd(), dout, None, 0.1)
                    else:
                        fwd, both = _fused_bench(*_problems(p, m, n, d, device, dt))
                        if p < threads:
                            # its backward factor where the backward, which splits its work
                            # by problem alone, has a problem for every thread
                            out.append(_Bench(
                                f"{attend_name(kernel, m, n, d)}#threads",
                                *_fused_bench(*_problems(threads, m, n, d, device, dt)),
                                threads * m * n * d))
                    out.append(_Bench(attend_name(kernel, m, n, d), fwd, both, p * m * n * d))
    if device == "cpu":  # kept's fixed cost of a call (:func:`_solve_kept`)
        out.append(_Bench("attend/kept#call", *_kept_bench(*_problems(1, 1, 1, 1, device, dt)),
                          1))
    return out


def _kept_bench(q, k, v, dout):
    """A dense term alone through torch's autograd (``DenseTerm.autograd_forward``): without
    gradients, scores, softmax and a bmm; with them, :class:`KeptAttention` and its backward."""
    import torch

    from .backends import dense

    grads = [t.clone().requires_grad_() for t in (q, k, v)]
    p, m, n, d = q.shape[1], q.shape[2], k.shape[2], q.shape[3]

    def fwd():
        scores = dense.score_matrix(q, k, None, 0.1).view(p, m, n)
        return torch.softmax(scores, dim=-1) @ v.reshape(p, n, d)

    def both():
        with torch.enable_grad():
            dense.KeptAttention.apply(*grads, None, None, 0.1, 1).backward(dout)

    return fwd, both


def _pattern_bench(name, attn, grid, d, device, dt, units=None, heads=2,
                   key_grid=None) -> _Bench:
    """A compiled attention on ``(1, heads, *grid, d)`` queries (keys on ``key_grid``, default
    ``grid``), inference and training."""
    import torch

    q, k, v = (torch.randn(1, heads, *shape, d, device=device, dtype=dt).requires_grad_()
               for shape in (grid, key_grid or grid, key_grid or grid))

    def fwd():
        with torch.no_grad():
            return attn(q, k, v)

    def both():
        with torch.enable_grad():  # rates may be wanted inside no_grad (pg.profile)
            attn(q, k, v).sum().backward()

    return _Bench(name, fwd, both, units or 1)


#: the numba calibration's patterns: ``(lanes, pattern, grid, key grid, head_dims)``, each a
#: millisecond or a few. One query at a time, 1-D windows of 9 to 200 keys separate the cost
#: per pair, per query and per loose key (a row longer than the key buffer goes key by key),
#: 2-D neighbourhoods (five and nine rows per query) the cost per row, a column (64 rows of
#: one key per query) the cost per plain row; tiles take 1-D windows
#: of 32 to 128 keys, one row per tile (a tile's rows, measured on 8x8 blocks, cost nothing
#: beside their pairs and queries); tiles spanning rows take 2-D windows of 3 and 7 keys over
#: a key grid at upsampling ratio 4 (16 queries over one key, 3 or 7 rows per tile) and of 5
#: at ratio 2 (8-wide tiles over 4 keys, 2 rows), which separate their pairs, queries and
#: rows. Patterns of one shape share a compiled module (the grid and the extents are the
#: kernels' arguments), and the specialised kernel (head_dim 64) takes the 1-D windows and
#: ratio 4 only, so a calibration compiles nine modules.
NUMBA_CASES = (
    (0, ("window", 9), (8192,), None, NUMBA_DIMS),
    (0, ("window", 33), (4096,), None, NUMBA_DIMS),
    (0, ("window", 64), (2048,), None, NUMBA_DIMS),
    (0, ("window", 200), (1024,), None, NUMBA_DIMS),
    (0, ("window", 5), (64, 64), None, NUMBA_DIMS[:2]),
    (0, ("window", 9), (48, 48), None, NUMBA_DIMS[:2]),
    (0, ("axis", 0), (64, 64), None, NUMBA_DIMS[:2]),
    (8, ("window", 32), (4096,), None, NUMBA_DIMS),
    (8, ("window", 64), (2048,), None, NUMBA_DIMS),
    (8, ("window", 128), (2048,), None, NUMBA_DIMS),
    (4, ("window", 3), (32, 32), (8, 8), NUMBA_DIMS),
    (4, ("window", 7), (32, 32), (8, 8), NUMBA_DIMS),
    (8, ("window", 5), (32, 32), (16, 16), NUMBA_DIMS[:2]),
)
#: heads of the numba calibration's inputs: the backward's dk and dv need no copy per split
#: at two threads (``NumbaBackend.backward_numpy``), as in most calls
NUMBA_HEADS = 4


def _numba_benches(device, dtype, dt) -> list:
    """The numba kernels on :data:`NUMBA_CASES`, each bench with its counts, and their call on
    a grid too small for anything else to count."""
    from . import spec
    from .backends.numba.counts import kernel_counts
    from .compile import compile as compile_pattern

    out = []
    for i, (lanes, (kind, *args), grid, key_grid, dims) in enumerate(NUMBA_CASES):
        attn = compile_pattern(getattr(spec, kind)(*args), grid, key_grid=key_grid,
                               backend="numba", device=device, dtype=dtype, lanes=lanes)
        (counts,) = kernel_counts(attn.ir, attn.shape, attn.lanes, attn.shared, attn.groups)
        plan = "span" if attn.groups else NUMBA_LANES[bool(lanes)]
        for d in dims:
            bench = _pattern_bench(f"{numba_name(plan, d)}#{i}", attn, grid, d, device, dt,
                                   NUMBA_HEADS * sum(attn.executed_pairs) * d, NUMBA_HEADS,
                                   key_grid)
            bench.counts = (bench.units, *(NUMBA_HEADS * n for n in (
                counts.queries, counts.rows, counts.loose, counts.plain)))
            out.append(bench)
    tiny = compile_pattern(spec.window(5), (5, 5), backend="numba", device=device, dtype=dtype,
                           lanes=0)  # the 2-D neighbourhood's module: no compile of its own
    out.append(_pattern_bench("launch/numba", tiny, (5, 5), 16, device, dt, heads=NUMBA_HEADS))
    return out


def nonnegative_fit(rows: list, times: list, fixed: dict) -> list:
    """Least squares ``times ~ rows @ x`` with ``x >= 0``: a column whose coefficient comes out
    negative (or that no row exercises) is set to 0 and the rest fitted again; ``fixed``
    ``{column: value}`` holds those columns at a value taken elsewhere."""
    import numpy as np

    a, t = np.array(rows, dtype=float), np.array(times, dtype=float)
    x = np.zeros(a.shape[1])
    for c, value in fixed.items():
        x[c] = value
    t = t - a @ x
    free = [c for c in range(a.shape[1]) if c not in fixed and a[:, c].any()]
    while free:
        sol = np.linalg.lstsq(a[:, free], t, rcond=None)[0]
        if (sol >= 0).all():
            x[free] = sol
            break
        free = [c for c, v in zip(free, sol) if v > 0]
    return list(x)


def _separable(rows: list) -> bool:
    """Whether the points ``rows`` tell every count they exercise from the others (1-D windows
    alone visit one row per query: rows and queries go together)."""
    import numpy as np

    a = np.array(rows, dtype=float)
    a = a[:, a.any(axis=0)]
    return np.linalg.matrix_rank(a / a.max(axis=0)) == a.shape[1]


def _solve_numba(table, benches, best) -> None:
    """Per lane plan and head_dim, ns per pair and head_dim element, per query, per row, per
    loose key and per row of one key (plain), fitted to the points less the call (forward, then
    forward + backward, where the loose keys keep their forward cost: the backward buffers
    every key alone, a cost its pairs carry). Where a head_dim's points cannot separate the
    rows (the specialised kernel's, on 1-D windows and ratio 4 only; the tiles'), head_dim
    32's rates of them are kept, else none; tiles, spanning rows or not, take the loose keys'
    and plain rows' rates of the one-query kernels (their lane-by-lane terms run the same
    loops)."""
    calls = best["launch/numba"]
    solved = {}
    for lanes in NUMBA_LANES:
        for d in NUMBA_DIMS:
            points = [b for b in benches if b.name.startswith(numba_name(lanes, d) + "#")]
            times = [[max(best[b.name][p] - calls[p], 0.1 * best[b.name][p]) * 1e6
                      for b in points] for p in (0, 1)]
            rows = [b.counts for b in points]
            fixed = {}
            if not _separable(rows):  # the rows' loops, the same at every head_dim, or none
                other = solved.get((lanes, NUMBA_DIMS[1]), ([0.0] * 5, [0.0] * 5))
                fixed = {2: other, 4: other}
            if lanes != "one":
                fixed[3] = fixed[4] = solved["one", d]
            fwd = nonnegative_fit(rows, times[0], {c: s[0][c] for c, s in fixed.items()})
            # the backward buffers every key alone: the loose keys cost their forward only
            both = nonnegative_fit(rows, times[1], {c: s[1][c] for c, s in fixed.items()}
                                    | {3: fwd[3]})
            solved[lanes, d] = fwd, both
            for what, f, w in zip(NUMBA_COUNTS, fwd, both):
                f = f or w / 1000  # a cost of the backward alone, as a factor of the forward's
                table[numba_name(lanes, d, what)] = Rate(0.0, f, max(w / f, 1.0) if f else 1.0)


#: the term-wise plans whose difference prices a merged part: ``(dense parts, pattern)`` on
#: a 4x4 grid (criss-cross's row and column; two axes and a global token's key and query)
PART_CASES = ((2, (("criss_cross",),)),
              (4, (("axis", 0), ("axis", 1), ("global_tokens", [(0, 0)]))))


def _solve_parts(table, best) -> None:
    """``launch/part`` from the plans of :data:`PART_CASES`: the difference of their times
    per part, less a kernel launch (each part's own op), at least 0."""
    (low, small), (high, large) = ((n, best[f"launch/part#{n}"]) for n, _ in PART_CASES)
    kernel = table["launch/kernel"]
    fwd, both = (max((b - a) / (high - low) - kernel.call_ms * f, 0.0) for a, b, f in
                 zip(small, large, (1.0, kernel.backward_factor)))
    table["launch/part"] = Rate(fwd, 0.0, max(both / fwd, 1.0) if fwd else 1.0)


#: bytes the sources of the copies, gathers and scans the calibration times rotate through
#: (:class:`_Sources`): each run reads data the others have pushed out of the caches, as a
#: call reads q, k and v after its own traffic. W4's token-order copies, timed inside its
#: sdpa inference at one thread, ran at 0.13-0.24 ns per byte; the same copy of a source just
#: read at 0.10-0.11, of one of 16 sources of 8 MiB in turn at 0.17-0.20
COLD_BYTES = 64 << 20


class _Sources:
    """Tensors of a given shape, each a view into the next part of one random buffer of
    :data:`COLD_BYTES`, in turn: what one run reads, the runs after it do not."""

    def __init__(self, device, dt):
        import torch

        self.pool = torch.randn(COLD_BYTES // dt.itemsize, device=device, dtype=dt)
        self.at = 0

    def __call__(self, shape):
        n = math.prod(shape)
        if self.at + n > self.pool.numel():
            self.at = 0
        self.at += n
        return self.pool[self.at - n:self.at].view(shape)


def _overhead_benches(device, dtype, dt) -> list:
    """The fixed cost of a call of each path, on a grid so small that nothing else counts;
    one kernel launch; a copy's rate per byte and the merge's per element."""
    import torch

    from . import spec
    from .backends import dense
    from .backends.inputs import flat_rows, non_finite, select_rows
    from .backends.merge import merge
    from .compile import compile as compile_pattern

    q1 = torch.randn(1, 1, 4, 16, device=device, dtype=dt)
    out = [_Bench("launch/kernel", lambda: dense.fused_forward(q1, q1, q1, None, 0.1),
                  lambda: dense.fused_backward(q1, q1, q1, *dense.fused_forward(
                      q1, q1, q1, None, 0.1), q1, None, 0.1), 1)]
    for path, options in (("sdpa", dict(backend="sdpa")),
                          ("terms", dict(backend="auto", strategy="terms", terms="dense",
                                         rates=Rates.default(device)))):
        try:
            attn = compile_pattern(spec.block(2), (4, 4), device=device, dtype=dtype,
                                   **options)
        except PatternError as e:
            log.info("calibration: %s cannot run (%s); keeping its default", path, e)
            continue
        out.append(_pattern_bench(f"launch/{path}", attn, (4, 4), 16, device, dt))
    # plans of two and of four merged dense parts: their difference is two parts' fixed cost
    for parts, terms in PART_CASES:
        pattern = functools.reduce(operator.or_, (getattr(spec, kind)(*args)
                                                  for kind, *args in terms))
        attn = compile_pattern(pattern, (4, 4), device=device, dtype=dtype, backend="auto",
                               strategy="terms", terms="dense", rates=Rates.default(device))
        out.append(_pattern_bench(f"launch/part#{parts}", attn, (4, 4), 16, device, dt))
    source = _Sources(device, dt)
    # what the executors copy: rows of head_dim elements moved whole (a dense term's view of
    # Swin's windows here), 3-4x faster per byte than a transpose of single elements
    windows = (8, 4, 8, 7, 8, 7, 32)
    copy = _Bench("copy", lambda: source(windows).permute(0, 1, 2, 4, 3, 5, 6).contiguous(),
                  lambda: None, math.prod(windows) * dt.itemsize)
    # a rolled dense term's view (DenseTerm._select): each row of (heads, tokens,
    # head_dim) gathered once, by the index of Swin's shifted windows on 56x56 into all the
    # heads' rows at once (nothing is read twice from cache, as sdpa's overlapping windows
    # are: 0.137-0.142 ns per byte at one thread, the gather's 0.060-0.074)
    shift = (torch.arange(56, device=device) + 3) % 56
    rolled = (shift[:, None] * 56 + shift).view(8, 7, 8, 7).transpose(1, 2).reshape(-1)
    tokens = (4, 56 * 56, 32)
    rows_of = flat_rows(rolled, 4, 56 * 56)
    roll = _Bench("roll", lambda: select_rows(source(tokens), rolled, flat=rows_of),
                  lambda: None, math.prod(tokens) * dt.itemsize)
    # sdpa's gathers: rows of a (heads, tokens, head_dim) tensor by token index, overlapping
    # windows of them; their backward adds the rows back
    rows = (4, 4096, 32)
    index = (torch.arange(64, device=device)[:, None] * 64
             + torch.arange(448, device=device)).clamp(max=4095).reshape(-1)

    def gathered(src=None):
        return select_rows(source(rows) if src is None else src, index)

    def gathered_both():
        with torch.enable_grad():
            gathered(source(rows).requires_grad_()).sum().backward()

    gather = _Bench("gather", gathered, gathered_both,
                    4 * index.numel() * 32 * dt.itemsize)
    # k and v, checked for non-finite values
    scan = _Bench("scan", lambda: non_finite(source(rows), source(rows)), lambda: None,
                  2 * math.prod(rows))
    # a dense term's mask added to its scores on the matmul paths: one pass over them
    scores = torch.zeros(16, 256, 256, device=device, dtype=dt)
    holes = torch.zeros(1, 256, 256, device=device, dtype=dt)
    holes[..., ::17] = -math.inf
    mask = _Bench("mask", lambda: scores.add_(holes), lambda: None, scores.numel())
    # a gradient of a whole input, new (its pages are touched for the first time) and added
    grad = torch.randn(1 << 22, device=device, dtype=dt)
    fill = _Bench("fill", lambda: torch.zeros_like(grad).add_(grad), lambda: None,
                  2 * grad.numel() * grad.element_size())
    # the backward of sdpa's bands (60 windows of 4 key blocks of 64, one block apart: a view,
    # free forward); the sum's backward is a small share of it
    keys = torch.randn(4, 4096, 32, device=device, dtype=dt, requires_grad=True)

    def banded():
        with torch.enable_grad():
            keys.unfold(1, 256, 64)[:, :60].transpose(-1, -2).reshape(
                4, 60, 256, 32).sum().backward()

    band = _Bench("band", banded, lambda: None, 4 * 60 * 256 * 32 * keys.element_size())
    # a buffer larger than the C allocator keeps (executor.RESIDENT's reasons), so mapped
    # afresh on each call: what a large backward's gradients cost beyond a warm fill
    fresh = 1 << 24
    fault = _Bench("fault", lambda: torch.zeros(fresh, device=device, dtype=torch.float32),
                   lambda: None, 4 * fresh)
    masked = _blockmask_benches(device, dt)
    parts = [(torch.randn(1, 4, 1024, 32, device=device, dtype=dt).requires_grad_(),
              torch.randn(1, 4, 1024, device=device)) for _ in range(2)]

    def merged():
        with torch.no_grad():
            merge(parts)

    def merged_both():
        with torch.enable_grad():
            merge(parts)[0].sum().backward()

    return out + [copy, roll, gather, band, fill, scan, fault, mask, *masked,
                  _Bench("merge", merged, merged_both, 2 * 4 * 1024 * 32)]


#: the fused kernel's problems whose per-problem mask :func:`_solve_blockmask` prices:
#: ``(problems, rows, keys, head_dim)``, sdpa's query blocks of 64 over four key blocks; the
#: masks (8 MiB) outgrow a core's L2 cache, as a gathered group's do (4 x 64 blocks of 64 x
#: 960 read per head on criss-cross's 64x64 grid, 15 MiB). A mask's cost per element does
#: not depend on head_dim, the kernel's does: at 16 the mask is a fifth of the time, and four
#: calibrations at one thread gave 0.16-0.20 ns (0.13-0.22 at head_dim 32)
BLOCKMASK_CASE = (128, 64, 256, 16)


def _blockmask_benches(device, dt) -> list:
    """The fused kernel on :data:`BLOCKMASK_CASE` without a mask and with one mask per problem
    (a quarter of each row's keys masked out), forward and backward."""
    import torch

    p, m, n, d = BLOCKMASK_CASE
    inputs = _problems(p, m, n, d, device, dt)
    mask = torch.zeros(1, p, m, n, device=device, dtype=dt)
    mask[..., : n // 4] = float("-inf")
    return [_Bench(name, *_fused_bench(*inputs, add), p * m * n)
            for name, add in (("blockmask#plain", None), ("blockmask#masked", mask))]


def _difference(base, more, units: int) -> Rate:
    """ns per unit of the time ``more`` takes beyond ``base`` (``(forward, both)`` ms each),
    at least 0, and its backward factor."""
    fwd, both = (max(b - a, 0.0) * 1e6 / units for a, b in zip(base, more))
    return Rate(0.0, fwd, max(both / fwd, 1.0) if fwd else 1.0)


def _solve_kept(table, best) -> None:
    """The kept path's backward factors less its fixed cost of a backward (what a problem of
    one row, key and element adds to its forward): autograd's, 0.15-0.2 ms at one thread, a
    fifth to a half of a class's forward+backward, made the factors 4-6.5 where problems of
    eight times the units measured 3.3-3.7. That cost is the term-wise path's call
    (``launch/terms``, measured with it). The forward's, 0.01-0.03 ms, stays in the rates."""
    fwd0, both0 = best["attend/kept#call"]
    for name, (fwd, both) in best.items():
        if name.startswith("attend/kept/"):
            table[name] = Rate(0.0, table[name].pair_ns,
                               max(1.0, (both - (both0 - fwd0)) / fwd))


def _solve_fused_backward(table, best) -> None:
    """The backward factor of each fused class benchmarked on fewer problems than threads,
    from its benchmark with one problem a thread: torch's CPU fused kernel splits its forward
    by problem and block of 32-256 query rows, its backward by problem alone, so a class of
    one problem ran its backward on one of two threads (area4's 16 problems of 400 x 400
    measured 0.61-0.77 of their forward+backward's price at two threads). The forward rate
    stays the class's own."""
    for name, (fwd, both) in best.items():
        base, _, point = name.partition("#")
        if point == "threads" and base in table:
            table[base] = Rate(0.0, table[base].pair_ns, max(both / fwd, 1.0))


def _solve_blockmask(table, best) -> None:
    """``blockmask``: ns per mask element the fused kernel reads (per problem and head), the
    masked benchmark's time less the plain one's, forward and both ways."""
    table["blockmask"] = _difference(best["blockmask#plain"], best["blockmask#masked"],
                                     math.prod(BLOCKMASK_CASE[:3]))


#: the kept path's problems whose scores outgrow the caches (:func:`_solve_spill`):
#: ``(rows, keys, head_dim, problems within, problems beyond)``, 4 and 16 MiB of float32
#: scores around ``call.CACHE_BYTES`` (twice the problems for 2-byte scores,
#: :func:`spill_problems`); head_dim 16 keeps the GEMMs' share of the time small
SPILL_CASE = (64, 64, 16, 256, 1024)


def spill_problems(itemsize: int) -> tuple:
    """:data:`SPILL_CASE`'s problems within and beyond the caches for scores of ``itemsize``
    bytes: as many bytes of scores as float32's, at least (bfloat16's 1024 problems would
    fill the caches and spill nothing)."""
    return tuple(p * max(1, 4 // itemsize) for p in SPILL_CASE[3:])

#: the spill's backward factor, fixed: whole calls' backward added 1.4-1.7x the forward's
#: time beyond the prediction (MaxViT's grid, 56x56 batch 8, one and two threads, priced
#: with the kept path's backward factors that :func:`_solve_kept` now lowers), where
#: the kept path's own backward on :data:`SPILL_CASE` scattered 1.0-8x from run to run (page
#: faults of its new buffers among it, priced as ``fault``); the benchmarks run forward only,
#: 0.2 s instead of 0.75 at one thread
SPILL_BACKWARD = 1.5


def _spill_benches(device, dt) -> list:
    """The kept path's forward (:func:`_kept_bench`) on :data:`SPILL_CASE`'s fewer and more
    problems, on CPU (the matmul paths run there only)."""
    if device != "cpu":
        return []
    m, n, d = SPILL_CASE[:3]
    counts = spill_problems(dt.itemsize)
    return [_Bench(name, _kept_bench(*_problems(p, m, n, d, device, dt))[0], lambda: None,
                   p * m * n * d) for name, p in zip(("spill#within", "spill#beyond"), counts)]


def _solve_spill(table, best, dtype: str) -> None:
    """``spill``: ns per byte of scores beyond the caches, the forward time of the more
    problems less the fewer ones' scaled to their count."""
    m, n = SPILL_CASE[:2]
    itemsize = ITEMSIZE.get(dtype, 4)
    few, many = spill_problems(itemsize)
    within = [t * many / few for t in best["spill#within"]]
    rate = _difference(within, best["spill#beyond"], spilled(many, m, n, itemsize))
    table["spill"] = Rate(0.0, rate.pair_ns, SPILL_BACKWARD)


def measure(device: str = "cpu", dtype: str = "float32", only: tuple = ()) -> Rates:
    """Measure the primitives on ``device`` with ``dtype``: dense attention at each shape
    class on each kernel, the numba kernels per lane plan and head_dim, each path's call
    overhead, copies and the merge; each the best of ``_REPEATS`` runs after a warm-up. What
    cannot run there keeps its default rate.

    Args:
        only: measure just the groups of primitives (attention; the numba kernels; calls,
            copies and merges) that hold a name starting with one of these (``"launch/sdpa"``);
            the others keep their defaults.
    """
    import torch

    table = dict(Rates.default(device).executors)
    dt = getattr(torch, dtype)
    progress = _Progress(device, dtype)
    load = _load()
    # each group of benchmarks, and the names it measures (built only when one is wanted)
    groups = ((("attend/",), lambda: _attend_benches(device, dt)),
              (("spill",), lambda: _spill_benches(device, dt)),
              (tuple(f"{what}/" for what in NUMBA_COUNTS) + ("launch/numba",),
               lambda: _numba_benches(device, dtype, dt)),
              (("launch/kernel", "launch/sdpa", "launch/terms", "launch/part", "copy", "roll",
                "gather", "band", "fill", "scan", "merge", "fault", "mask", "blockmask"),
               lambda: _overhead_benches(device, dtype, dt)))
    benches = []
    with torch.no_grad():
        for names, make in groups:
            if only and not any(n.startswith(o) or o.startswith(n) for n in names
                                for o in only):
                continue
            try:
                benches += make()
            except PatternError as e:
                log.info("calibration: %s cannot run (%s); keeping the defaults", names, e)
        _start_numba_threads(benches, torch)
        for p in range(PASSES):
            for i, b in enumerate(benches):
                progress(f"pass {p + 1}/{PASSES}: {b.name} ({i + 1}/{len(benches)})")
                b.run(_REPEATS)
        # the block mask's and the spill's rates are differences of two benchmarks a few
        # percent apart: two more passes of each pair, alternating, keep one disturbed run
        # from making them 0 (one quiet calibration at one thread measured the block mask's 0
        # after one pass, 0.13-0.25 ns alone)
        pairs = [b for b in benches if b.name.startswith(("blockmask#", "spill#"))]
        for b in 2 * pairs:
            b.run(_REPEATS)
    best = {b.name: b.best for b in benches}
    units = {b.name: b.units for b in benches}
    # a copy's backward copies the gradient back; a scan has none; a fill and a band are
    # backward work already
    fixed = {"copy": 2.0, "roll": 2.0, "scan": 1.0, "fill": 1.0, "band": 1.0, "fault": 1.0,
             "mask": 2.0}
    for name, (fwd, both) in best.items():
        factor = max(both / fwd, 1.0)
        if name.startswith("launch/"):
            table[name] = Rate(fwd, 0.0, factor)
        elif "#" in name:
            continue  # a point solved with others (_solve_numba, _solve_blockmask, ...)
        else:
            table[name] = Rate(0.0, fwd * 1e6 / units[name], fixed.get(name, factor))
    if "launch/numba" in best:
        _solve_numba(table, benches, best)
    if all(f"launch/part#{n}" in best for n, _ in PART_CASES):
        _solve_parts(table, best)
    if "attend/kept#call" in best:
        _solve_kept(table, best)
    _solve_fused_backward(table, best)
    if "blockmask#masked" in best:
        _solve_blockmask(table, best)
    if "spill#beyond" in best:
        _solve_spill(table, best, dtype)
    progress.done()
    if device == "cpu":
        _warn_if_busy(max(load, _load()), torch.get_num_threads())
    return Rates(table, "measured")


def _start_numba_threads(benches, torch) -> None:
    """Start numba's threading layer before anything is timed, keeping torch's thread count.

    The first numba backward of a process starts numba's OpenMP layer, which sets the team
    torch shares to ``NUMBA_NUM_THREADS`` (default: every core): unless that was 1, a
    calibration at one thread on a 2-core machine measured every benchmark after it (each
    pass's dense kernels, the block mask, copies, gathers, scans) at two threads (the block
    mask's rate 0.09-0.10 ns per element against 0.14-0.23 at one thread).
    """
    threads = torch.get_num_threads()
    for b in benches:
        if b.name == "launch/numba":
            b.both()
    torch.set_num_threads(threads)


def _load() -> float:
    """The 1-minute load average (0 where the system does not report one)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


def _warn_if_busy(load: float, threads: int) -> None:
    """Warn when other processes competed for the cores while the rates were measured: with
    two thread teams on two cores a thread waiting at a barrier loses a whole time slice, and
    a calibration on the project's machine under load 2.5-3.5 priced the numba call 60x its quiet
    time. The load counts this process's own threads too, hence half a core of slack."""
    cores = os.cpu_count() or 1
    if load > cores + 0.5:
        warnings.warn(f"patterngen: calibrated while the machine was busy (load average "
                      f"{load:.1f} on {cores} cores, {threads} threads measuring): the rates "
                      f"may be off by several times; calibrate.rates(refresh=True) on a quiet "
                      f"machine measures again.", stacklevel=3)
