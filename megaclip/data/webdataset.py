"""LAION-style webdataset shards: reader (DP x worker splitting, skip policy) and writer.

A shard is a tar file whose members are grouped by key, as img2dataset writes them:
``KEY.jpg`` (or ``.jpeg`` / ``.png`` / ``.webp``) + ``KEY.txt`` [+ ``KEY.json``], members of one
sample adjacent. The key is the member path up to the first dot of its file name; the extension
(lower-cased) is the rest.

Splitting: the dataset takes only the data-parallel coordinates (``dp_rank``, ``dp_size``); every
rank of one tensor/pipeline-parallel group must pass the same DP coordinates so that they see the
same samples. Inside a rank, the shards are split again across DataLoader workers. The
``(rank, worker)`` pairs form ``C = dp_size * num_workers`` consumers, consumer id
``c = dp_rank + dp_size * worker``. See :func:`plan_epoch_shards` and docs/data.md.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import logging
import os
import random
import tarfile
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from megaclip.data.shardspec import resolve_shards
from megaclip.data.tario import TarReadError, iter_tar, scan_tar_names
from megaclip.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Pillow refuses (DecompressionBombError) above 2 * Image.MAX_IMAGE_PIXELS; this is our own limit.
DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024
MODES = ("epoch", "resampled")
_READ_BUFFER = 1 << 20  # large reads suit network file systems; seeks inside it cost no syscall

SAMPLE_REASONS = (
    "missing_image",
    "missing_caption",
    "bad_caption_encoding",
    "empty_image",
    "undecodable_image",
    "image_too_large",
)
SHARD_REASONS = ("truncated_tar", "corrupt_tar", "unreadable_shard")


@dataclass
class SkipStats:
    """Counts of usable samples and of skipped samples / shards, per reason.

    Sample reasons count samples (tar key groups); shard reasons count shards that could not be
    read to their end (the samples after the break are lost and not counted).
    """

    ok: int = 0
    missing_image: int = 0
    missing_caption: int = 0
    bad_caption_encoding: int = 0
    empty_image: int = 0
    undecodable_image: int = 0
    image_too_large: int = 0
    shards_read: int = 0
    truncated_tar: int = 0
    corrupt_tar: int = 0
    unreadable_shard: int = 0

    def count(self, reason: str) -> None:
        """Add one to the counter named ``reason``."""
        setattr(self, reason, getattr(self, reason) + 1)

    @property
    def skipped(self) -> int:
        """Number of skipped samples (all sample reasons)."""
        return sum(getattr(self, r) for r in SAMPLE_REASONS)

    @property
    def seen(self) -> int:
        """Samples looked at: ok + skipped."""
        return self.ok + self.skipped

    @property
    def shard_errors(self) -> int:
        """Number of shards that stopped early (all shard reasons)."""
        return sum(getattr(self, r) for r in SHARD_REASONS)

    @property
    def skip_fraction(self) -> float:
        """skipped / seen (0 when nothing was seen)."""
        return self.skipped / self.seen if self.seen else 0.0

    def reasons(self) -> dict[str, int]:
        """Non-zero counters of every skip reason (sample and shard)."""
        names = SAMPLE_REASONS + SHARD_REASONS
        return {r: getattr(self, r) for r in names if getattr(self, r)}

    def copy(self) -> SkipStats:
        """An independent copy."""
        return dataclasses.replace(self)

    def __add__(self, other: SkipStats) -> SkipStats:
        """Field-wise sum."""
        return SkipStats(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in _FIELDS}
        )

    @classmethod
    def total(cls, parts: Iterable[SkipStats]) -> SkipStats:
        """Field-wise sum of several stats (e.g. one per DataLoader worker)."""
        out = cls()
        for p in parts:
            out = out + p
        return out

    def summary(self) -> str:
        """One line: ok, skipped with reasons, shards read and failed."""
        reasons = ", ".join(f"{k}={v}" for k, v in self.reasons().items()) or "none"
        return (
            f"ok={self.ok} skipped={self.skipped} ({self.skip_fraction:.1%}) "
            f"shards_read={self.shards_read} skip reasons: {reasons}"
        )

    def check(
        self,
        max_skip_fraction: float | None,
        min_samples: int = 100,
        *,
        final: bool = False,
        num_shards: int | None = None,
    ) -> None:
        """Raise DataError when the data is unusable.

        Fatal when (a) skipped/seen > max_skip_fraction once at least ``min_samples`` samples were
        seen (or at the end, ``final``); (b) at the end, nothing usable was found although
        something was skipped; (c) no usable sample and at least ``num_shards`` shard failures.
        """
        seen = self.seen
        if (
            max_skip_fraction is not None
            and seen
            and (final or seen >= min_samples)
            and self.skipped > max_skip_fraction * seen
        ):
            raise DataError(
                f"{self.skipped} of {seen} samples ({self.skip_fraction:.1%}) were skipped, above "
                f"max_skip_fraction={max_skip_fraction}: {self._reason_text()}; check the shards "
                "(megaclip data inspect SPEC) or raise max_skip_fraction"
            )
        no_data = self.ok == 0 and (self.skipped or self.shard_errors)
        if no_data and (final or (num_shards is not None and self.shard_errors >= num_shards)):
            raise DataError(
                f"no usable sample in the shards: {self._reason_text()}; "
                "check the shards with `megaclip data inspect SPEC`"
            )

    def _reason_text(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.reasons().items()) or "no reason recorded"


_FIELDS = dataclasses.fields(SkipStats)


class Sample(NamedTuple):
    """One decoded sample: image (transformed tensor, or PIL image without transform), caption."""

    key: str
    image: Any
    caption: str
    meta: dict | None
    shard: str


@dataclass(frozen=True)
class EpochPlan:
    """Which shards one consumer reads in one epoch.

    ``whole``: shard indices this consumer reads entirely (shard-level split).
    ``shared``: the remainder shards, read by every consumer; of their key groups, numbered
    ``g = 0, 1, ...`` over the shards in order, this consumer keeps those with
    ``g % num_consumers == consumer`` (sample-level round robin).
    """

    whole: tuple[int, ...]
    shared: tuple[int, ...]
    consumer: int
    num_consumers: int


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    """The global shard order of an epoch: identity, or a permutation seeded by (seed, epoch)."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(f"shards:{seed}:{epoch}").shuffle(order)
    return order


