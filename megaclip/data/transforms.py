"""CLIP image preprocessing with Pillow + torch only (no torchvision).

Evaluation: RGB -> resize the shorter side to ``image_size`` (bicubic, Pillow's antialiased
resampling) -> center crop ``image_size`` -> float [3, H, W] in [0, 1] -> normalize with the CLIP
mean/std. These are the operations of open_clip's ``image_transform(size, is_train=False)`` in the
same order and arithmetic, except that open_clip converts to RGB after resizing (identical for RGB
and grayscale inputs; palette / RGBA / CMYK inputs can differ by interpolation rounding).

Training: a random crop of area fraction ``scale`` and aspect ratio ``ratio`` of the original image
(RandomResizedCrop), resized to ``image_size`` x ``image_size`` (bicubic), same normalization;
randomness comes from an explicit ``random.Random`` so it is reproducible per DataLoader worker.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb(img: Image.Image) -> Image.Image:
    """The image in RGB mode (palette transparency and alpha are dropped)."""
    return img if img.mode == "RGB" else img.convert("RGB")


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
    """Bicubic resize to shorter side ``size``, longer side ``int(size * long / short)``."""
    w, h = img.size
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) == (w, h):
        return img
    return img.resize((new_w, new_h), Image.Resampling.BICUBIC)


def center_crop(img: Image.Image, size: int) -> Image.Image:
    """Central ``size`` x ``size`` window; offsets round((dim - size) / 2). Needs dims >= size."""
    w, h = img.size
    if w < size or h < size:
        raise ValueError(f"image {w}x{h} is smaller than the crop {size}x{size}")
    top = int(round((h - size) / 2.0))
    left = int(round((w - size) / 2.0))
    return img.crop((left, top, left + size, top + size))


def to_normalized_tensor(
    img: Image.Image,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> torch.Tensor:
    """x = (pixels / 255 - mean) / std as float32 [3, H, W] (channel-wise)."""
    arr = np.asarray(to_rgb(img), dtype=np.uint8)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).to(torch.float32).div(255)
    m = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(m).div_(s)


class ClipEvalTransform:
    """RGB -> shorter side to ``image_size`` (bicubic) -> center crop -> CLIP-normalized tensor."""

    def __init__(
        self,
        image_size: int,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size={image_size} must be >= 1")
        self.image_size = image_size
        self.mean = mean
        self.std = std

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """The [3, image_size, image_size] float32 tensor of ``img`` (``rng`` is unused)."""
        img = resize_shorter_side(to_rgb(img), self.image_size)
        return to_normalized_tensor(center_crop(img, self.image_size), self.mean, self.std)


def random_resized_crop_box(
    width: int,
    height: int,
    rng: random.Random,
    scale: tuple[float, float] = (0.9, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
) -> tuple[int, int, int, int]:
    """A crop box (left, top, right, bottom) of area fraction in ``scale``, aspect in ``ratio``.

    Area ~ U(scale) * W * H, log aspect ~ U(log ratio); up to ``attempts`` draws until the box fits,
    then a central crop with the aspect clamped to ``ratio``.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(attempts):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = rng.randint(0, height - h)
            left = rng.randint(0, width - w)
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    top = (height - h) // 2
    left = (width - w) // 2
    return left, top, left + w, top + h


class ClipTrainTransform:
    """RGB -> random resized crop (area ``scale``, aspect ``ratio``) -> bicubic resize -> normalize.

    Pass ``rng`` per call for reproducible crops (the dataset passes one per worker); without it a
    generator seeded by ``seed`` at construction is used.
    """

    def __init__(
        self,
        image_size: int,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        seed: int = 0,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size={image_size} must be >= 1")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale={scale} must satisfy 0 < lo <= hi <= 1")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio={ratio} must satisfy 0 < lo <= hi")
        self.image_size = image_size
        self.scale = scale
        self.ratio = ratio
        self.mean = mean
        self.std = std
        self._rng = random.Random(seed)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """The [3, image_size, image_size] float32 tensor of a random crop of ``img``."""
        img = to_rgb(img)
        box = random_resized_crop_box(*img.size, rng or self._rng, self.scale, self.ratio)
        size = (self.image_size, self.image_size)
        out = img.resize(size, Image.Resampling.BICUBIC, box=box)
        return to_normalized_tensor(out, self.mean, self.std)


def clip_transform(
    image_size: int, train: bool, seed: int = 0
) -> ClipEvalTransform | ClipTrainTransform:
    """The CLIP training (scale 0.9-1.0 random crop) or evaluation (center crop) transform."""
    return ClipTrainTransform(image_size, seed=seed) if train else ClipEvalTransform(image_size)
