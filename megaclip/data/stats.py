"""Skip statistics of a data stream: usable samples, skipped samples, failed shards, by reason.

:class:`SkipStats` counts one loader's epoch; :class:`SkipTally` follows a stream across epochs,
and :func:`skip_record` sums it over the DP ranks for the training metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megaclip.errors import DataError
from megaclip.parallel import collectives

SAMPLE_REASONS = (
    "missing_image",
    "missing_caption",
    "bad_caption_encoding",
    "empty_image",
    "undecodable_image",
    "image_too_large",
)
SHARD_REASONS = ("truncated_tar", "corrupt_tar", "unreadable_shard")
MIN_SHARDS_FOR_CHECK = 4  # shard failures are judged once this many shards were tried


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
        seen (or at the end, ``final``); (b) failed shards / shards tried > max_skip_fraction once
        at least ``MIN_SHARDS_FOR_CHECK`` shards were tried (or at the end); (c) at the end,
        nothing usable was found although something was skipped; (d) no usable sample and at
        least ``num_shards`` shard failures.
        """
        seen = self.seen
        tried = self.shards_read + self.shard_errors

        def too_many(bad: int, total: int, enough: int) -> bool:
            """More than the tolerated fraction, once ``enough`` were looked at (or at the end)."""
            if max_skip_fraction is None or not total or not (final or total >= enough):
                return False
            return bad > max_skip_fraction * total

        if too_many(self.shard_errors, tried, MIN_SHARDS_FOR_CHECK):
            raise DataError(
                f"{self.shard_errors} of {tried} shards could not be read "
                f"({self.shard_errors / tried:.1%}), above max_skip_fraction={max_skip_fraction}: "
                f"{self._reason_text()}; check the URLs, commands and files named in the warnings "
                "above, or raise max_skip_fraction"
            )
        if too_many(self.skipped, seen, min_samples):
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


def stats_to_dict(stats: SkipStats) -> dict[str, int]:
    """All counters as a plain dict (for checkpoints and worker messages)."""
    return dataclasses.asdict(stats)


def stats_from_dict(data: dict[str, Any] | None) -> SkipStats:
    """The SkipStats of :func:`stats_to_dict` (unknown keys ignored, missing ones 0)."""
    names = {f.name for f in _FIELDS}
    return SkipStats(**{k: int(v) for k, v in (data or {}).items() if k in names})


class SkipTally:
    """Skip statistics of one rank's data stream across epochs (a loader resets per epoch).

    A training stream (megaclip.data.stream.TrainStream) already counts across epochs and
    resumes (its counts are part of the checkpointed data position): watch it and never call
    :meth:`end_epoch`.
    """

    def __init__(self) -> None:
        self._finished = SkipStats()
        self._loader: Any = None

    def watch(self, loader: Any) -> None:
        """Follow ``loader.skip_stats`` (a WebLoader or a TrainStream) from now on."""
        self._loader = loader

    def end_epoch(self) -> None:
        """Fold the loader's finished epoch into the running totals."""
        if self._loader is not None:
            self._finished = self._finished + self._loader.skip_stats

    @property
    def total(self) -> SkipStats:
        """Finished epochs plus the epoch in progress."""
        live = self._loader.skip_stats if self._loader is not None else SkipStats()
        return self._finished + live


def skip_record(tally: SkipTally | None, dp_group: dist.ProcessGroup | None) -> dict[str, Any]:
    """Metrics fields of the data skipped so far, summed over the DP group (collective).

    ``data_ok``: samples used; ``data_skipped``: samples skipped (all sample reasons) plus one
    per shard that could not be read to its end (unreachable URL, failing ``pipe:`` command,
    truncated or corrupt tar: how many samples it held is unknown); ``data_shard_errors``: those
    shards alone. Empty without a tally.
    """
    if tally is None:
        return {}
    s = tally.total
    counts = torch.tensor([s.ok, s.skipped + s.shard_errors, s.shard_errors], dtype=torch.int64)
    if dp_group is not None:
        counts = collectives.host_all_reduce(counts, "sum", dp_group)  # device and back
    ok, skipped, shard_errors = (int(v) for v in counts.tolist())
    seen = ok + skipped
    return {
        "data_ok": ok,
        "data_skipped": skipped,
        "data_skip_fraction": skipped / seen if seen else 0.0,
        "data_shard_errors": shard_errors,
    }
