"""Analytic performance models: device table, per-rank memory, communication volume, step time.

Everything here is a pure function of (model config, parallel layout, device); nothing touches
a GPU or a process group. ``megaclip plan`` (megaclip/cli/plan.py) ranks layouts with them.
"""
