"""Measured performance: throughput/MFU runs, a collective-counting shim, memory accounting.

The analytic side (what a layout *should* cost) lives in :mod:`megaclip.bench.analytic`;
everything else here measures a real run and compares with it. See docs/benchmarks.md.
"""

from __future__ import annotations
