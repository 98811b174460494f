"""LAION-style webdataset shards: the reader (DP x worker splitting, shuffle windows, skip policy).

A shard is a tar file whose members are grouped by key, as img2dataset writes them:
``KEY.jpg`` (or ``.jpeg`` / ``.png`` / ``.webp``) + ``KEY.txt`` [+ ``KEY.json``], members of one
sample adjacent (see tarindex.py). Shards are local files, ``pipe:`` commands or URLs
(sources.py).

Splitting: the dataset takes only the data-parallel coordinates (``dp_rank``, ``dp_size``); every
rank of one tensor/pipeline-parallel group must pass the same DP coordinates so that they see the
same samples. Inside a rank, the shards are split again across DataLoader workers. The
``(rank, worker)`` pairs form ``C = dp_size * num_workers`` consumers, consumer id
``c = dp_rank + dp_size * worker``. See :func:`plan_epoch_shards` and docs/data.md.

Every consumer's stream is a pure function of its :class:`~megaclip.data.position.StreamId`
(position.py): the reader can start it at any :class:`~megaclip.data.position.Cursor`, which is
how a resumed run continues sample-exactly without replaying the data before it.
"""

from __future__ import annotations

import inspect
import io
import json
import logging
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from megaclip.data.position import (
    Cursor,
    ReadPoint,
    StreamId,
    Unit,
    draw_shard,
    fresh_unit,
    sample_seed,
    window_order,
)
from megaclip.data.shardspec import resolve_shards
from megaclip.data.sources import is_remote, open_shard
from megaclip.data.stats import SkipStats
from megaclip.data.tarindex import iter_groups, shard_index
from megaclip.data.tario import TarReadError, iter_tar_members
from megaclip.errors import ConfigError, DataError

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
# Pillow refuses (DecompressionBombError) above 2 * Image.MAX_IMAGE_PIXELS; this is our own limit.
DEFAULT_MAX_IMAGE_PIXELS = 64 * 1024 * 1024
MODES = ("epoch", "resampled")


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


def count_groups(path: str) -> tuple[int, str | None]:
    """Number of key groups in a local shard from its headers only, and the tar error if any."""
    index = shard_index(path)
    return index.groups, index.error


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    """True when ``fn`` takes an argument ``name`` (megaclip transforms take ``rng``)."""
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def open_image(data: bytes, max_pixels: int) -> tuple[Image.Image | None, str | None]:
    """Parse image bytes up to the header (not decoded yet); (image, None) or (None, reason)."""
    if not data:
        return None, "empty_image"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
            width, height = img.size
        except Image.DecompressionBombError:
            return None, "image_too_large"
        except Exception:  # any decoder failure on untrusted bytes is a skipped sample
            return None, "undecodable_image"
    if width * height > max_pixels:
        return None, "image_too_large"
    if width == 0 or height == 0:
        return None, "undecodable_image"
    return img, None


def decode_image(data: bytes, max_pixels: int) -> tuple[Image.Image | None, str | None]:
    """Decode image bytes fully; (image, None) or (None, skip reason)."""
    img, reason = open_image(data, max_pixels)
    if img is None:
        return None, reason
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img.load()
        except Image.DecompressionBombError:
            return None, "image_too_large"
        except Exception:  # any decoder failure on untrusted bytes is a skipped sample
            return None, "undecodable_image"
    return img, None


Item = tuple[str, "dict[str, bytes] | None", str]  # (key, member bytes or None, shard)


@dataclass(frozen=True)
class _Shard:
    """One shard of a stream: its spec string, whether it is sample-level shared, who counts it."""

    url: str
    shared: bool
    owns: bool


