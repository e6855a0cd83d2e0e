"""Doctest namespace for the README and docs pages: their snippets assume ``pg``."""

import pytest


@pytest.fixture(autouse=True)
def _doctest_namespace(doctest_namespace):
    import patterngen as pg

    doctest_namespace["pg"] = pg
