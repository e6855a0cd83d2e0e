"""Bounds on the work and memory one call may take, each raised by an environment variable.

Functions that allocate or loop by a size taken from their input (grid tokens, an axis, layers,
union terms, head patterns, symbolic pieces) check it first against these limits and refuse
with a :class:`PatternError` that names the limit and the variable that raises it. See
docs/security.md for what each one guards.

Example:
    >>> limit("PATTERNGEN_MAX_HEAD_PATTERNS")
    64
"""

from __future__ import annotations

import os

from .errors import PatternError

__all__ = ["LIMITS", "limit", "check"]

#: ``{variable: (default, what it bounds)}``
LIMITS = {
    "PATTERNGEN_MAX_AXIS": (1 << 24, "tokens along one axis of a numeric grid (lowering "
                                     "builds arrays of each axis)"),
    "PATTERNGEN_MAX_TOKENS": (1 << 24, "tokens of a grid-sized array (compile, layout, show, "
                                       "key_counts, receptive_field)"),
    "PATTERNGEN_MAX_PROFILE_ELEMENTS": (1 << 28, "elements of each input profile makes "
                                                 "(1 GiB in float32)"),
    "PATTERNGEN_MAX_PLAN_TOKENS": (1 << 20, "tokens the planner lays out (about 4 s per "
                                            "million tokens on a laptop core)"),
    "PATTERNGEN_MAX_REACH_WORK": (1 << 32, "tokens x terms x layers receptive_field applies "
                                           "before the field stops changing"),
    "PATTERNGEN_MAX_GLOBAL_WORK": (1 << 28, "64-bit words x terms x axes layers_to_global "
                                            "ORs (about 17 ns each on a laptop core)"),
    "PATTERNGEN_MAX_TERMS": (256, "separable terms of one pattern (unions, and intersections "
                                  "of unions, which multiply)"),
    "PATTERNGEN_MAX_HEAD_PATTERNS": (64, "patterns in one heads(...) (each distinct one "
                                         "compiles its own kernels)"),
    "PATTERNGEN_MAX_SYMBOLIC_TERMS": (128, "distinct terms of a symbolic pair count (sympy "
                                           "takes about 2-4 s on a report of 120-150; each "
                                           "more union term doubles them)"),
}


def limit(name: str) -> int:
    """The limit ``name``: its environment variable when set, else its default.

    Raises:
        PatternError: the variable is set to something other than a positive integer.
    """
    default, _ = LIMITS[name]
    text = os.environ.get(name)
    if text is None:
        return default
    if not (text.strip().isascii() and text.strip().isdigit()) or int(text) < 1:
        raise PatternError(f"{name}={text!r}; expected a positive integer (default {default}).")
    return int(text)


def check(name: str, value: int, what: str) -> None:
    """Refuse ``value`` above the limit ``name``; ``what`` says whose value it is.

    Raises:
        PatternError: ``"<what> is <value>, more than <name>=<limit>, the limit on <what it
            bounds>; set <name> to raise it."``
    """
    bound = limit(name)
    if value > bound:
        raise PatternError(f"{what} is {value}, more than {name}={bound}, the limit on "
                           f"{LIMITS[name][1]}; set {name} to raise it.")
