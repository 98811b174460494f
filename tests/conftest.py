"""Suite-wide settings: property tests draw the same examples on every run (derandomised), so a
CI failure reproduces here; ``HYPOTHESIS_PROFILE=explore`` draws new ones on every run."""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("megaclip", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "megaclip"))

# MEGACLIP_SPREAD_LOG=FILE: record how much of each exactness bound is used (tests/spread.py)
from tests import spread  # noqa: E402

spread.install()
