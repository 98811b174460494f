"""CLIP image preprocessing with Pillow + torch only (no torchvision).

Evaluation: RGB -> resize the shorter side to ``image_size`` (bicubic, Pillow's antialiased
resampling) -> center crop ``image_size`` -> float [3, H, W] in [0, 1] -> normalize with the CLIP
mean/std. These are the operations of open_clip's ``image_transform(size, is_train=False)`` in the
same order and arithmetic, except that open_clip converts to RGB after resizing (identical for RGB
and grayscale inputs; palette / RGBA / CMYK inputs can differ by interpolation rounding).

Training: a random crop of area fraction ``scale`` and aspect ratio ``ratio`` of the original image
(RandomResizedCrop), resized to ``image_size`` x ``image_size`` (bicubic), same normalization;
randomness comes from an explicit ``random.Random`` so it is reproducible per DataLoader worker.

Fast path (``fast=True``, the training default): the transform receives the image undecoded
(``accepts_lazy_images``), draws the crop box from the full image size first, then lets the JPEG
decoder scale the image down by 2, 4 or 8 (Pillow's ``draft``, DCT-domain scaling) as far as the
box stays at least ``image_size`` pixels on each side, and resizes the scaled box (the same box,
in scaled coordinates) bicubically. The crop distribution is unchanged; pixels differ slightly
from the full-resolution resize (docs/data.md gives the measured difference). Normalisation then
uses one multiply-add per channel (within 5e-7 of the exact arithmetic). ``fast=False`` (the
evaluation default) decodes at full size and keeps open_clip's exact arithmetic.
"""

from __future__ import annotations

import math
import random
import warnings

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


def _planes(img: Image.Image) -> torch.Tensor:
    """uint8 [3, H, W] of an image (converted to RGB): Pillow splits the channels in C."""
    planes = [torch.from_numpy(np.array(ch, dtype=np.uint8)) for ch in to_rgb(img).split()]
    return torch.stack(planes)


