"""megaclip.eval: zero-shot classification and image-text retrieval of CLIP checkpoints."""

from __future__ import annotations

from megaclip.eval.data import (
    ImageFolder,
    LabeledShards,
    ShardEvalLoader,
    caption_loader,
    image_folder_loader,
    labeled_loader,
)
from megaclip.eval.model import (
    NormalizedEncoder,
    load_eval_model,
    read_checkpoint,
    save_eval_checkpoint,
)
from megaclip.eval.retrieval import (
    RankCounts,
    encode_pairs,
    positive_ranks,
    recall_at_k,
    retrieval_eval,
)
from megaclip.eval.zeroshot import (
    build_classifier,
    read_classnames,
    read_templates,
    zeroshot_eval,
)

__all__ = [
    "ImageFolder",
    "LabeledShards",
    "NormalizedEncoder",
    "RankCounts",
    "ShardEvalLoader",
    "build_classifier",
    "caption_loader",
    "encode_pairs",
    "image_folder_loader",
    "labeled_loader",
    "load_eval_model",
    "positive_ranks",
    "read_checkpoint",
    "read_classnames",
    "read_templates",
    "recall_at_k",
    "retrieval_eval",
    "save_eval_checkpoint",
    "zeroshot_eval",
]
