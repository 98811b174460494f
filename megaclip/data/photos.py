"""Real-photo JPEG shards for benchmarks and soak tests, built offline from scikit-learn's photos.

``sklearn.datasets.load_sample_images`` ships two real photographs (china.jpg, flower.jpg,
640 x 427). Each sample is a random crop of one of them (at least 160 px a side), resized so its
longer side is a random 320..800 px, encoded as JPEG (quality 90 by default), with a caption
drawn from a few templates and the sample number (so captions, hence token ids, are distinct).
"""

from __future__ import annotations

import io
import os
import random

from PIL import Image

from megaclip.data.writer import ShardWriter

_CAPTIONS = (
    "a photo of a chinese temple, sample {i}",
    "a close-up photo of a flower, sample {i}",
    "a crop of a colourful picture number {i}",
    "picture {i}: part of a photograph",
)


def sample_photos() -> list[Image.Image]:
    """scikit-learn's sample photographs as RGB images."""
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(a).convert("RGB") for a in load_sample_images().images]


def photo_jpeg(photos: list[Image.Image], rng: random.Random, quality: int = 90) -> bytes:
    """A random crop of a random photo, longer side resized to 320..800 px, as JPEG bytes."""
    src = photos[rng.randrange(len(photos))]
    cw = rng.randint(min(160, src.width), src.width)
    ch = rng.randint(min(160, src.height), src.height)
    x0, y0 = rng.randint(0, src.width - cw), rng.randint(0, src.height - ch)
    crop = src.crop((x0, y0, x0 + cw, y0 + ch))
    scale = rng.randint(320, 800) / max(cw, ch)
    size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
    buf = io.BytesIO()
    crop.resize(size, Image.Resampling.BICUBIC).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_photo_shards(
    out_dir: str,
    samples: int,
    shards: int,
    *,
    seed: int = 0,
    quality: int = 90,
    prefix: str = "photo",
) -> str:
    """Write ``samples`` photo samples into ``shards`` tar shards; returns their brace spec."""
    os.makedirs(out_dir, exist_ok=True)
    rng = random.Random(seed)
    photos = sample_photos()
    per = -(-samples // shards)
    pattern = os.path.join(out_dir, f"{prefix}-%06d.tar")
    with ShardWriter(pattern, max_count=per) as w:
        for i in range(samples):
            caption = _CAPTIONS[rng.randrange(len(_CAPTIONS))].format(i=i)
            w.write(f"{i:08d}", photo_jpeg(photos, rng, quality), caption, image_ext="jpg")
    return os.path.join(out_dir, f"{prefix}-{{000000..{len(w.shards) - 1:06d}}}.tar")