class _Reader:
    """Reads one stream's key groups from a ReadPoint on, across shards, with their positions.

    ``quiet``: count nothing (a window read again after a resume was counted when first read);
    ``replay_failed``: shards that broke during that window's first read: stop them at the
    same group. ``failed`` collects the breaks of the window being read.
    """

    def __init__(self, ds: WebDataset, stream: StreamId, stats: SkipStats) -> None:
        self.ds = ds
        self.stream = stream
        self.stats = stats
        self.tag = stream.tag(ds.seed)
        self.quiet = False
        self.replay_failed: dict[int, int] = {}
        self.failed: dict[int, int] = {}
        self.needed: set[int] | None = None
        self.announced = 0
        if ds.mode == "epoch":
            plan = plan_epoch_shards(
                len(ds.shards),
                stream.consumers,
                stream.consumer,
                ds.seed,
                stream.epoch,
                ds.shuffle_shards,
            )
            n, c = plan.num_consumers, plan.consumer
            self.plan: list[_Shard] | None = [_Shard(ds.shards[i], False, True) for i in plan.whole]
            self.plan += [_Shard(ds.shards[i], True, j % n == c) for j, i in enumerate(plan.shared)]
        else:
            self.plan = None

    def shard(self, j: int) -> _Shard | None:
        """Shard ``j`` of the stream (resampled: of draw ``j``); None past the end."""
        if self.plan is not None:
            return self.plan[j] if j < len(self.plan) else None
        return _Shard(self.ds.shards[draw_shard(self.tag, j, len(self.ds.shards))], False, True)

    def _count(self, shard: _Shard, reason: str) -> None:
        if shard.owns and not self.quiet:
            if reason == "shards_read":
                self.stats.shards_read += 1
            else:
                self.stats.count(reason)

    def begin_window(self, replay: Cursor | None) -> None:
        """Start reading a window: ``replay`` is the saved cursor when it is read again."""
        self.quiet = replay is not None
        self.replay_failed = dict(replay.failed) if replay is not None else {}
        self.needed = (
            set(window_order(self.tag, replay.window, self.ds.window)[replay.slot :])
            if (replay is not None)
            else None
        )
        self.failed = {}
        self.announced = 0  # kept groups whose first header was read in this window

    def items(self, start: ReadPoint) -> Iterator[tuple[Item, ReadPoint]]:
        """(item, point after it) from ``start`` on, across shards, until the stream ends."""
        j, first, shared = start.shard, start.group, start.shared
        empty_draws, limit = 0, max(16, 4 * len(self.ds.shards))
        c, n = self.stream.consumer, self.stream.consumers
        while True:
            shard = self.shard(j)
            if shard is None:
                return
            progress = [first]
            stop = self.replay_failed.get(j) if self.quiet else None
            got = 0

            def keep(g: int, shard: _Shard = shard, base: int = shared) -> bool:
                return not shard.shared or (base + g) % n == c

            def need(_g: int) -> bool:  # called once per kept group, in order
                k, self.announced = self.announced, self.announced + 1
                return self.needed is None or k >= self.ds.window or k in self.needed

            try:
                if stop is not None and stop <= first + 1:
                    raise _Stopped
                for number, key, members in self._groups(shard.url, first, keep, need, progress):
                    if stop is not None and number >= stop - 1:
                        raise _Stopped
                    got += 1
                    yield (key, members, shard.url), ReadPoint(j, number + 1, shared)
                self._count(shard, "shards_read")
            except _Stopped:
                progress[0] = max(progress[0], stop or 0)
            except TarReadError as err:
                self.failed[j] = progress[0]
                if shard.owns and not self.quiet:
                    self.stats.count(err.reason)
                    log.warning(
                        "shard %s: %s (%s); skipping the rest of it", shard.url, err, err.reason
                    )
            except OSError as err:
                self.failed[j] = progress[0]
                if shard.owns and not self.quiet:
                    self.stats.count("unreadable_shard")
                    log.warning("shard %s cannot be read: %s; skipping it", shard.url, err)
            if shard.shared:
                shared += progress[0]
            j, first = j + 1, 0
            if self.plan is None:
                empty_draws = empty_draws + 1 if not got else 0
                if empty_draws >= limit:
                    raise DataError(
                        f"resampled data: {limit} shard draws in a row gave no sample "
                        f"({len(self.ds.shards)} shards, e.g. {shard.url!r}); the shards are "
                        "empty or broken: check them with `megaclip data inspect SPEC`"
                    )

    def _groups(self, url: str, first: int, keep, need, progress: list[int]):
        """Key groups of one shard from group ``first`` on (seek via the index when local)."""
        with open_shard(url) as f:
            if first == 0:
                yield from iter_groups(f, keep=keep, need=need, progress=progress)
                return
            offset = None if is_remote(url) else _seek_offset(url, f, first)
            if offset is not None:
                yield from iter_groups(
                    f, first=first, offset=offset, keep=keep, need=need, progress=progress
                )
                return
            # a stream (or a shard whose index does not match it): skip by reading headers
            yield from iter_groups(
                f, keep=lambda g: g >= first and keep(g), need=need, progress=progress
            )