def plan_epoch_shards(
    num_shards: int, num_consumers: int, consumer: int, seed: int, epoch: int, shuffle: bool
) -> EpochPlan:
    """Split an epoch's shards among consumers so that every sample is read exactly once.

    In the global order, the first ``F = num_shards - num_shards % num_consumers`` shards are dealt
    round-robin (consumer c gets positions c, c + C, ...); the last ``num_shards % C`` shards are
    shared at sample level. With ``num_shards < C`` every shard is shared.
    """
    if not 0 <= consumer < num_consumers:
        raise ConfigError(f"consumer {consumer} is not in [0, {num_consumers})")
    order = shard_order(num_shards, seed, epoch, shuffle)
    full = num_shards - num_shards % num_consumers
    return EpochPlan(
        whole=tuple(order[consumer:full:num_consumers]),
        shared=tuple(order[full:]),
        consumer=consumer,
        num_consumers=num_consumers,
    )


def split_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a member path: key up to the first dot of the file name.

    None for members that belong to no sample (no extension, or a hidden file).
    """
    slash = name.rfind("/")
    base = name[slash + 1 :]
    stem, dot, ext = base.partition(".")
    if not dot or not stem or not ext:
        return None
    return name[: slash + 1] + stem, ext.lower()


class _GroupCounter:
    """Numbers key groups across shards and decides, per group, whether this consumer keeps it."""

    def __init__(self, keep: Callable[[int], bool]) -> None:
        self.keep = keep
        self.index = -1
        self.key: str | None = None
        self.owned = True

    def new_shard(self) -> None:
        self.key = None

    def want(self, name: str) -> bool:
        split = split_name(name)
        if split is None:
            return False
        if split[0] != self.key:
            self.key = split[0]
            self.index += 1
            self.owned = self.keep(self.index)
        return self.owned


def _shard_groups(path: str, counter: _GroupCounter) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield (key, {ext: bytes}) for the groups of one shard that ``counter`` keeps.

    Raises TarReadError / OSError when the shard breaks; the incomplete last group is dropped.
    """
    counter.new_shard()
    key: str | None = None
    members: dict[str, bytes] = {}
    with open(path, "rb", buffering=_READ_BUFFER) as f:
        for name, data in iter_tar(f, counter.want):
            if data is None:
                continue
            k, ext = split_name(name)  # type: ignore[misc]  # want() filtered unsplittable names
            if k != key:
                if members:
                    yield key, members  # type: ignore[misc]
                key, members = k, {}
            members[ext] = data
    if members:
        yield key, members  # type: ignore[misc]


