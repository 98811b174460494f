"""Run `megaclip train`'s real pre-checks in-process and stop where process groups would start."""

from __future__ import annotations

import pytest


class ReachedProcessGroups(Exception):
    """The pre-checks passed: run_training went on to create process groups."""


def stop_before_process_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``init_distributed`` raise :class:`ReachedProcessGroups`; WORLD_SIZE=1."""
    import megaclip.train.loop as loop

    def init_distributed(*_a, **_k):
        raise ReachedProcessGroups

    monkeypatch.setattr(loop, "init_distributed", init_distributed)
    monkeypatch.setenv("WORLD_SIZE", "1")
