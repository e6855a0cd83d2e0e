"""patterngen: declare local attention patterns, get their exact cost and generated kernels.

Example:
    >>> import patterngen as pg
    >>> pg.cost(pg.window(7), grid=("H", "W")).pairs
    49*H*W
"""

from . import bias, operators
from .analysis import layers_to_global, receptive_field
from .compile import compile
from .cost import CostReport, cost
from .errors import BackendUnavailable, PatternError, UnknownBackend
from .grid import Grid, as_grid, symbol
from .parse import lower, parse
from .plan import Plan, plan
from .profile import profile
from .ir import IR, HeadsIR
from .layout import Layout, layout
from .pictures import show
from .reference import dense_attention, materialize
from .spec import (Pattern, area, axis, block, causal, criss_cross, full, global_tokens, heads,
                   stripe, window)

__all__ = [
    "Pattern", "window", "block", "area", "axis", "stripe", "criss_cross", "global_tokens",
    "causal", "full", "heads", "lower", "compile", "materialize", "show", "dense_attention",
    "cost",
    "CostReport", "IR", "HeadsIR", "Grid", "as_grid", "symbol", "PatternError",
    "BackendUnavailable", "UnknownBackend", "receptive_field", "layers_to_global", "profile",
    "parse", "nn",
    "layout", "Layout", "plan", "Plan", "bias", "distributed",
]
__version__ = "0.1.0"


# the operators register once torch has loaded, whichever of the two is imported first
operators.install()


def __getattr__(name):
    # pg.nn subclasses torch.nn.Module and pg.distributed compiles with torch.distributed;
    # importing them lazily keeps `import patterngen` free of torch
    if name in ("nn", "distributed"):
        import importlib

        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module 'patterngen' has no attribute {name!r}")