def count_groups(path: str) -> tuple[int, str | None]:
    """Number of key groups in a shard from its headers only, and the tar error reason if any."""
    names, reason = scan_tar_names(path)
    counter = _GroupCounter(lambda _i: True)
    for name in names:
        counter.want(name)
    return counter.index + 1, reason


def _shuffled(items: Iterator[Any], bufsize: int, rng: random.Random) -> Iterator[Any]:
    """Shuffle a stream through a buffer of ``bufsize`` items; None items pass straight through."""
    buf: list[Any] = []
    for item in items:
        if item is None:
            yield None
            continue
        if len(buf) < bufsize:
            buf.append(item)
            continue
        k = rng.randrange(len(buf))
        yield buf[k]
        buf[k] = item
    rng.shuffle(buf)
    yield from buf


def _accepts_rng(fn: Callable[..., Any]) -> bool:
    """True when ``fn`` takes an ``rng`` argument (megaclip transforms do, torchvision's don't)."""
    try:
        return "rng" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def decode_image(data: bytes, max_pixels: int) -> tuple[Image.Image | None, str | None]:
    """Decode image bytes fully; (image, None) or (None, skip reason)."""
    if not data:
        return None, "empty_image"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                return None, "image_too_large"
            img.load()
        except Image.DecompressionBombError:
            return None, "image_too_large"
        except Exception:  # any decoder failure on untrusted bytes is a skipped sample
            return None, "undecodable_image"
    if width == 0 or height == 0:
        return None, "undecodable_image"
    return img, None


