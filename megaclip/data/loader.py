"""A DataLoader over webdataset shards yielding ``(images [B,3,H,W] float32, tokens [B,L] int64)``.

Batches are assembled and tokenized inside the DataLoader workers. Each worker also sends its
cumulative SkipStats with every batch (and a stats-only message after each run of ``batch_size``
skips and at its end), so the main process can expose the total in ``loader.skip_stats`` and
apply the ``max_skip_fraction`` policy with one clear DataError.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megaclip.data.transforms import clip_transform
from megaclip.data.webdataset import DEFAULT_MAX_IMAGE_PIXELS, SkipStats, WebDataset
from megaclip.errors import ConfigError, DataError

Tokenizer = Callable[[list[str]], torch.Tensor]


class _BatchStream(IterableDataset):
    """Per-worker batches (images, tokens, cumulative stats, worker id); images None: stats only."""

    def __init__(self, dataset: WebDataset, tokenizer: Tokenizer, batch_size: int, drop_last: bool):
        super().__init__()
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.drop_last = drop_last

    def _tokens(self, captions: list[str]) -> torch.Tensor:
        tokens = torch.as_tensor(self.tokenizer(captions))
        if tokens.ndim != 2 or tokens.shape[0] != len(captions):
            raise DataError(
                f"the tokenizer returned shape {tuple(tokens.shape)} for {len(captions)} captions; "
                "it must return [N, context_length]"
            )
        return tokens.long()

    def __iter__(self) -> Iterator[tuple[Any, Any, SkipStats, int]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stats = SkipStats()
        images: list[torch.Tensor] = []
        captions: list[str] = []
        skips = 0
        samples = self.dataset.iter_samples(
            worker, num_workers, stats=stats, check=False, yield_skips=True
        )
        for sample in samples:
            if sample is None:
                skips += 1
                if skips >= self.batch_size:
                    yield None, None, stats.copy(), worker
                    skips = 0
                continue
            images.append(sample.image)
            captions.append(sample.caption)
            if len(images) == self.batch_size:
                yield torch.stack(images), self._tokens(captions), stats.copy(), worker
                images, captions, skips = [], [], 0
        if images and not self.drop_last:
            yield torch.stack(images), self._tokens(captions), stats.copy(), worker
        yield None, None, stats.copy(), worker


class WebLoader(DataLoader):
    """DataLoader of (images, tokens) batches over a WebDataset, with aggregated ``skip_stats``.

    ``len()`` (epoch mode only) is the number of batches this rank yields when no sample is
    skipped: exact for clean shards, an upper bound otherwise; it scans tar headers once.
    """

    def __init__(
        self,
        stream: _BatchStream,
        *,
        num_workers: int,
        max_skip_fraction: float | None,
        skip_check_min_samples: int,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
    ) -> None:
        kwargs: dict[str, Any] = {}
        if num_workers > 0 and prefetch_factor is not None:
            kwargs["prefetch_factor"] = prefetch_factor
        super().__init__(
            stream,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=False,
            **kwargs,
        )
        self.max_skip_fraction = max_skip_fraction
        self.skip_check_min_samples = skip_check_min_samples
        self._worker_stats: dict[int, SkipStats] = {}

    @property
    def webdataset(self) -> WebDataset:
        """The underlying sample dataset."""
        return self.dataset.dataset

    @property
    def skip_stats(self) -> SkipStats:
        """Skip statistics of the current (or last) iteration, summed over workers."""
        return SkipStats.total(self._worker_stats.values())

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s shard order / resampling stream from the next ``iter()`` on."""
        self.webdataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[override]
        self._worker_stats = {}
        num_shards = len(self.webdataset.shards)
        for images, tokens, stats, worker in super().__iter__():
            self._worker_stats[worker] = stats
            self.skip_stats.check(
                self.max_skip_fraction, self.skip_check_min_samples, num_shards=num_shards
            )
            if images is not None:
                yield images, tokens
        self.skip_stats.check(self.max_skip_fraction, self.skip_check_min_samples, final=True)

    def __len__(self) -> int:
        ds = self.webdataset
        if ds.mode != "epoch":
            raise TypeError("a resampled webdataset loader is infinite: it has no length")
        b = self.dataset.batch_size
        per_worker = ds.groups_per_worker(self.num_workers)
        if self.dataset.drop_last:
            return sum(n // b for n in per_worker)
        return sum(-(-n // b) for n in per_worker)


def build_webdataset_loader(
    spec: str | Sequence[str],
    tokenizer: Tokenizer,
    image_size: int,
    batch_size: int,
    dp_rank: int = 0,
    dp_size: int = 1,
    workers: int = 0,
    mode: str = "epoch",
    seed: int = 0,
    train: bool = True,
    *,
    shuffle_buffer: int | None = None,
    drop_last: bool | None = None,
    max_skip_fraction: float | None = 0.5,
    skip_check_min_samples: int = 100,
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    pin_memory: bool = False,
    prefetch_factor: int | None = None,
) -> WebLoader:
    """A loader of (images float32 [B,3,S,S], tokens int64 [B,L]) for DP rank ``dp_rank``.

    ``train``: random-resized-crop transform, shuffled shard order, a shuffle buffer of 1000
    samples and ``drop_last`` (per worker) by default; otherwise center crop, spec order, no
    shuffling, and the last partial batch of each worker is kept. ``tokenizer`` maps a list of N
    captions to a LongTensor [N, L]; with ``workers > 0`` it runs in the worker processes (it must
    be picklable under the 'spawn' start method).
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    if workers < 0:
        raise ConfigError(f"workers={workers} must be >= 0")
    dataset = WebDataset(
        spec,
        dp_rank=dp_rank,
        dp_size=dp_size,
        mode=mode,
        seed=seed,
        shuffle_shards=train,
        shuffle_buffer=(1000 if train else 0) if shuffle_buffer is None else shuffle_buffer,
        transform=clip_transform(image_size, train=train, seed=seed),
        max_image_pixels=max_image_pixels,
        max_skip_fraction=max_skip_fraction,
        skip_check_min_samples=skip_check_min_samples,
    )
    stream = _BatchStream(dataset, tokenizer, batch_size, train if drop_last is None else drop_last)
    return WebLoader(
        stream,
        num_workers=workers,
        max_skip_fraction=max_skip_fraction,
        skip_check_min_samples=skip_check_min_samples,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
    )
