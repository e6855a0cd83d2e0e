"""When the patterngen operators register: a loaded exported program or saved model calls them,
and ``import patterngen`` does not import torch, so they register once torch has loaded,
whichever of the two a program imports first."""

from __future__ import annotations

import sys

__all__ = ["install", "register", "register_pending"]

PACKAGE = "patterngen"
_pending = False


def register(caller: str | None = None) -> None:
    """Import the modules that define the patterngen operators, which a loaded exported
    program or a saved model calls.

    While a patterngen module other than ``caller`` is still being imported (torch was
    imported from inside it), importing the others could meet it half-built: the
    registration waits, and the end of that import (``caller``) runs it."""
    global _pending
    import importlib

    busy = [name for name, module in list(sys.modules.items())
            if (name == PACKAGE or name.startswith(PACKAGE + ".")) and name != caller
            and getattr(getattr(module, "__spec__", None), "_initializing", False)]
    if busy:
        _pending = True
        return
    _pending = False
    for module in (".nn", ".backends.numba", ".backends.planned"):
        importlib.import_module(module, PACKAGE)


def register_pending(caller: str) -> None:
    """Run a registration that waited for ``caller``'s import to end."""
    if _pending:
        register(caller)


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
        register()


def install() -> None:
    """Register now if torch is loaded (``patterngen`` itself is then mid-import), else when
    it loads."""
    if "torch" in sys.modules:
        register(PACKAGE)
    else:
        sys.meta_path.insert(0, _AfterTorch())

