"""Measure where the model is unsure: time the close candidates once, keep the winner on disk.

With ``pg.compile(..., backend="auto", autotune=True)``, a call whose plan had other
strategies predicted within :data:`WITHIN` of the chosen one (the band the cost model's
predictions are held to, [0.67, 1.5] of measured) times each of them on the call's own inputs
(forward, or forward and backward when gradients are needed; a warm-up, then the median of
:data:`REPEATS`) and runs the fastest, as ``torch.backends.cudnn.benchmark`` and Triton's
``autotune`` do. The winner is kept in ``autotune.json`` in the patterngen cache directory,
keyed by the pattern, the grid, the call description, the torch version and the thread count,
so a later process times nothing. The plan's prediction is unchanged: ``print(attn.plan)``
still shows what the model expected.
"""

from __future__ import annotations

import json
import statistics
import warnings

from . import trust

__all__ = ["WITHIN", "REPEATS", "candidates", "time_ms", "key", "cached", "store", "path"]

#: strategies predicted within this factor of the chosen one are timed
WITHIN = 1.5
#: timed calls per candidate, after one warm-up
REPEATS = 3


def candidates(plan) -> list[str]:
    """The strategies of ``plan`` predicted within :data:`WITHIN` of its chosen one, the
    chosen first."""
    close = [(ms, name) for name, ms in plan.options.items()
             if isinstance(ms, float) and ms <= WITHIN * plan.predicted_ms]
    return [name for _, name in sorted(close, key=lambda c: (c[1] != plan.strategy, c[0]))]


def time_ms(name: str, fn) -> float:
    """Median milliseconds of ``fn()`` (strategy ``name``) after a warm-up."""
    from .calibrate import run_times

    return 1e3 * statistics.median(run_times(fn, REPEATS))


def key(label: str, grid, call) -> str:
    """The disk key of one kind of call of one pattern on one grid, on this torch and thread
    count."""
    import torch

    return f"{label}|{tuple(grid)}|{call!r}|torch {torch.__version__}|threads " \
           f"{torch.get_num_threads()}"


def path():
    """``autotune.json`` beside the calibration (:func:`patterngen.calibrate.calibration_path`:
    ``$PATTERNGEN_CACHE``, a directory private to the user)."""
    from .calibrate import calibration_path

    return calibration_path().with_name("autotune.json")


def _load() -> dict:
    file = path()
    if not file.exists():
        return {}
    try:
        stored = json.loads(file.read_text())
        if not isinstance(stored, dict):
            raise ValueError(f"expected a JSON object, got {type(stored).__name__}")
        return stored
    except (ValueError, OSError, RecursionError) as e:
        warnings.warn(f"patterngen: autotune file {file} is unreadable ({e}); timing again.",
                      stacklevel=3)
        return {}


def cached(entry: str, allowed) -> str | None:
    """The stored winner for ``entry`` when it is one of ``allowed``, else ``None``."""
    got = _load().get(entry)
    winner = got.get("winner") if isinstance(got, dict) else None
    return winner if winner in allowed else None


def store(entry: str, winner: str, times: dict) -> None:
    """Keep ``winner`` (and every candidate's ms) for ``entry``."""
    stored = _load()
    stored[entry] = {"winner": winner, "ms": {k: round(v, 4) for k, v in times.items()}}
    try:
        trust.write_private(path(), json.dumps(stored, indent=1).encode())
    except OSError as e:
        warnings.warn(f"patterngen: cannot write autotune file {path()} ({e}); the choice "
                      f"holds for this process only.", stacklevel=3)