class WebDataset(IterableDataset):
    """Iterate the samples of webdataset shards for one DP rank, split across DataLoader workers.

    ``mode='epoch'``: each epoch (``set_epoch``) reads every sample exactly once across all
    ``dp_size x num_workers`` consumers (:func:`plan_epoch_shards`), shard order shuffled by
    (seed, epoch) when ``shuffle_shards``. ``mode='resampled'``: infinite; each consumer draws
    shards with replacement from a generator seeded by (seed, epoch, dp_rank, worker).
    Bad samples are skipped and counted in ``skip_stats`` (reset at each iteration start, of this
    process only: with DataLoader workers use the loader's ``skip_stats``); when the skipped
    fraction exceeds ``max_skip_fraction`` (after ``skip_check_min_samples`` samples, or at the
    end of an epoch) iteration raises DataError.
    """

    def __init__(
        self,
        spec: str | Sequence[str],
        *,
        dp_rank: int = 0,
        dp_size: int = 1,
        mode: str = "epoch",
        seed: int = 0,
        shuffle_shards: bool = False,
        shuffle_buffer: int = 0,
        transform: Callable[..., Any] | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        max_skip_fraction: float | None = 0.5,
        skip_check_min_samples: int = 100,
        image_exts: Sequence[str] = IMAGE_EXTS,
        caption_ext: str = "txt",
        decode_json: bool = False,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"data mode {mode!r} is unknown; use one of {MODES}")
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ConfigError(f"dp_rank={dp_rank} is not in [0, dp_size={dp_size})")
        if shuffle_buffer < 0 or max_image_pixels < 1:
            raise ConfigError("shuffle_buffer must be >= 0 and max_image_pixels >= 1")
        if max_skip_fraction is not None and not 0.0 <= max_skip_fraction <= 1.0:
            raise ConfigError(f"max_skip_fraction={max_skip_fraction} is not in [0, 1]")
        self.shards = resolve_shards(spec)
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.mode = mode
        self.seed = seed
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = shuffle_buffer
        self.transform = transform
        self._transform_rng = transform is not None and _accepts_rng(transform)
        self.max_image_pixels = max_image_pixels
        self.max_skip_fraction = max_skip_fraction
        self.skip_check_min_samples = skip_check_min_samples
        self.image_exts = tuple(e.lower() for e in image_exts)
        self.caption_ext = caption_ext.lower()
        self.decode_json = decode_json
        self.epoch = 0
        self.skip_stats = SkipStats()
        self._group_counts: dict[str, int] = {}

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shard order / resampling stream the next iteration uses."""
        self.epoch = int(epoch)

    def consumer(self, worker: int, num_workers: int) -> tuple[int, int]:
        """(consumer id, number of consumers) of DataLoader worker ``worker`` on this rank."""
        if num_workers < 1 or not 0 <= worker < num_workers:
            raise ConfigError(f"worker {worker} is not in [0, num_workers={num_workers})")
        return self.dp_rank + self.dp_size * worker, self.dp_size * num_workers

    def plan(self, worker: int = 0, num_workers: int = 1) -> EpochPlan:
        """This epoch's shard plan for one worker of this rank (epoch mode)."""
        c, n = self.consumer(worker, num_workers)
        return plan_epoch_shards(len(self.shards), n, c, self.seed, self.epoch, self.shuffle_shards)

    def shard_group_count(self, path: str) -> int:
        """Key groups in one shard (header scan, cached)."""
        if path not in self._group_counts:
            self._group_counts[path] = count_groups(path)[0]
        return self._group_counts[path]

    def groups_per_worker(self, num_workers: int) -> list[int]:
        """Key groups each worker of this rank reads this epoch (epoch mode; before skips)."""
        if self.mode != "epoch":
            raise TypeError("a resampled dataset is infinite: it has no length")
        out = []
        for w in range(max(1, num_workers)):
            p = self.plan(w, max(1, num_workers))
            n = sum(self.shard_group_count(self.shards[i]) for i in p.whole)
            total = sum(self.shard_group_count(self.shards[i]) for i in p.shared)
            n += total // p.num_consumers + (1 if p.consumer < total % p.num_consumers else 0)
            out.append(n)
        return out

    def __iter__(self) -> Iterator[Sample]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self.skip_stats = SkipStats()
        for sample in self.iter_samples(worker, num_workers, stats=self.skip_stats):
            if sample is not None:
                yield sample

    def iter_samples(
        self,
        worker: int = 0,
        num_workers: int = 1,
        *,
        stats: SkipStats | None = None,
        check: bool = True,
        yield_skips: bool = False,
    ) -> Iterator[Sample | None]:
        """Samples of one worker of this rank; ``yield_skips`` also yields None for each skip.

        ``stats`` (a fresh SkipStats when None) is updated in place; ``check`` applies the
        ``max_skip_fraction`` policy to it.
        """
        stats = SkipStats() if stats is None else stats
        c, n = self.consumer(worker, num_workers)
        tag = f"{self.seed}:{self.epoch}:{self.dp_rank}:{worker}:{self.dp_size}:{num_workers}"
        if self.mode == "epoch":
            groups = self._epoch_groups(self.plan(worker, num_workers), stats)
        else:
            groups = self._resampled_groups(random.Random(f"resampled:{tag}"), stats)
        if self.shuffle_buffer > 1:
            groups = _shuffled(groups, self.shuffle_buffer, random.Random(f"buffer:{tag}"))
        aug_rng = random.Random(f"augment:{tag}")
        max_frac = self.max_skip_fraction if check else None
        for group in groups:
            if group is None:  # a shard stopped early (already counted)
                if check:
                    stats.check(max_frac, self.skip_check_min_samples, num_shards=len(self.shards))
                if yield_skips:
                    yield None
                continue
            sample = self._decode(group, stats, aug_rng)
            if check:
                stats.check(max_frac, self.skip_check_min_samples, num_shards=len(self.shards))
            if sample is not None or yield_skips:
                yield sample
        if check:
            stats.check(max_frac, self.skip_check_min_samples, final=True)

    def _read(
        self, paths: Sequence[str], counter: _GroupCounter, stats: SkipStats, owns: bool
    ) -> Iterator[tuple[str, dict[str, bytes], str] | None]:
        """Groups of consecutive shards; a broken shard is counted (when ``owns``) and stopped."""
        for path in paths:
            try:
                for key, members in _shard_groups(path, counter):
                    yield key, members, path
            except TarReadError as err:
                if owns:
                    stats.count(err.reason)
                    log.warning("shard %s: %s (%s); skipping the rest of it", path, err, err.reason)
                yield None
                continue
            except OSError as err:
                if owns:
                    stats.count("unreadable_shard")
                    log.warning("shard %s cannot be read: %s; skipping it", path, err)
                yield None
                continue
            if owns:
                stats.shards_read += 1

    def _epoch_groups(
        self, plan: EpochPlan, stats: SkipStats
    ) -> Iterator[tuple[str, dict[str, bytes], str] | None]:
        whole = [self.shards[i] for i in plan.whole]
        yield from self._read(whole, _GroupCounter(lambda _i: True), stats, owns=True)
        c, n = plan.consumer, plan.num_consumers
        counter = _GroupCounter(lambda g: g % n == c)
        for j, i in enumerate(plan.shared):  # shard errors are counted by one consumer only
            yield from self._read([self.shards[i]], counter, stats, owns=j % n == c)

    def _resampled_groups(
        self, rng: random.Random, stats: SkipStats
    ) -> Iterator[tuple[str, dict[str, bytes], str] | None]:
        counter = _GroupCounter(lambda _i: True)
        limit = max(16, 4 * len(self.shards))
        empty_draws = 0  # consecutive draws that gave no group: all-empty data would spin forever
        while True:
            path = self.shards[rng.randrange(len(self.shards))]
            before = counter.index
            yield from self._read([path], counter, stats, owns=True)
            empty_draws = empty_draws + 1 if counter.index == before else 0
            if empty_draws >= limit:
                raise DataError(
                    f"resampled data: {limit} shard draws in a row gave no sample "
                    f"({len(self.shards)} shards, e.g. {path!r}); the shards are empty or broken: "
                    "check them with `megaclip data inspect SPEC`"
                )

    def _decode(
        self, group: tuple[str, dict[str, bytes], str], stats: SkipStats, rng: random.Random
    ) -> Sample | None:
        key, members, shard = group
        image_ext = next((e for e in self.image_exts if e in members), None)
        if image_ext is None:
            stats.count("missing_image")
            return None
        raw_caption = members.get(self.caption_ext)
        if raw_caption is None:
            stats.count("missing_caption")
            return None
        try:
            caption = raw_caption.decode("utf-8").strip()
        except UnicodeDecodeError:
            stats.count("bad_caption_encoding")
            return None
        if not caption:
            stats.count("missing_caption")
            return None
        image, reason = decode_image(members[image_ext], self.max_image_pixels)
        if image is None:
            stats.count(reason)  # type: ignore[arg-type]
            return None
        if self.transform is not None:
            try:
                image = (
                    self.transform(image, rng=rng) if self._transform_rng else self.transform(image)
                )
            except (OSError, ValueError) as err:  # e.g. an image mode that cannot become RGB
                log.debug("sample %s of %s: transform failed: %s", key, shard, err)
                stats.count("undecodable_image")
                return None
        meta = None
        if self.decode_json and "json" in members:
            try:
                meta = json.loads(members["json"].decode("utf-8"))
            except ValueError:  # metadata is optional: a broken one is dropped, the sample kept
                meta = None
        stats.ok += 1
        return Sample(key, image, caption, meta, shard)