def to_normalized_tensor(
    img: Image.Image,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> torch.Tensor:
    """x = (pixels / 255 - mean) / std as float32 [3, H, W] (channel-wise, exact arithmetic)."""
    x = _planes(img).to(torch.float32).div_(255)
    m = torch.as_tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(3, 1, 1)
    return x.sub_(m).div_(s)


class _FastNormalize:
    """x = pixels * (1 / (255 std)) - mean / std in one multiply-add (within 5e-7 of exact)."""

    def __init__(self, mean: tuple[float, float, float], std: tuple[float, float, float]) -> None:
        m = torch.as_tensor(mean, dtype=torch.float64).view(3, 1, 1)
        s = torch.as_tensor(std, dtype=torch.float64).view(3, 1, 1)
        self.scale = (1.0 / (255.0 * s)).to(torch.float32)
        self.shift = (-m / s).to(torch.float32)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """float32 of uint8 pixels [..., 3, H, W] (contiguous)."""
        out = pixels.to(torch.float32, memory_format=torch.contiguous_format)
        return out.mul_(self.scale).add_(self.shift)


def resize_box_uint8(img: Image.Image, box: tuple[int, int, int, int], size: int) -> torch.Tensor:
    """uint8 [3, size, size]: ``box`` of ``img`` resized with torch's antialiased bicubic filter.

    torch's uint8 path (vectorised, channels-last) is several times faster than Pillow's resize;
    its filter is Pillow's, applied to the cropped region (the support is clamped at the box
    edge, as when cropping first: torchvision's RandomResizedCrop does that too).
    """
    with warnings.catch_warnings():  # a read-only view of Pillow's bytes: we only read it
        warnings.simplefilter("ignore", UserWarning)
        arr = torch.from_numpy(np.asarray(to_rgb(img)))  # [H, W, 3]
    left, top, right, bottom = box
    x = arr[top:bottom, left:right].permute(2, 0, 1).unsqueeze(0)
    x = x.contiguous(memory_format=torch.channels_last)
    out = torch.nn.functional.interpolate(
        x, size=(size, size), mode="bicubic", antialias=True, align_corners=False
    )
    return out[0]


def draft_scale(width: int, height: int, box: tuple[int, int, int, int], size: int) -> int:
    """The largest JPEG scale-down (1, 2, 4 or 8) that keeps ``box`` >= ``size`` px a side."""
    short = min(box[2] - box[0], box[3] - box[1])
    scale = 1
    while scale < 8 and short >= 2 * scale * size:
        scale *= 2
    return scale


def drafted(
    img: Image.Image, box: tuple[int, int, int, int], size: int
) -> tuple[Image.Image, tuple[int, int, int, int]]:
    """Decode ``img`` (not loaded yet) scaled down as far as ``box`` allows; image and its box.

    Only JPEGs scale while decoding; other images are returned as they are with ``box``. The
    scaled box is rounded to whole pixels of the scaled image.
    """
    width, height = img.size
    scale = draft_scale(width, height, box, size)
    if scale == 1 or getattr(img, "format", None) != "JPEG":
        return img, box
    img.draft("RGB", (-(-width // scale), -(-height // scale)))
    sx, sy = img.size[0] / width, img.size[1] / height
    w, h = img.size
    left, top = min(w - 1, round(box[0] * sx)), min(h - 1, round(box[1] * sy))
    right = max(left + 1, min(w, round(box[2] * sx)))
    bottom = max(top + 1, min(h, round(box[3] * sy)))
    return img, (left, top, right, bottom)


class _ClipTransform:
    """What both CLIP transforms hold: output size, normalisation, the fast-decoding switch."""

    def __init__(
        self,
        image_size: int,
        mean: tuple[float, float, float],
        std: tuple[float, float, float],
        fast: bool,
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size={image_size} must be >= 1")
        self.image_size = image_size
        self.mean = mean
        self.std = std
        self.fast = fast
        self.accepts_lazy_images = fast  # a reader may hand over images not decoded yet


class ClipEvalTransform(_ClipTransform):
    """RGB -> shorter side to ``image_size`` (bicubic) -> center crop -> CLIP-normalized tensor.

    ``fast``: decode JPEGs scaled down by 2/4/8 while the shorter side stays >= 2 x image_size
    (then not identical to open_clip); off by default.
    """

    def __init__(
        self,
        image_size: int,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        fast: bool = False,
    ) -> None:
        super().__init__(image_size, mean, std, fast)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """The [3, image_size, image_size] float32 tensor of ``img`` (``rng`` is unused)."""
        if self.fast:
            width, height = img.size
            img, _ = drafted(img, (0, 0, width, height), 2 * self.image_size)
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


class ClipTrainTransform(_ClipTransform):
    """RGB -> random resized crop (area ``scale``, aspect ``ratio``) -> bicubic resize -> normalize.

    Pass ``rng`` per call for reproducible crops (the dataset passes one per sample); without it
    a generator seeded by ``seed`` at construction is used. ``fast``: reduced-size JPEG decoding
    and one multiply-add normalisation (module docstring); the crop distribution is the same.
    """

    def __init__(
        self,
        image_size: int,
        scale: tuple[float, float] = (0.9, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        seed: int = 0,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        fast: bool = False,
    ) -> None:
        super().__init__(image_size, mean, std, fast)
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale={scale} must satisfy 0 < lo <= hi <= 1")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio={ratio} must satisfy 0 < lo <= hi")
        self.scale = scale
        self.ratio = ratio
        self._normalize = _FastNormalize(mean, std) if fast else None
        self._rng = random.Random(seed)

    def __call__(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """The [3, image_size, image_size] float32 tensor of a random crop of ``img``."""
        if self._normalize is not None:
            return self._normalize(self.pixels(img, rng))
        box = random_resized_crop_box(*img.size, rng or self._rng, self.scale, self.ratio)
        size = (self.image_size, self.image_size)
        out = to_rgb(img).resize(size, Image.Resampling.BICUBIC, box=box)
        return to_normalized_tensor(out, self.mean, self.std)

    def pixels(self, img: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        """The fast path before normalisation: uint8 [3, S, S] (:meth:`normalize` finishes it)."""
        box = random_resized_crop_box(*img.size, rng or self._rng, self.scale, self.ratio)
        img, box = drafted(img, box, self.image_size)
        return resize_box_uint8(img, box, self.image_size)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """float32 CLIP-normalised images of uint8 ``pixels`` [..., 3, S, S] (fast path)."""
        return (self._normalize or _FastNormalize(self.mean, self.std))(pixels)


def clip_transform(
    image_size: int, train: bool, seed: int = 0, fast: bool | None = None
) -> ClipEvalTransform | ClipTrainTransform:
    """The CLIP training (scale 0.9-1.0 random crop) or evaluation (center crop) transform.

    ``fast`` (default: ``train``): reduced-size JPEG decoding where the output allows.
    """
    fast = train if fast is None else fast
    if train:
        return ClipTrainTransform(image_size, seed=seed, fast=fast)
    return ClipEvalTransform(image_size, fast=fast)
