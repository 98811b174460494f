"""The docs list what the code has: every run-config key appears in docs/training.md's table."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from megaclip.config.parallel import ParallelConfig
from megaclip.config.train import DataConfig, OptimConfig, TrainSection, ZeroShotSection

DOCS = Path(__file__).resolve().parents[1] / "docs"
SECTIONS = {
    "parallel": ParallelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainSection,
    "zeroshot": ZeroShotSection,
}


def table_row(section: str) -> str:
    """The ``| `section` | ... |`` row of the run-config table in docs/training.md."""
    text = (DOCS / "training.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith(f"| `{section}` |")]
    assert len(rows) == 1, f"docs/training.md needs one table row for `{section}`"
    return rows[0]


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_training_md_lists_every_config_key(section):
    listed = set(re.findall(r"`([a-z_0-9]+)(?:`|:)", table_row(section)))
    listed |= set(re.findall(r"`([a-z_0-9]+)`/`", table_row(section)))
    missing = [f.name for f in dataclasses.fields(SECTIONS[section]) if f.name not in listed]
    assert not missing, f"docs/training.md's `{section}` row misses {missing}"
