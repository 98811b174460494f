"""Endless training micro-batch streams with a checkpointable, O(1)-resumable data position.

:class:`TrainStream` cycles a :class:`~megaclip.data.loader.WebLoader` over epochs (each DP rank
its own share). Its :meth:`~TrainStream.state_dict` is this rank's position after the last
micro-batch handed out; :func:`gather_state` collects every DP rank's into one record (stored in
each rank's checkpoint client state), and :meth:`~TrainStream.load_state_dict` resumes from that
record directly, in any layout (see :func:`megaclip.data.position.plan_resume`).
:class:`SyntheticStream` does the same for synthetic batches (its generator state).

``MEGACLIP_DATA_TRACE=DIR`` makes each process append ``{"batch": i, "keys": [...]}`` per
micro-batch to ``DIR/rank<RANK>.jsonl`` (sample keys as ``shard:key``): the resume tests compare
these with an uninterrupted run's; :func:`batch_fingerprint` is the cheaper per-step check
(a hash of each step's tokens, logged in metrics.jsonl, compared by benchmarks/soak.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megaclip.data.loader import WebLoader
from megaclip.data.position import (
    STATE_VERSION,
    RankPlan,
    SavedRank,
    plan_resume,
    unit_from_dict,
    unit_to_dict,
)
from megaclip.data.stats import SkipStats, stats_from_dict, stats_to_dict
from megaclip.data.synthetic import SyntheticConfig, synthetic_batch
from megaclip.errors import ConfigError

TRACE_ENV = "MEGACLIP_DATA_TRACE"


def settings_fingerprint(loader: WebLoader) -> dict[str, Any]:
    """The data settings a saved position is only valid for (shards, seed, mode, windows)."""
    ds = loader.webdataset
    names = hashlib.sha1("\n".join(ds.shards).encode("utf-8", "surrogateescape")).hexdigest()
    return {
        "shards": len(ds.shards),
        "shard_names_sha1": names[:16],
        "mode": ds.mode,
        "seed": ds.seed,
        "window": ds.window,
        "shuffle_shards": ds.shuffle_shards,
    }


def _say(text: str) -> None:
    """Print a data-position notice once per job (global rank 0)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"megaclip data: {text}", file=sys.stderr, flush=True)