def _sniff_image_ext(data: bytes) -> str:
    """File extension for encoded image bytes, from their magic number."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8"):
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise DataError("image bytes are not PNG, JPEG or WebP: pass image_ext explicitly")


_PIL_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}


class ShardWriter:
    """Write samples into numbered tar shards of at most ``max_count`` samples each.

    ``pattern`` names shard ``i`` by ``pattern % i`` (``out/train-%06d.tar``) or
    ``pattern.format(i)`` (``out/train-{:06d}.tar``). Each shard is written to ``NAME.tmp`` and
    renamed when complete, so a reader never sees a half-written shard. Members are stored with
    fixed metadata (mtime 0, uid 0), so equal input gives byte-identical shards.
    """

    def __init__(
        self,
        pattern: str,
        max_count: int = 10000,
        *,
        max_bytes: int | None = None,
        image_format: str = "png",
        start_index: int = 0,
    ) -> None:
        if max_count < 1:
            raise ConfigError(f"max_count={max_count} must be >= 1")
        if image_format.lower() not in _PIL_FORMATS:
            raise ConfigError(f"image_format {image_format!r} is not one of {list(_PIL_FORMATS)}")
        self.pattern = pattern
        if self._name(0) == self._name(1):
            raise ConfigError(f"shard pattern {pattern!r} has no index field such as %06d")
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.image_format = image_format.lower()
        self.index = start_index
        self.shards: list[str] = []
        self.count = 0
        self._tar: tarfile.TarFile | None = None
        self._tmp = ""
        self._in_shard = 0
        self._bytes = 0

    def _name(self, i: int) -> str:
        return self.pattern % i if "%" in self.pattern else self.pattern.format(i)

    def _open(self) -> None:
        path = self._name(self.index)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._tmp = path + ".tmp"
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self._in_shard = 0
        self._bytes = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        path = self._name(self.index)
        os.replace(self._tmp, path)
        self.shards.append(path)
        self._tar = None
        self.index += 1

    def write(
        self,
        key: str,
        image: bytes | Image.Image,
        caption: str,
        meta: Mapping[str, Any] | None = None,
        *,
        image_ext: str | None = None,
    ) -> None:
        """Add one sample: KEY.<image ext>, KEY.txt (UTF-8) and, when given, KEY.json."""
        if isinstance(image, Image.Image):
            ext = (image_ext or self.image_format).lower()
            if ext not in _PIL_FORMATS:
                raise ConfigError(f"image_ext {ext!r} is not one of {list(_PIL_FORMATS)}")
            buf = io.BytesIO()
            img = image if ext == "png" or image.mode == "RGB" else image.convert("RGB")
            img.save(buf, format=_PIL_FORMATS[ext])
            data = buf.getvalue()
        else:
            data = bytes(image)
            ext = (image_ext or _sniff_image_ext(data)).lower()
        members = {ext: data, "txt": caption.encode("utf-8")}
        if meta is not None:
            members["json"] = json.dumps(dict(meta), sort_keys=True).encode("utf-8")
        self.write_raw(key, members)

    def write_raw(self, key: str, members: Mapping[str, bytes]) -> None:
        """Add one sample given as raw member bytes by extension (no checks on the contents)."""
        base = key.rsplit("/", 1)[-1]
        if not base or "." in base or base.startswith("/") or key.startswith("/"):
            raise DataError(
                f"sample key {key!r} is invalid: it must be a relative name without '.'"
            )
        full = self._tar is not None and (
            self._in_shard >= self.max_count
            or (self.max_bytes is not None and self._bytes >= self.max_bytes)
        )
        if full:
            self._finish()
        if self._tar is None:
            self._open()
        assert self._tar is not None
        for ext, data in members.items():
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(data)
            info.mtime = 0
            info.mode = 0o444
            self._tar.addfile(info, io.BytesIO(data))
            self._bytes += 512 + len(data)
        self._in_shard += 1
        self.count += 1

    def close(self) -> list[str]:
        """Finish the current shard; the list of shard paths written."""
        self._finish()
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.close()
        elif self._tar is not None:  # leave no half-written shard behind
            self._tar.close()
            self._tar = None
            os.remove(self._tmp)


@dataclass(frozen=True)
class ShardReport:
    """What reading one shard found: skip stats (ok / per reason), size and read time."""

    path: str
    stats: SkipStats
    size_bytes: int
    seconds: float


def inspect_shard(path: str, *, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> ShardReport:
    """Decode every sample of one shard (no transform, no skip threshold) and report the counts."""
    t0 = time.perf_counter()
    ds = WebDataset(path, max_image_pixels=max_image_pixels, max_skip_fraction=None)
    stats = SkipStats()
    for _ in ds.iter_samples(stats=stats, check=False):
        pass
    size = os.path.getsize(path) if os.path.exists(path) else 0
    return ShardReport(path, stats, size, time.perf_counter() - t0)
