"""Measured performance: throughput/MFU runs, a collective-counting shim, memory accounting.

This package only measures. What a layout *should* cost (communication volume, model-state
memory, throughput formulas, device peaks) comes from :mod:`megaclip.perf`; bench runs a real
engine and compares with it. See docs/benchmarks.md.
"""

from __future__ import annotations
