"""Inspect shards: decode every sample of a shard and report what is usable and what is not."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from megaclip.data.reader import DEFAULT_MAX_IMAGE_PIXELS, WebDataset
from megaclip.data.sources import is_remote
from megaclip.data.stats import SkipStats


@dataclass(frozen=True)
class ShardReport:
    """What reading one shard found: skip stats (ok / per reason), size and read time."""

    path: str
    stats: SkipStats
    size_bytes: int
    seconds: float


def inspect_shard(path: str, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ShardReport:
    """Decode every sample of one shard (no transform, no skip threshold) and report the counts."""
    t0 = time.perf_counter()
    ds = WebDataset(path, max_image_pixels=max_image_pixels, max_skip_fraction=None)
    stats = SkipStats()
    for _ in ds.iter_samples(stats=stats, check=False):
        pass
    size = os.path.getsize(path) if not is_remote(path) and os.path.exists(path) else 0
    return ShardReport(path, stats, size, time.perf_counter() - t0)
