"""A DataLoader over webdataset shards yielding ``(images [B,3,H,W] float32, tokens [B,L] int64)``.

Batches are assembled and tokenized inside the DataLoader workers. Each worker sends, with every
batch, its cumulative SkipStats and its data position after the batch (and a stats-only message
after each run of ``batch_size`` skips, and one at its end), so the main process can expose the
total in ``loader.skip_stats``, apply the ``max_skip_fraction`` policy with one clear DataError,
and checkpoint the position of exactly the batches it has handed out (:meth:`WebLoader.state_dict`).

Batch order: round robin over the workers that still have data, one batch each, starting at
worker 0 (the order of torch's DataLoader when no worker skips anything); the order is kept in
the main process from the workers' own sequences, so it does not depend on timing, and a resumed
loader continues it with the worker whose turn it is.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from megaclip.data.position import Unit
from megaclip.data.reader import DEFAULT_MAX_IMAGE_PIXELS, WebDataset
from megaclip.data.stats import SkipStats
from megaclip.data.transforms import clip_transform
from megaclip.errors import ConfigError, DataError

Tokenizer = Callable[[list[str]], torch.Tensor]

BATCH, STATS, END, ERROR = "batch", "stats", "end", "error"


@dataclass(frozen=True)
class WorkerStart:
    """Where one worker starts: its remaining units (None: a fresh stream) and its stats."""

    units: tuple[Unit, ...] | None
    stats: SkipStats


class _BatchStream(IterableDataset):
    """Per-worker messages (kind, images, tokens, keys, cumulative stats, worker, position)."""

    def __init__(self, dataset: WebDataset, tokenizer: Tokenizer, batch_size: int, drop_last: bool):
        super().__init__()
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.starts: dict[int, WorkerStart] | None = None  # set by WebLoader.load_state_dict
        # transforms with a uint8 fast path: stack uint8 images, normalise the batch at once
        transform = dataset.transform
        self._normalize = (
            getattr(transform, "normalize", None) if getattr(transform, "fast", False) else None
        )
        dataset.raw_pixels = self._normalize is not None

    def _images(self, images: list[torch.Tensor]) -> torch.Tensor:
        batch = torch.stack(images)
        return self._normalize(batch) if self._normalize is not None else batch

    def _tokens(self, captions: list[str]) -> torch.Tensor:
        tokens = torch.as_tensor(self.tokenizer(captions))
        if tokens.ndim != 2 or tokens.shape[0] != len(captions):
            raise DataError(
                f"the tokenizer returned shape {tuple(tokens.shape)} for {len(captions)} captions; "
                "it must return [N, context_length]"
            )
        return tokens.long()

    def start_of(self, worker: int, num_workers: int) -> WorkerStart:
        """Where ``worker`` starts this iteration (resumed, or the epoch's fresh stream)."""
        start = (self.starts or {}).get(worker)
        if start is not None and start.units is not None:
            return start
        units = self.dataset.fresh_units(worker, num_workers)
        return WorkerStart(units, start.stats if start is not None else SkipStats())

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        start = self.start_of(worker, num_workers)  # read now: the plan is cleared after start
        return self._messages(worker, start)

    def _messages(self, worker: int, start: WorkerStart) -> Iterator[tuple[Any, ...]]:
        stats = start.stats.copy()
        units: tuple[Unit, ...] = start.units or ()
        images: list[torch.Tensor] = []
        captions: list[str] = []
        keys: list[str] = []
        skips = 0
        try:
            for sample, units in self.dataset.iter_positions(start.units or (), stats, check=False):  # noqa: B020
                if sample is None:
                    skips += 1
                    if skips >= self.batch_size:
                        yield STATS, None, None, None, stats.copy(), worker, units
                        skips = 0
                    continue
                images.append(sample.image)
                captions.append(sample.caption)
                keys.append(f"{sample.shard}:{sample.key}")
                if len(images) == self.batch_size:
                    tokens = self._tokens(captions)
                    yield BATCH, self._images(images), tokens, keys, stats.copy(), worker, units
                    images, captions, keys, skips = [], [], [], 0
            if images and not self.drop_last:
                tokens = self._tokens(captions)
                yield BATCH, self._images(images), tokens, keys, stats.copy(), worker, ()
        except DataError as err:  # raised cleanly by the main process, without a traceback
            yield ERROR, None, None, str(err), stats.copy(), worker, units
            return
        yield END, None, None, None, stats.copy(), worker, ()


class WebLoader(DataLoader):
    """DataLoader of (images, tokens) batches over a WebDataset, with aggregated ``skip_stats``.

    ``len()`` (epoch mode only) is the number of batches this rank yields when no sample is
    skipped: exact for clean shards, an upper bound otherwise; it scans tar headers once.
    ``state_dict()`` / ``load_state_dict()``: the data position after the last batch handed out.
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
        self._units: dict[int, tuple[Unit, ...]] = {}
        self._next_worker = 0
        self._resume_next = 0
        self.last_keys: list[str] = []

    @property
    def webdataset(self) -> WebDataset:
        """The underlying sample dataset."""
        return self.dataset.dataset

    @property
    def consumers(self) -> int:
        """Streams per rank: the DataLoader workers (one without workers)."""
        return max(1, self.num_workers)

    @property
    def skip_stats(self) -> SkipStats:
        """Skip statistics of the current (or last) iteration, summed over workers."""
        return SkipStats.total(self._worker_stats.values())

    def set_epoch(self, epoch: int) -> None:
        """Use epoch ``epoch``'s shard order / resampling stream from the next ``iter()`` on."""
        self.webdataset.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch handed out: per worker its remaining units and stats."""
        return {
            "epoch": self.webdataset.epoch,
            "generation": self.webdataset.generation,
            "next_worker": self._next_worker,
            "units": [self._units.get(w) for w in range(self.consumers)],
            "stats": [self._worker_stats.get(w, SkipStats()) for w in range(self.consumers)],
        }

    def load_state_dict(
        self,
        units: Sequence[tuple[Unit, ...] | None],
        stats: Sequence[SkipStats],
        next_worker: int,
        generation: int,
    ) -> None:
        """Start the next iteration at these per-worker positions (None: a fresh stream)."""
        if len(units) != self.consumers or len(stats) != self.consumers:
            raise ConfigError(f"{len(units)} worker positions for {self.consumers} worker(s)")
        self.webdataset.generation = generation
        self.dataset.starts = {w: WorkerStart(units[w], stats[w]) for w in range(self.consumers)}
        self._resume_next = next_worker % self.consumers

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:  # type: ignore[override]
        stream: _BatchStream = self.dataset
        n = self.consumers
        starts = {w: stream.start_of(w, n) for w in range(n)}
        self._worker_stats = {w: s.stats.copy() for w, s in starts.items()}
        self._units = {w: s.units or () for w, s in starts.items()}
        self._next_worker, self._resume_next = self._resume_next, 0
        messages = super().__iter__()
        stream.starts = None  # the workers (or the in-process iterator) took their starts
        live = [w for w in range(n) if self._units[w]]
        queues: dict[int, deque] = {w: deque() for w in range(n)}
        num_shards = len(self.webdataset.shards)
        while live:
            w = next(x for k in range(n) if (x := (self._next_worker + k) % n) in live)
            while True:
                if not queues[w]:
                    msg = next(messages)
                    queues[msg[5]].append(msg)
                    continue
                kind, images, tokens, keys, stats, _, units = queues[w].popleft()
                self._worker_stats[w] = stats
                self._units[w] = units
                if kind == ERROR:
                    raise DataError(keys)
                self.skip_stats.check(
                    self.max_skip_fraction, self.skip_check_min_samples, num_shards=num_shards
                )
                if kind == STATS:
                    continue
                self._next_worker = (w + 1) % n
                if kind == END:
                    live.remove(w)
                    break
                self.last_keys = keys
                yield images, tokens
                break
        for _ in messages:  # let the DataLoader finish its bookkeeping
            pass
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
    fast_decode: bool | None = None,
) -> WebLoader:
    """A loader of (images float32 [B,3,S,S], tokens int64 [B,L]) for DP rank ``dp_rank``.

    ``train``: random-resized-crop transform, shuffled shard order, shuffle windows of 1000
    samples and ``drop_last`` (per worker) by default; otherwise center crop, spec order, no
    shuffling, and the last partial batch of each worker is kept. ``fast_decode``: decode JPEGs at
    reduced size where the output allows (default: on for training, off for evaluation, which
    then equals open_clip's preprocessing; see docs/data.md). ``tokenizer`` maps a list of N
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
        transform=clip_transform(
            image_size, train=train, seed=seed, fast=train if fast_decode is None else fast_decode
        ),
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