class _Stopped(Exception):
    """A re-read shard reached the group where it broke the first time."""


def _seek_offset(path: str, f: Any, group: int) -> int | None:
    """Seek ``f`` (shard ``path``) to group ``group`` with its tar index; the offset, or None.

    The key read at the offset is checked against the index; a mismatch rebuilds the index once.
    None when the index cannot place the group (the shard changed): read it from the start.
    """
    for rebuild in (False, True):
        index = shard_index(path, rebuild=rebuild)
        if group > index.groups:
            continue
        offset = index.offset_of(group)
        if group == index.groups or _key_at(f, offset) == index.keys[group]:
            f.seek(offset)
            return offset
    log.warning("shard %s changed since its tar index was built; reading it from the start", path)
    f.seek(0)
    return None


def _key_at(f: Any, offset: int) -> str | None:
    """Key of the member whose header starts at ``offset`` (None when there is none)."""
    from megaclip.data.tarindex import split_name

    f.seek(offset)
    try:
        for name, _, _ in iter_tar_members(f, want=lambda _n: False, offset=offset):
            split = split_name(name)
            if split is not None:
                return split[0]
    except TarReadError:
        return None
    return None


class WebDataset(IterableDataset):
    """Iterate the samples of webdataset shards for one DP rank, split across DataLoader workers.

    ``mode='epoch'``: each epoch (``set_epoch``) reads every sample exactly once across all
    ``dp_size x num_workers`` consumers (:func:`plan_epoch_shards`), shard order shuffled by
    (seed, epoch) when ``shuffle_shards``. ``mode='resampled'``: infinite; each consumer draws
    shards with replacement, seeded by its stream identity. Samples are shuffled in windows of
    ``shuffle_buffer`` (see position.py). Bad samples are skipped and counted in ``skip_stats``
    (reset at each iteration start, of this process only: with DataLoader workers use the
    loader's ``skip_stats``); when the skipped fraction exceeds ``max_skip_fraction`` (after
    ``skip_check_min_samples`` samples, or at the end of an epoch) iteration raises DataError.
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
        self._transform_rng = transform is not None and _accepts(transform, "rng")
        self._lazy = bool(getattr(transform, "accepts_lazy_images", False))
        self.raw_pixels = False  # True: call ``transform.pixels`` (uint8; the loader normalises)
        self.max_image_pixels = max_image_pixels
        self.max_skip_fraction = max_skip_fraction
        self.skip_check_min_samples = skip_check_min_samples
        self.image_exts = tuple(e.lower() for e in image_exts)
        self.caption_ext = caption_ext.lower()
        self.decode_json = decode_json
        self.epoch = 0
        self.generation = 0
        self.skip_stats = SkipStats()
        self._group_counts: dict[str, int] = {}

    @property
    def window(self) -> int:
        """Samples per shuffle window (1: no shuffling)."""
        return max(1, self.shuffle_buffer)

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

    def fresh_units(self, worker: int, num_workers: int) -> tuple[Unit, ...]:
        """The untouched stream of one worker of this rank in the current epoch."""
        self.consumer(worker, num_workers)
        unit = fresh_unit(
            self.epoch, self.dp_rank, self.dp_size, worker, num_workers, self.generation
        )
        return (unit,)

    def shard_group_count(self, path: str) -> int:
        """Key groups in one local shard (header scan, cached)."""
        if path not in self._group_counts:
            self._group_counts[path] = count_groups(path)[0]
        return self._group_counts[path]

    def groups_per_worker(self, num_workers: int) -> list[int]:
        """Key groups each worker of this rank reads this epoch (epoch mode; before skips)."""
        if self.mode != "epoch":
            raise TypeError("a resampled dataset is infinite: it has no length")
        if any(is_remote(s) for s in self.shards):
            raise TypeError("the length of remote shards is unknown without reading them")
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
        units = self.fresh_units(worker, num_workers)
        for sample, _ in self.iter_positions(units, stats, check=check):
            if sample is not None or yield_skips:
                yield sample

    def iter_positions(
        self, units: Sequence[Unit], stats: SkipStats, *, check: bool = True
    ) -> Iterator[tuple[Sample | None, tuple[Unit, ...]]]:
        """(sample or None for a skip, the units still to read after it) from ``units`` on.

        The second element is the position to resume from (empty when the work is done).
        """
        max_frac = self.max_skip_fraction if check else None
        remaining = list(units)
        while remaining:
            unit = remaining[0]
            for sample, cursor in self._run_unit(unit, stats):
                if check:
                    stats.check(max_frac, self.skip_check_min_samples, num_shards=len(self.shards))
                rest = remaining[1:]
                after = ((Unit(unit.stream, cursor), *rest)) if cursor is not None else tuple(rest)
                yield sample, after
            remaining.pop(0)
        if check:
            stats.check(max_frac, self.skip_check_min_samples, final=True)

    def _run_unit(
        self, unit: Unit, stats: SkipStats
    ) -> Iterator[tuple[Sample | None, Cursor | None]]:
        """Samples of one stream from its cursor, each with the cursor after it (None: done)."""
        reader = _Reader(self, unit.stream, stats)
        size, cur = self.window, unit.cursor
        stream = reader.items(cur.start)
        try:
            while True:
                replay = cur.filled >= 0
                reader.begin_window(cur if replay else None)
                items: list[Item] = []
                after = cur.start
                for item, point in stream:
                    items.append(item)
                    after = point
                    if len(items) == size:
                        break
                reader.quiet, reader.needed = False, None
                n = len(items)
                if replay and (n != cur.filled or (n and items[0][0] != cur.first_key)):
                    log.warning(
                        "stream %s: the shuffle window read again on resume holds %d sample(s) "
                        "from %r, %d from %r when saved: the shards changed, so the sample "
                        "sequence differs from the saved run's from here on",
                        reader.tag,
                        n,
                        items[0][0] if n else None,
                        cur.filled,
                        cur.first_key,
                    )
                if not n:
                    return
                if not replay:
                    failed = tuple(sorted(reader.failed.items()))
                    cur = replace(cur, filled=n, first_key=items[0][0], failed=failed)
                order = window_order(reader.tag, cur.window, size)
                slots = [q for q in range(cur.slot, size) if order[q] < n]
                for k, q in enumerate(slots):
                    p = order[q]
                    rng = random.Random(sample_seed(reader.tag, cur.window, p))
                    sample = self._decode(items[p], stats, rng)
                    if k + 1 < len(slots):
                        nxt: Cursor | None = replace(cur, slot=q + 1)
                    elif n == size:
                        nxt = Cursor(window=cur.window + 1, start=after)
                    else:
                        nxt = None  # a short window is the stream's last
                    yield sample, nxt
                if n < size:
                    return
                cur = Cursor(window=cur.window + 1, start=after)
        finally:
            stream.close()

    def _decode(self, item: Item, stats: SkipStats, rng: random.Random) -> Sample | None:
        key, members, shard = item
        if members is None:  # a re-read sample that was already emitted (not reached here)
            return None
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
        if self._lazy:
            image, reason = open_image(members[image_ext], self.max_image_pixels)
        else:
            image, reason = decode_image(members[image_ext], self.max_image_pixels)
        if image is None:
            stats.count(reason)  # type: ignore[arg-type]
            return None
        if self.transform is not None:
            fn = self.transform.pixels if self.raw_pixels else self.transform
            try:
                image = fn(image, rng=rng) if self._transform_rng else fn(image)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
                # e.g. an image mode that cannot become RGB, or bytes that fail to decode lazily
                log.debug("sample %s of %s: decode/transform failed: %s", key, shard, err)
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
