"""Evaluation data: labelled images (webdataset or image folder) and (image, caption) pairs.

Labelled webdataset samples carry their class index in ``KEY.json`` as ``{"label": int}`` (the
demo data does) or in ``KEY.cls`` as decimal text (clip_benchmark's convention). Image folders are
``ROOT/<classname>/*.{png,jpg,jpeg,webp}`` with the class order of the classnames file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from megaclip.data.transforms import ClipEvalTransform
from megaclip.data.webdataset import (
    DEFAULT_MAX_IMAGE_PIXELS,
    IMAGE_EXTS,
    Sample,
    SkipStats,
    WebDataset,
    decode_image,
)
from megaclip.errors import ConfigError, DataError

LABEL_EXTS = ("json", "cls")
# A label that is missing or not an integer, reported by the main process (workers can't raise
# a clean DataError: the DataLoader would rewrap it with a traceback in the message).
_NO_LABEL = -1
_SKIP_CHECK_MIN_SAMPLES = 100


def parse_label(raw: str, label_ext: str) -> int:
    """Class index from the text of a ``.json`` ({"label": int}) or ``.cls`` member; -1 if none."""
    try:
        value = json.loads(raw).get("label") if label_ext == "json" else int(raw.strip())
    except (ValueError, AttributeError):
        return _NO_LABEL
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return _NO_LABEL
    return value


class _LabelOf:
    """Picklable sample -> label extractor (the label member is read as the 'caption')."""

    def __init__(self, label_ext: str) -> None:
        self.label_ext = label_ext

    def __call__(self, sample: Sample) -> tuple[int, str]:
        return parse_label(sample.caption, self.label_ext), f"{sample.shard}:{sample.key}"


def _caption_of(sample: Sample) -> str:
    return sample.caption


def _caption_lines(sample: Sample) -> list[str]:
    """Every non-empty line of the caption member (CLIP_benchmark: several captions per image)."""
    return [line.strip() for line in sample.caption.splitlines() if line.strip()]


class _BatchedSamples(IterableDataset):
    """Per-worker batches (images, [extract(sample)], cumulative SkipStats, worker id)."""

    def __init__(
        self, dataset: WebDataset, batch_size: int, extract: Callable[[Sample], Any]
    ) -> None:
        super().__init__()
        self.dataset = dataset
        self.batch_size = batch_size
        self.extract = extract

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, list[Any], SkipStats, int]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stats = SkipStats()
        images: list[torch.Tensor] = []
        items: list[Any] = []
        for sample in self.dataset.iter_samples(worker, num_workers, stats=stats, check=False):
            if sample is None:
                continue
            images.append(sample.image)
            items.append(self.extract(sample))
            if len(images) == self.batch_size:
                yield torch.stack(images), items, stats.copy(), worker
                images, items = [], []
        if images:
            yield torch.stack(images), items, stats.copy(), worker
        yield None, [], stats.copy(), worker


class ShardEvalLoader:
    """Iterate (images [B,3,S,S], items) over every sample of webdataset shards once, in order.

    ``items`` are ``extract(sample)`` per image. Skipped samples (undecodable images, missing
    label/caption member) are counted in ``skip_stats``; more than ``max_skip_fraction`` of them
    raises DataError at the end.
    """

    def __init__(
        self,
        spec: str | Sequence[str],
        image_size: int,
        batch_size: int,
        extract: Callable[[Sample], Any],
        *,
        caption_ext: str = "txt",
        workers: int = 0,
        max_skip_fraction: float | None = 0.0,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        if workers < 0:
            raise ConfigError(f"workers={workers} must be >= 0")
        self.dataset = WebDataset(
            spec,
            mode="epoch",
            transform=ClipEvalTransform(image_size),
            max_image_pixels=max_image_pixels,
            max_skip_fraction=None,
            caption_ext=caption_ext,
        )
        self.stream = _BatchedSamples(self.dataset, batch_size, extract)
        self.workers = workers
        self.max_skip_fraction = max_skip_fraction
        self.caption_ext = caption_ext
        self.skip_stats = SkipStats()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[Any]]]:
        loader = DataLoader(self.stream, batch_size=None, num_workers=self.workers)
        per_worker: dict[int, SkipStats] = {}
        for images, items, stats, worker in loader:
            per_worker[worker] = stats
            self.skip_stats = SkipStats.total(per_worker.values())
            self._check(final=False)
            if images is not None:
                yield images, items
        self.skip_stats = SkipStats.total(per_worker.values())
        self._check(final=True)

    def _check(self, final: bool) -> None:
        st = self.skip_stats
        if final and st.ok == 0:
            raise DataError(
                f"no usable sample in {len(self.dataset.shards)} shard(s) "
                f"(e.g. {self.dataset.shards[0]!r}): {st.summary()}; every sample needs an image "
                f"and a .{self.caption_ext} member"
            )
        frac = self.max_skip_fraction
        early = final or frac == 0 or st.seen >= _SKIP_CHECK_MIN_SAMPLES
        if frac is not None and early and st.skipped > frac * st.seen:
            raise DataError(
                f"{st.skipped} of {st.seen} evaluation samples were skipped "
                f"({', '.join(f'{k}={v}' for k, v in st.reasons().items())}); every sample needs "
                f"an image and a .{self.caption_ext} member (missing_caption counts missing "
                "ones); fix the shards or allow skips with --max-skip-fraction"
            )


class LabeledShards:
    """(images [B,3,S,S], labels int64 [B]) from webdataset shards with .json or .cls labels."""

    def __init__(
        self,
        spec: str | Sequence[str],
        num_classes: int,
        image_size: int,
        batch_size: int,
        *,
        label_ext: str = "json",
        workers: int = 0,
        max_skip_fraction: float | None = 0.0,
    ) -> None:
        if label_ext not in LABEL_EXTS:
            raise ConfigError(f"label_ext {label_ext!r} is not one of {LABEL_EXTS}")
        self.num_classes = num_classes
        self.label_ext = label_ext
        self.loader = ShardEvalLoader(
            spec,
            image_size,
            batch_size,
            _LabelOf(label_ext),
            caption_ext=label_ext,
            workers=workers,
            max_skip_fraction=max_skip_fraction,
        )

    @property
    def skip_stats(self) -> SkipStats:
        """Skip counts of the last iteration."""
        return self.loader.skip_stats

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, items in self.loader:
            labels = torch.tensor([label for label, _ in items], dtype=torch.long)
            bad = ((labels < 0) | (labels >= self.num_classes)).nonzero()
            if len(bad):
                label, where = items[int(bad[0, 0])]
                what = (
                    f'.{self.label_ext} member has no integer "label"'
                    if self.label_ext == "json"
                    else ".cls member is not a non-negative integer"
                )
                if label != _NO_LABEL:
                    what = f"label {label} is outside [0, {self.num_classes}) (classnames file)"
                raise DataError(
                    f"sample {where}: {what}; labels must index the classnames file, one "
                    "class per line"
                )
            yield images, labels


def find_images(folder: str) -> list[str]:
    """Sorted image files (png/jpg/jpeg/webp, any case) directly inside ``folder``."""
    exts = tuple(f".{e}" for e in IMAGE_EXTS)
    return sorted(
        os.path.join(folder, name)
        for name in os.listdir(folder)
        if name.lower().endswith(exts) and os.path.isfile(os.path.join(folder, name))
    )


class ImageFolder(Dataset):
    """(image tensor [3,S,S], label) for ``root/<classnames[i]>/*.png|jpg|jpeg|webp``, label i.

    The class subfolders must be exactly the class names (hidden folders are ignored): a missing
    or an extra folder, or a duplicated class name, is a DataError naming it.
    """

    def __init__(self, root: str, classnames: Sequence[str], image_size: int) -> None:
        if not os.path.isdir(root):
            raise DataError(f"image folder {root!r} does not exist")
        seen: set[str] = set()
        for name in classnames:
            if name in seen:
                raise DataError(
                    f"class name {name!r} appears twice in the classnames file; an image folder "
                    "needs one distinct subfolder per class"
                )
            seen.add(name)
        folders = sorted(
            d
            for d in os.listdir(root)
            if not d.startswith(".") and os.path.isdir(os.path.join(root, d))
        )
        missing = [c for c in classnames if c not in folders]
        extra = [d for d in folders if d not in seen]
        if missing or extra:
            parts = []
            if missing:
                parts.append(f"no folder for class {missing[0]!r} ({len(missing)} missing)")
            if extra:
                parts.append(f"folder {extra[0]!r} is not a class name ({len(extra)} extra)")
            raise DataError(
                f"image folder {root!r} does not match the classnames file: "
                f"{'; '.join(parts)}; subfolders must be named exactly as the class names "
                "(for webdataset shards pass a shard spec, not their directory)"
            )
        self.items = [
            (path, label)
            for label, name in enumerate(classnames)
            for path in find_images(os.path.join(root, name))
        ]
        if not self.items:
            raise DataError(f"image folder {root!r} holds no .png/.jpg/.jpeg/.webp image")
        self.transform = ClipEvalTransform(image_size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        return self.transform(open_image(path)), label


def image_folder_loader(
    root: str, classnames: Sequence[str], image_size: int, batch_size: int, workers: int = 0
) -> DataLoader:
    """Batches (images [B,3,S,S], labels [B]) of an :class:`ImageFolder`, in file order."""
    return DataLoader(
        ImageFolder(root, classnames, image_size), batch_size=batch_size, num_workers=workers
    )


def labeled_loader(
    data: str | Sequence[str],
    classnames: Sequence[str],
    image_size: int,
    batch_size: int,
    *,
    workers: int = 0,
    label_ext: str = "json",
    max_skip_fraction: float | None = 0.0,
) -> LabeledShards | DataLoader:
    """Labelled batches from an image folder (``data`` is a directory) or a webdataset spec."""
    if isinstance(data, str) and os.path.isdir(data):
        return image_folder_loader(data, classnames, image_size, batch_size, workers)
    return LabeledShards(
        data,
        len(classnames),
        image_size,
        batch_size,
        label_ext=label_ext,
        workers=workers,
        max_skip_fraction=max_skip_fraction,
    )


def caption_loader(
    spec: str | Sequence[str],
    image_size: int,
    batch_size: int,
    *,
    workers: int = 0,
    max_skip_fraction: float | None = 0.0,
    lines: bool = False,
) -> ShardEvalLoader:
    """Batches (images [B,3,S,S], captions) of (image, .txt caption) shards, in order.

    ``captions`` is a list of str, or with ``lines`` a list of each image's caption lines.
    """
    return ShardEvalLoader(
        spec,
        image_size,
        batch_size,
        _caption_lines if lines else _caption_of,
        workers=workers,
        max_skip_fraction=max_skip_fraction,
    )


def open_image(path: str) -> Image.Image:
    """Decode one image file fully (DataError if it cannot be decoded)."""
    with open(path, "rb") as f:
        image, reason = decode_image(f.read(), DEFAULT_MAX_IMAGE_PIXELS)
    if image is None:
        raise DataError(f"cannot use image {path!r}: {reason}")
    return image
