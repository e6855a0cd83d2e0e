"""Doctest namespace for the README and docs pages: their snippets assume ``pg``.

The planner's rates come from :meth:`patterngen.calibrate.Rates.default` in tests (no
measuring, the same plans on every machine); tests of calibration itself set their own.
"""

import os

import pytest

os.environ.setdefault("PATTERNGEN_CALIBRATION", "default")


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    import patterngen as pg

    doctest_namespace["pg"] = pg
