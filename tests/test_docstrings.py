"""The docstring examples of the backends, run through the installed package.

``backends/`` imports only as ``patterngen.backends`` (the install maps the folder there), so
pytest's ``--doctest-modules`` over the ``patterngen`` folder never sees it, and collecting it
by path would import it a second time and register every backend twice.
"""

import doctest
import importlib
import pkgutil

import patterngen as pg
import patterngen.backends


def test_backend_docstring_examples_run():
    names = ["patterngen.backends"] + [m.name for m in pkgutil.walk_packages(
        patterngen.backends.__path__, "patterngen.backends.")]
    failed, attempted = {}, 0
    for name in names:
        result = doctest.testmod(importlib.import_module(name), extraglobs={"pg": pg},
                                 optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
        attempted += result.attempted
        if result.failed:
            failed[name] = result.failed
    assert not failed, f"failed examples per module (see the report above): {failed}"
    assert attempted >= 20  # sdpa, flex, numba, source, ops and planned have examples
