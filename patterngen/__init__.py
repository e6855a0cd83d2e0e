"""patterngen: declare local attention patterns, get their exact cost and generated kernels.

Example:
    >>> import patterngen as pg
    >>> pg.cost(pg.window(7), grid=("H", "W")).pairs
    49*H*W
"""

import sys

from . import bias
from .analysis import layers_to_global, receptive_field
from .compile import compile
from .cost import CostReport, cost
from .errors import BackendUnavailable, PatternError, UnknownBackend
from .grid import Grid, as_grid, symbol
from .parse import parse
from .plan import Plan, plan
from .profile import profile
from .ir import IR, HeadsIR
from .layout import Layout, layout
from .pictures import show
from .reference import dense_attention, materialize
from .spec import (Pattern, area, axis, block, causal, criss_cross, full, global_tokens, heads,
                   lower, stripe, window)

__all__ = [
    "Pattern", "window", "block", "area", "axis", "stripe", "criss_cross", "global_tokens",
    "causal", "full", "heads", "lower", "compile", "materialize", "show", "dense_attention",
    "cost",
    "CostReport", "IR", "HeadsIR", "Grid", "as_grid", "symbol", "PatternError",
    "BackendUnavailable", "UnknownBackend", "receptive_field", "layers_to_global", "profile", "parse", "nn",
    "layout", "Layout", "plan", "Plan", "bias", "distributed",
]
__version__ = "0.1.0"


_pending = False


def _register_operators(caller: str | None = None) -> None:
    """Import the modules that define the patterngen operators, which a loaded exported
    program or a saved model calls.

    While a patterngen module other than ``caller`` is still being imported (torch was
    imported from inside it), importing the others could meet it half-built: the
    registration waits, and the end of that import (``caller``) runs it."""
    global _pending
    import importlib

    busy = [name for name, module in list(sys.modules.items())
            if (name == __name__ or name.startswith(__name__ + ".")) and name != caller
            and getattr(getattr(module, "__spec__", None), "_initializing", False)]
    if busy:
        _pending = True
        return
    _pending = False
    for module in (".nn", ".backends.numba", ".backends.planned"):
        importlib.import_module(module, __name__)


def _register_pending(caller: str) -> None:
    """Run a registration that waited for ``caller``'s import to end."""
    if _pending:
        _register_operators(caller)


class _AfterTorch:
    """A meta path finder that lets torch import as usual, then registers the operators:
    ``import patterngen`` itself does not import torch, and a program may import it first."""

    searching = False

    def find_spec(self, name, path=None, target=None):
        if name != "torch" or self.searching:
            return None
        import importlib.util

        self.searching = True  # the search below walks the meta path again
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.searching = False
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader, self)
        return spec


class _RegisteringLoader:
    def __init__(self, inner, finder):
        self.inner, self.finder = inner, finder

    def create_module(self, spec):
        return self.inner.create_module(spec)

    def exec_module(self, module):
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        self.inner.exec_module(module)
        _register_operators()


if "torch" in sys.modules:
    _register_operators(__name__)
else:
    sys.meta_path.insert(0, _AfterTorch())


def __getattr__(name):
    # pg.nn subclasses torch.nn.Module and pg.distributed compiles with torch.distributed;
    # importing them lazily keeps `import patterngen` free of torch
    if name in ("nn", "distributed"):
        import importlib

        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module 'patterngen' has no attribute {name!r}")
