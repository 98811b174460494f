"""One run, worked out once: the run config, the DeepSpeed JSON and the world -> a ResolvedRun.

Every field a run needs beyond its config is decided here, and only here: the activation
checkpointing a DeepSpeed JSON asks for, the launched world checked against the layout, the
final DeepSpeed dict (the JSON checked against the layout and filled by the one builder,
``megaclip.config.deepspeed``; NVMe offload paths from ``train.offload_dir``), the exact-loss
schedule (``"auto"`` resolved against the node's memory) and the loss chunk the memory model
uses. `megaclip train`, its pre-flight, the
engine and ``megaclip memory`` take the result; none of them re-derives a field.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from megaclip.config.parallel import ParallelConfig
from megaclip.config.train import RunConfig
from megaclip.train.ds_config import (
    check_deepspeed_sections,
    check_zero_section,
    fill_offload_paths,
    load_ds_config,
    resolve_ds_config,
)
from megaclip.train.preflight import Budget, node_budget


@dataclass(frozen=True)
class ResolvedRun:
    """A run with nothing left to decide.

    ``cfg.parallel`` has its schedule resolved ("keep" or "recompute", never "auto") and
    the DeepSpeed JSON's activation checkpointing folded in; ``ds`` is the final DeepSpeed dict
    (read-only: :meth:`ds_dict` gives DeepSpeed its own copy); ``ds_source`` is the JSON file it
    came from (None: megaclip's builder alone); ``budget`` the per-rank memory the schedule was
    chosen against (None where it cannot be read).
    """

    cfg: RunConfig
    ds: Mapping[str, Any]
    ds_source: str | None
    world: int
    budget: Budget | None

    @property
    def par(self) -> ParallelConfig:
        return self.cfg.parallel

    @property
    def loss_chunk_size(self) -> int | None:
        return self.cfg.train.loss_chunk_size

    def ds_dict(self) -> dict[str, Any]:
        """A mutable deep copy of the final DeepSpeed dict (DeepSpeed writes into its config)."""
        return copy.deepcopy(dict(self.ds))


def launched_world() -> int:
    """The process count of this launch (torchrun / deepspeed: WORLD_SIZE, srun: SLURM_NTASKS;
    1 without a launcher), read before any process group exists."""
    return int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or "1")


def resolve_run(
    cfg: RunConfig,
    ds_source: str | Path | dict[str, Any] | None = None,
    *,
    world: int | None = None,
    budget: Budget | None | str = "node",
) -> ResolvedRun:
    """Resolve ``cfg`` (with ``ds_source`` in place of ``cfg.deepspeed`` when given).

    ``world``: the launched process count (None: the layout's own). ``budget``: "node" reads
    this rank's memory (:func:`megaclip.train.preflight.node_budget`), None schedules without
    one, a :class:`Budget` is used as it is. Every input error is one ConfigError, raised here
    before any process group exists.
    """
    from megaclip.perf.memory import choose_schedule

    source = ds_source if ds_source is not None else cfg.deepspeed
    raw = load_ds_config(source)
    check_deepspeed_sections(raw)
    par = cfg.parallel
    if "activation_checkpointing" in raw and not par.activation_checkpointing:
        par = dataclasses.replace(par, activation_checkpointing=True)
    world = par.world_size if world is None else world
    par.check_world(world)
    ds = resolve_ds_config(raw, par, gradient_clipping=cfg.optim.grad_clip)
    ds = fill_offload_paths(ds, cfg.train.offload_dir)
    check_zero_section(ds)
    if budget == "node":
        budget = node_budget()
    assert budget is None or isinstance(budget, Budget)
    schedule = choose_schedule(
        cfg.model,
        par,
        budget.bytes if budget else None,
        host=bool(budget and budget.host),
        ds=ds,
        loss_chunk=cfg.train.loss_chunk_size,
    )
    par = dataclasses.replace(par, schedule=schedule)
    return ResolvedRun(
        cfg=dataclasses.replace(cfg, parallel=par),
        ds=MappingProxyType(ds),
        ds_source=None if source is None or isinstance(source, dict) else str(source),
        world=world,
        budget=budget,
    )
