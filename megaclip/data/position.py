"""Data positions: where each (DP rank, worker) stands in its sample stream, and how to resume.

Pure data and math, no I/O. A consumer's sample stream is fully determined by a
:class:`StreamId` and the run's data settings:

* which shards it reads: epoch mode, :func:`~megaclip.data.reader.plan_epoch_shards` of
  ``(epoch, consumer, consumers)``; resampled mode, draw ``d`` picks shard
  :func:`draw_shard` ``(tag, d)``;
* the sample order: the stream is cut into *windows* of ``K`` consecutive samples (``K`` =
  ``shuffle_buffer``; 1 = no shuffling) and window ``w`` is emitted in the order
  :func:`window_order` ``(tag, w, K)``; a shorter last window keeps the relative order of its slots;
* the augmentation of the sample in slot ``p`` of window ``w``: a generator seeded by
  :func:`sample_seed` ``(tag, w, p)``.

So a position needs no random-generator state: a :class:`Cursor` (window, slot, and the
:class:`ReadPoint` where the window's first sample is read) re-derives everything, and a resume
reads only that one window again (seeking in the shard with its tar index).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, replace
from typing import Any

STATE_VERSION = 1


@dataclass(frozen=True)
class StreamId:
    """One consumer's stream: epoch, consumer id among ``consumers``, layout generation."""

    epoch: int
    consumer: int
    consumers: int
    generation: int = 0

    def tag(self, seed: int) -> str:
        """The string every seed of this stream derives from."""
        return f"{seed}:{self.epoch}:{self.generation}:{self.consumer}:{self.consumers}"


@dataclass(frozen=True)
class ReadPoint:
    """Where reading starts: shard ``shard`` of the stream (resampled: draw number), group
    ``group`` inside it, and ``shared`` groups of the sample-level-split shards before it."""

    shard: int = 0
    group: int = 0
    shared: int = 0


@dataclass(frozen=True)
class Cursor:
    """Position inside one stream: ``slot`` entries of window ``window``'s order are done.

    ``start``: where the window's first sample is read. ``filled``: how many samples the window
    held when it was read (-1: not read yet; then ``slot`` is 0); ``first_key``: the key of its
    first sample; ``failed``: (shard, group) where a shard broke while the window was read (a
    re-read stops there too and counts nothing twice).
    """

    window: int = 0
    slot: int = 0
    start: ReadPoint = field(default_factory=ReadPoint)
    filled: int = -1
    first_key: str = ""
    failed: tuple[tuple[int, int], ...] = ()


@dataclass(frozen=True)
class Unit:
    """A stream and the position in it."""

    stream: StreamId
    cursor: Cursor = field(default_factory=Cursor)


def window_order(tag: str, window: int, size: int) -> list[int]:
    """The emission order of the ``size`` slots of window ``window`` (identity when size <= 1)."""
    order = list(range(size))
    if size > 1:
        random.Random(f"window:{tag}:{window}").shuffle(order)
    return order


def sample_seed(tag: str, window: int, slot: int) -> str:
    """Seed of the augmentation generator of the sample in ``slot`` of window ``window``."""
    return f"augment:{tag}:{window}:{slot}"


def draw_shard(tag: str, draw: int, num_shards: int) -> int:
    """Shard index of draw number ``draw`` of a resampled stream (uniform, with replacement)."""
    return random.Random(f"draw:{tag}:{draw}").randrange(num_shards)


def advance(cursor: Cursor, window_size: int, next_start: ReadPoint) -> Cursor:
    """The cursor after one more slot; past the window's end, the next window at ``next_start``."""
    slot = cursor.slot + 1
    if slot >= window_size:
        return Cursor(window=cursor.window + 1, start=next_start)
    return replace(cursor, slot=slot)


# ----------------------------------------------------------------------------- (de)serialising


def unit_to_dict(unit: Unit) -> dict[str, Any]:
    """A plain-dict form of a Unit (ints, strings, lists: safe in any checkpoint)."""
    out = asdict(unit)
    out["cursor"]["failed"] = [list(x) for x in unit.cursor.failed]
    return out


def unit_from_dict(data: dict[str, Any]) -> Unit:
    """Inverse of :func:`unit_to_dict`."""
    c = data["cursor"]
    cursor = Cursor(
        window=int(c["window"]),
        slot=int(c["slot"]),
        start=ReadPoint(**{k: int(v) for k, v in c["start"].items()}),
        filled=int(c["filled"]),
        first_key=str(c["first_key"]),
        failed=tuple((int(a), int(b)) for a, b in c["failed"]),
    )
    return Unit(StreamId(**{k: int(v) for k, v in data["stream"].items()}), cursor)


# ----------------------------------------------------------------------------- layout changes


@dataclass(frozen=True)
class RankPlan:
    """What one rank resumes with: epoch, layout generation, units per worker, next worker."""

    epoch: int
    generation: int
    workers: tuple[tuple[Unit, ...] | None, ...]  # None: a fresh stream of ``epoch``
    next_worker: int
    note: str | None = None  # what changes against an uninterrupted run, when anything does


