"""Build a ClipEngine on synthetic data for a benchmark layout, and time its steps.

Shared by ``megaclip bench`` and the scripts in benchmarks/ (comm volume, memory accounting,
layout timings). Every function that needs process groups takes them from a Topology.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import sys
import time
from collections.abc import Iterator
from typing import Any

import torch

from megaclip.bench.spec import BenchSpec
from megaclip.config.deepspeed import deepspeed_config
from megaclip.config.model import ClipConfig, resolve_model
from megaclip.config.parallel import ParallelConfig
from megaclip.config.train import RunConfig, TrainSection
from megaclip.data.synthetic import SyntheticConfig, synthetic_batches
from megaclip.train.host import status_kib

#: DeepSpeed override that makes ZeRO-3 gather every parameter (none stays resident).
ZERO3_ALL_GATHERED = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


def synthetic_config(cfg: ClipConfig, micro_batch: int, seed: int) -> SyntheticConfig:
    """Synthetic batches shaped for ``cfg``: SOT/EOT are the two largest ids of its vocabulary."""
    t = cfg.text
    return SyntheticConfig(
        batch_size=micro_batch,
        image_size=cfg.vision.image_size,
        context_length=t.context_length,
        vocab_size=t.vocab_size,
        sot_id=t.vocab_size - 2,
        eot_id=t.vocab_size - 1,
        seed=seed,
    )


def step_batches(
    cfg: ClipConfig, par: ParallelConfig, dp_rank: int, seed: int, device: torch.device
) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Infinite iterator of one step's ``grad_accum_steps`` synthetic micro-batches."""
    it = synthetic_batches(synthetic_config(cfg, par.micro_batch_size, seed), dp_rank, device)
    while True:
        yield [next(it) for _ in range(par.grad_accum_steps)]


def ds_config_for(spec: BenchSpec, par: ParallelConfig | None = None) -> dict[str, Any]:
    """DeepSpeed config of a benchmark: the one builder's for its layout (``par``, default
    ``spec.parallel(spec.world_size())``; megaclip.config.deepspeed), ``ds_overrides`` on top."""
    ds = deepspeed_config(par if par is not None else spec.parallel(spec.world_size()))
    for key, value in spec.ds_overrides.items():
        if isinstance(value, dict) and isinstance(ds.get(key), dict):
            ds[key] = {**ds[key], **value}
        else:
            ds[key] = value
    return ds


def quiet_deepspeed() -> None:
    """Keep stdout for the benchmark's result: DeepSpeed logs to stderr, errors only.

    DeepSpeed binds its log handler to ``sys.stdout`` when first imported (and logs its
    accelerator choice then), so the first import happens with stdout pointing at stderr.
    """
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.utils import logger
    logger.setLevel(logging.ERROR)


def run_config(spec: BenchSpec, par: ParallelConfig, cfg: ClipConfig) -> RunConfig:
    """The run config of a benchmark: its model and layout, default optimiser, its seed, loss
    chunk and step count (warm-up included), synthetic data. An unchunked loss (None) is one
    chunk of the global batch."""
    chunk = spec.loss_chunk_size or par.global_batch_size
    train = TrainSection(steps=spec.warmup + spec.steps, seed=spec.seed, loss_chunk_size=chunk)
    return RunConfig(model=cfg, parallel=par, train=train)


def build_engine(spec: BenchSpec, topo, cfg: ClipConfig | None = None):
    """A ClipEngine for ``spec`` on ``topo`` (weights from ``spec.seed``), resolved like a
    ``megaclip train`` run (megaclip.train.resolve) with no memory budget: ``engine.par`` holds
    the schedule that runs."""
    from megaclip.train.engine import ClipEngine
    from megaclip.train.resolve import resolve_run

    cfg = cfg if cfg is not None else resolve_model(spec.model)
    run = resolve_run(
        run_config(spec, topo.par, cfg),
        ds_config_for(spec, topo.par),
        world=topo.par.world_size,
        budget=None,
    )
    return ClipEngine.from_run(run, topo)


# ---------------------------------------------------------------- memory probes


def current_rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; psutil elsewhere)."""
    kib = status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil  # pragma: no cover - non-Linux

    return int(psutil.Process().memory_info().rss)


def max_rss_bytes() -> int:
    """High-water mark of this process's resident set (getrusage; kB on Linux)."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


class Timer:
    """Wall-clock accumulator for a named region (``with timer:`` adds the elapsed time)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.calls = 0
        self._t0 = 0.0

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.total += time.perf_counter() - self._t0
        self.calls += 1
