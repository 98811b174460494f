"""megaclip.data: webdataset shards (reader, writer, loader), CLIP transforms, synthetic, demo."""

from __future__ import annotations

from megaclip.data.loader import WebLoader, build_webdataset_loader
from megaclip.data.reader import EpochPlan, Sample, WebDataset, plan_epoch_shards
from megaclip.data.shardspec import expand_braces, resolve_shards
from megaclip.data.stats import SkipStats
from megaclip.data.synthetic import SyntheticConfig, synthetic_batch, synthetic_batches
from megaclip.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    ClipEvalTransform,
    ClipTrainTransform,
    clip_transform,
)
from megaclip.data.writer import ShardWriter

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ClipEvalTransform",
    "ClipTrainTransform",
    "EpochPlan",
    "Sample",
    "ShardWriter",
    "SkipStats",
    "SyntheticConfig",
    "WebDataset",
    "WebLoader",
    "build_webdataset_loader",
    "clip_transform",
    "expand_braces",
    "plan_epoch_shards",
    "resolve_shards",
    "synthetic_batch",
    "synthetic_batches",
]