def consumer_id(dp_rank: int, dp_size: int, worker: int) -> int:
    """Consumer id of (rank, worker): ``dp_rank + dp_size * worker``."""
    return dp_rank + dp_size * worker


def fresh_unit(epoch: int, dp_rank: int, dp_size: int, worker: int, workers: int, gen: int) -> Unit:
    """The untouched stream of (rank, worker) in ``epoch``."""
    return Unit(StreamId(epoch, consumer_id(dp_rank, dp_size, worker), dp_size * workers, gen))


@dataclass(frozen=True)
class SavedRank:
    """One rank's saved data position (see :func:`plan_resume`)."""

    dp_rank: int
    dp_size: int
    workers: int  # consumers per rank (DataLoader workers, at least 1)
    epoch: int
    generation: int
    units: tuple[tuple[Unit, ...] | None, ...]  # per worker: remaining units, None: fresh
    next_worker: int


def _outstanding_epoch_units(saved: list[SavedRank], last_epoch: int) -> list[Unit]:
    """Every unit the saved ranks still owe up to ``last_epoch`` (epoch mode), canonical order."""
    units: list[Unit] = []
    for r in saved:
        for w, remaining in enumerate(r.units):
            if remaining is None:
                units.append(fresh_unit(r.epoch, r.dp_rank, r.dp_size, w, r.workers, r.generation))
            else:
                units.extend(remaining)
        for epoch in range(r.epoch + 1, last_epoch + 1):
            for w in range(r.workers):
                units.append(fresh_unit(epoch, r.dp_rank, r.dp_size, w, r.workers, r.generation))
    units.sort(key=lambda u: (u.stream.epoch, u.stream.generation, u.stream.consumer))
    return units


def plan_resume(
    saved: list[SavedRank], mode: str, dp_rank: int, dp_size: int, workers: int
) -> RankPlan:
    """How rank ``dp_rank`` of ``dp_size`` (``workers`` consumers each) resumes ``saved``.

    Same layout: exactly the saved position of that rank. Another DP size or worker count:

    * ``epoch`` mode: the epochs in progress are finished exactly: every unfinished stream of
      every saved consumer (and the whole streams of ranks that were an epoch behind) is dealt
      round-robin to the new consumers and continued sample-exactly, so no sample of those
      epochs is lost or repeated; only which rank/worker reads it, and hence the batches,
      change. Later epochs are split for the new layout.
    * ``resampled`` mode: new consumer ``c`` continues the saved stream of consumer ``c``
      exactly where there was one; new consumers start new streams (a new generation, never
      a replay of an earlier stream); saved streams without a new consumer end.
    """
    if not saved:
        raise ValueError("no saved rank positions")
    old = saved[0]
    same = len(saved) == dp_size and all(
        (r.dp_size, r.workers) == (dp_size, workers) for r in saved
    )
    if same:
        r = next(x for x in saved if x.dp_rank == dp_rank)
        return RankPlan(r.epoch, r.generation, r.units, r.next_worker)
    gen = max(r.generation for r in saved) + 1
    c_old, c_new = old.dp_size * old.workers, dp_size * workers
    change = (
        f"resuming a data position saved with dp={old.dp_size} x {old.workers} worker(s) on "
        f"dp={dp_size} x {workers} worker(s)"
    )
    if mode == "epoch":
        last = max(r.epoch for r in saved)
        units = _outstanding_epoch_units(saved, last)
        mine: list[tuple[Unit, ...] | None] = []
        for w in range(workers):
            c = consumer_id(dp_rank, dp_size, w)
            mine.append(tuple(u for k, u in enumerate(units) if k % c_new == c))
        note = (
            f"{change}: the {len(units)} unfinished stream(s) of epoch(s) "
            f"{min(r.epoch for r in saved)}..{last} are finished exactly (no sample lost or "
            f"repeated) but read by other ranks/workers, so batches differ from an "
            f"uninterrupted run; epochs from {last + 1} on are split for the new layout"
        )
        return RankPlan(last, gen, tuple(mine), 0, note)
    by_consumer: dict[int, Unit] = {}
    for r in saved:
        for w, remaining in enumerate(r.units):
            c = consumer_id(r.dp_rank, r.dp_size, w)
            unit = fresh_unit(r.epoch, r.dp_rank, r.dp_size, w, r.workers, r.generation)
            by_consumer[c] = remaining[0] if remaining else unit
    mine = []
    for w in range(workers):
        c = consumer_id(dp_rank, dp_size, w)
        if c in by_consumer:
            mine.append((by_consumer[c],))
        else:
            mine.append((Unit(StreamId(old.epoch, c, c_new, gen)),))
    kept = min(c_old, c_new)
    note = (
        f"{change} (resampled): the streams of consumers 0..{kept - 1} continue exactly"
        + (f"; consumers {c_old}..{c_new - 1} start new streams" if c_new > c_old else "")
        + (
            f"; the streams of consumers {c_new}..{c_old - 1} end (the samples in their "
            "current shuffle windows are not used)"
            if c_old > c_new
            else ""
        )
    )
    return RankPlan(old.epoch, gen, tuple(mine), 0, note)
