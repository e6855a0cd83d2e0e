"""Test settings: a short seeded run by default, a long sweep with PATTERNGEN_LONG=1."""

import os

from hypothesis import HealthCheck, settings

LONG = os.environ.get("PATTERNGEN_LONG") == "1"

settings.register_profile(
    "default", max_examples=60, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "long", max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("long" if LONG else "default")
