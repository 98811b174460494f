"""Compatibility module: the webdataset reader, writer, stats and inspection, by their old path.

The code lives in reader.py (WebDataset, plans, decoding), writer.py (ShardWriter), stats.py
(SkipStats), inspection.py (inspect_shard) and tarindex.py (key groups); import from there or
from :mod:`megaclip.data`.
"""

from __future__ import annotations

from megaclip.data.inspection import ShardReport, inspect_shard
from megaclip.data.reader import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_EXTS,
    MODES,
    EpochPlan,
    Sample,
    WebDataset,
    count_groups,
    decode_image,
    open_image,
    plan_epoch_shards,
    shard_order,
)
from megaclip.data.stats import SAMPLE_REASONS, SHARD_REASONS, SkipStats
from megaclip.data.tarindex import split_name
from megaclip.data.writer import ShardWriter

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMAGE_EXTS",
    "MODES",
    "SAMPLE_REASONS",
    "SHARD_REASONS",
    "EpochPlan",
    "Sample",
    "ShardReport",
    "ShardWriter",
    "SkipStats",
    "WebDataset",
    "count_groups",
    "decode_image",
    "inspect_shard",
    "open_image",
    "plan_epoch_shards",
    "shard_order",
    "split_name",
]
