"""A real, tiny, offline CLIP dataset: scikit-learn's handwritten digits as webdataset shards.

``sklearn.datasets.load_digits`` (1797 8x8 grayscale digits, 10 classes, shipped inside
scikit-learn) is rendered as dark ink on white, upsampled with bicubic interpolation to RGB PNGs,
captioned from varied templates ("a handwritten digit 7", "an image of a seven", ...), and split
into a stratified held-out set. Good for smoke-training and zero-shot evaluation on CPU.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

from megaclip.data.writer import ShardWriter
from megaclip.errors import ConfigError, DataError

CLASSNAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Training captions: {w} = number word, {d} = digit, {a} = article before the word ("a"/"an").
CAPTION_TEMPLATES = (
    "a photo of the number {w}",
    "a handwritten digit {d}",
    "the number {w} written by hand",
    "an image of {a} {w}",
    "a scan of a handwritten {w}",
    "the digit {d}, handwritten",
    "a small picture of the digit {w}",
    "a low resolution image of the number {d}",
    "someone wrote the number {w}",
    "a blurry handwritten {d}",
    "a {w} drawn with a pen",
    "a pixelated digit: {d}",
)

# Zero-shot classification prompts; {} is replaced by the class name.
ZERO_SHOT_TEMPLATES = (
    "a photo of the number {}.",
    "a handwritten digit {}.",
    "the number {} written by hand.",
    "an image of the digit {}.",
    "a scan of a handwritten {}.",
)


@dataclass(frozen=True)
class DemoConfig:
    """Options of the digits demo dataset."""

    image_size: int = 32
    shards: int = 4
    seed: int = 0
    val_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ConfigError(f"--image-size {self.image_size}: use at least 8 (the source is 8x8)")
        if self.shards < 1:
            raise ConfigError(f"--shards {self.shards}: use at least 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction={self.val_fraction} must be in (0, 1)")


def caption_for(label: int, template_index: int) -> str:
    """Caption of digit ``label`` with training template ``template_index``."""
    word = CLASSNAMES[label]
    article = "an" if word[0] in "aeiou" else "a"
    template = CAPTION_TEMPLATES[template_index % len(CAPTION_TEMPLATES)]
    return template.format(w=word, d=str(label), a=article)


def render_digit(pixels: np.ndarray, image_size: int) -> Image.Image:
    """An 8x8 ink map (0..16) as dark-on-white RGB of side ``image_size`` (bicubic upsampling)."""
    gray = np.clip(np.rint(255.0 - pixels * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    img = Image.fromarray(gray)  # uint8 2-D -> mode "L"
    if image_size != gray.shape[0]:
        img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
    return img.convert("RGB")


def stratified_split(
    labels: np.ndarray, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, val indices): round(val_fraction * n_c) of each class go to val, seeded."""
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    train: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_val = int(round(val_fraction * len(idx)))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def _spec(prefix: str, n: int) -> str:
    return f"{prefix}-000000.tar" if n == 1 else f"{prefix}-{{000000..{n - 1:06d}}}.tar"


def make_demo(out_dir: str, cfg: DemoConfig, overwrite: bool = False) -> dict:
    """Write the digits demo shards and side files into ``out_dir``; returns the manifest.

    Files: train-NNNNNN.tar (cfg.shards shards), val-000000.tar, classnames.txt, templates.txt,
    manifest.json (counts per split and class, specs relative to ``out_dir``).
    """
    from sklearn.datasets import load_digits

    old = sorted(glob.glob(os.path.join(out_dir, "train-*.tar")))
    old += sorted(glob.glob(os.path.join(out_dir, "val-*.tar")))
    if os.path.exists(os.path.join(out_dir, "manifest.json")):
        old.append(os.path.join(out_dir, "manifest.json"))
    if old and not overwrite:
        raise DataError(f"{out_dir!r} already holds a demo dataset ({old[0]}); pass --overwrite")
    for path in old:
        os.remove(path)
    os.makedirs(out_dir, exist_ok=True)

    digits = load_digits()
    images, labels = digits.images, digits.target.astype(int)
    train_idx, val_idx = stratified_split(labels, cfg.val_fraction, cfg.seed)
    if cfg.shards > len(train_idx):
        raise ConfigError(f"--shards {cfg.shards} exceeds the {len(train_idx)} training samples")
    rng = np.random.default_rng(cfg.seed + 1)
    train_idx = rng.permutation(train_idx)  # shards mix all classes
    template_of = rng.integers(0, len(CAPTION_TEMPLATES), size=len(labels))

    def write_split(prefix: str, indices: np.ndarray, n_shards: int) -> dict:
        per_shard = -(-len(indices) // n_shards)
        with ShardWriter(os.path.join(out_dir, f"{prefix}-%06d.tar"), per_shard) as writer:
            for i in indices:
                label = int(labels[i])
                writer.write(
                    f"{int(i):05d}",
                    render_digit(images[i], cfg.image_size),
                    caption_for(label, int(template_of[i])),
                    {"label": label, "classname": CLASSNAMES[label], "source_index": int(i)},
                )
        counts = np.bincount(labels[indices], minlength=len(CLASSNAMES))
        return {
            "spec": _spec(prefix, len(writer.shards)),
            "shards": [os.path.basename(p) for p in writer.shards],
            "count": int(len(indices)),
            "per_class": {CLASSNAMES[c]: int(n) for c, n in enumerate(counts)},
        }

    manifest = {
        "name": "megaclip-digits-demo",
        "source": "sklearn.datasets.load_digits (UCI optical recognition of handwritten digits)",
        "image_size": cfg.image_size,
        "image_format": "png",
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "splits": {
            "train": write_split("train", train_idx, cfg.shards),
            "val": write_split("val", val_idx, 1),
        },
        "classnames": list(CLASSNAMES),
        "zero_shot_templates": list(ZERO_SHOT_TEMPLATES),
        "caption_templates": list(CAPTION_TEMPLATES),
    }
    with open(os.path.join(out_dir, "classnames.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(CLASSNAMES) + "\n")
    with open(os.path.join(out_dir, "templates.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(ZERO_SHOT_TEMPLATES) + "\n")
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2)
        f.write("\n")
    return manifest