class TrainStream:
    """Endless (images, tokens) micro-batches of one DP rank, epoch after epoch.

    ``skip_stats``: cumulative over epochs (and over resumes). A fresh epoch that yields no batch
    raises ConfigError(``empty_message``).
    """

    def __init__(self, loader: WebLoader, empty_message: str) -> None:
        self.loader = loader
        self.empty_message = empty_message
        self.epoch = 0
        self.batches = 0  # micro-batches handed out since step 0
        self.finished = SkipStats()  # counts of the epochs already done
        self._it: Iterator[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._resumed_epoch = False
        trace = os.environ.get(TRACE_ENV)
        self._trace = Path(trace) / f"rank{os.environ.get('RANK', '0')}.jsonl" if trace else None

    def __iter__(self) -> TrainStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        while True:
            if self._it is None:
                self.loader.set_epoch(self.epoch)
                self._it = iter(self.loader)
                self._got = False
            try:
                batch = next(self._it)
            except StopIteration:
                if not self._got and not self._resumed_epoch:
                    raise ConfigError(self.empty_message) from None
                self.finished = self.finished + self.loader.skip_stats
                self.epoch += 1
                self._it, self._resumed_epoch = None, False
                continue
            self._got = True
            self.batches += 1
            if self._trace is not None:
                self._trace.parent.mkdir(parents=True, exist_ok=True)
                with open(self._trace, "a", encoding="utf-8") as f:
                    f.write(json.dumps({"batch": self.batches, "keys": self.loader.last_keys}))
                    f.write("\n")
            return batch

    @property
    def skip_stats(self) -> SkipStats:
        """Skip counts of every epoch so far, the one in progress included."""
        live = self.loader.skip_stats if self._it is not None else SkipStats()
        return self.finished + live

    def state_dict(self) -> dict[str, Any]:
        """This rank's data position after the last micro-batch handed out (plain data)."""
        ld = self.loader
        if self._it is not None:
            state = ld.state_dict()
            units = [None if u is None else [unit_to_dict(x) for x in u] for u in state["units"]]
            stats = [stats_to_dict(s) for s in state["stats"]]
            next_worker = state["next_worker"]
        else:  # between epochs: every worker starts the epoch afresh
            units, stats, next_worker = [None] * ld.consumers, [None] * ld.consumers, 0
        ds = ld.webdataset
        return {
            "version": STATE_VERSION,
            "dp_rank": ds.dp_rank,
            "dp_size": ds.dp_size,
            "workers": ld.consumers,
            "epoch": self.epoch,
            "generation": ds.generation,
            "batches": self.batches,
            "next_worker": next_worker,
            "units": units,
            "stats": stats,
            "finished": stats_to_dict(self.finished),
            "settings": settings_fingerprint(ld),
        }

    def load_state_dict(self, record: dict[str, Any]) -> bool:
        """Resume from :func:`gather_state`'s record (every DP rank's state), in any layout.

        False (nothing changed) when the record holds no webdataset position.
        """
        ranks = record.get("ranks") if isinstance(record, dict) else None
        if not ranks or any(r.get("version") != STATE_VERSION or r.get("synthetic") for r in ranks):
            return False
        ld, ds = self.loader, self.loader.webdataset
        mine = settings_fingerprint(ld)
        saved = [
            SavedRank(
                dp_rank=int(r["dp_rank"]),
                dp_size=int(r["dp_size"]),
                workers=int(r["workers"]),
                epoch=int(r["epoch"]),
                generation=int(r["generation"]),
                units=tuple(
                    None if u is None else tuple(unit_from_dict(x) for x in u) for u in r["units"]
                ),
                next_worker=int(r["next_worker"]),
            )
            for r in ranks
        ]
        self.batches = int(
            next(
                (r["batches"] for r in ranks if int(r["dp_rank"]) == ds.dp_rank),
                ranks[0]["batches"],
            )
        )
        changed = [
            f"{k} {ranks[0]['settings'].get(k)!r} -> {v!r}"
            for k, v in mine.items()
            if ranks[0]["settings"].get(k) != v
        ]
        if changed:
            plan = RankPlan(
                epoch=max(r.epoch for r in saved) + 1,
                generation=max(r.generation for r in saved) + 1,
                workers=(None,) * ld.consumers,
                next_worker=0,
                note=(
                    f"the data settings changed since the checkpoint ({', '.join(changed)}): "
                    "its data position does not apply; the data stream starts afresh at "
                    f"epoch {max(r.epoch for r in saved) + 1}"
                ),
            )
        else:
            plan = plan_resume(saved, ds.mode, ds.dp_rank, ds.dp_size, ld.consumers)
        same = plan.note is None
        if same:
            me = next(r for r in ranks if int(r["dp_rank"]) == ds.dp_rank)
            stats = [stats_from_dict(s) for s in me["stats"]]
            self.finished = stats_from_dict(me["finished"])
        else:  # counts cannot be split anew: rank 0 carries every saved rank's total
            _say(plan.note)
            stats = [SkipStats() for _ in range(ld.consumers)]
            total = SkipStats.total(
                stats_from_dict(r["finished"])
                + SkipStats.total(stats_from_dict(s) for s in r["stats"])
                for r in ranks
            )
            self.finished = total if ds.dp_rank == 0 else SkipStats()
        self.epoch = plan.epoch
        ld.load_state_dict(plan.workers, stats, plan.next_worker, plan.generation)
        self._it = None
        self._resumed_epoch = True
        return True


def gather_state(stream: Any, group: Any = None) -> dict[str, Any] | None:
    """Every DP rank's stream state, in DP-rank order (collective over ``group``); None if
    ``stream`` has no state."""
    if not hasattr(stream, "state_dict"):
        return None
    from megaclip.parallel.collectives import all_gather_object

    return {"ranks": all_gather_object(stream.state_dict(), group)}


class SyntheticStream:
    """Endless synthetic batches (megaclip.data.synthetic) whose generator state is saved."""

    def __init__(
        self, cfg: SyntheticConfig, dp_rank: int = 0, seed_rank: int | None = None
    ) -> None:
        self.cfg = cfg
        self.dp_rank = dp_rank
        self.gen = torch.Generator(device="cpu")  # as synthetic_batches(cfg, seed_rank)
        self.gen.manual_seed(
            int(cfg.seed) * 1_000_003 + int(dp_rank if seed_rank is None else seed_rank)
        )
        self.batches = 0

    def __iter__(self) -> SyntheticStream:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.batches += 1
        return synthetic_batch(self.cfg, self.gen)

    def state_dict(self) -> dict[str, Any]:
        """The generator state and the batch count."""
        return {
            "synthetic": True,
            "dp_rank": self.dp_rank,
            "batches": self.batches,
            "generator": self.gen.get_state(),
        }

    def load_state_dict(self, record: dict[str, Any]) -> bool:
        """Continue after the saved batch; False when the record has none for this DP rank."""
        ranks = record.get("ranks") or []
        mine = [r for r in ranks if r.get("synthetic") and r.get("dp_rank") == self.dp_rank]
        if not mine:
            return False
        self.gen.set_state(mine[0]["generator"])
        self.batches = int(mine[0]["batches"])
        return True


def batch_fingerprint(micro_batch: tuple[torch.Tensor, torch.Tensor]) -> str:
    """16 hex digits of blake2b over the micro-batch's token ids (its shape included)."""
    tokens = micro_batch[1].detach().to("cpu", torch.int64).contiguous()
    h = hashlib.blake2b(digest_size=8)
    h.update(repr(tuple(tokens.shape)).encode())
    h.update(tokens.numpy().tobytes())
    return h.hexdigest()
