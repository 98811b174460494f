"""Per-rank benchmark workers (run under torchrun): comm volume, model-state memory, step times.

Each returns one JSON-ready result per rank; the scripts in benchmarks/ spawn them through
:func:`megaclip.bench.compare.run_workers` (entry point: :mod:`megaclip.cli.bench_worker`) and
compare the files with :mod:`megaclip.perf`'s formulas.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import asdict
from typing import Any

import torch.distributed as dist

from megaclip.bench.comm import CommCounter, totals
from megaclip.bench.harness import build_engine, quiet_deepspeed, step_batches
from megaclip.bench.spec import BenchSpec
from megaclip.config.model import resolve_model
from megaclip.parallel import collectives


def _setup(spec: BenchSpec):
    from megaclip.parallel.runtime import init_distributed
    from megaclip.parallel.topology import Topology

    quiet_deepspeed()
    with contextlib.redirect_stdout(sys.stderr):
        rank, world = init_distributed()
        par = spec.parallel(world)
        topo = Topology(par)
        cfg = resolve_model(spec.model)
        engine = build_engine(spec, topo, cfg)
    return rank, par, topo, cfg, engine


def _groups(topo) -> dict[str, list[int]]:
    return {
        "tp": dist.get_process_group_ranks(topo.tp_group),
        "dp": dist.get_process_group_ranks(topo.dp_group),
        "pp": dist.get_process_group_ranks(topo.pp_group),
    }


def _base(rank: int, topo) -> dict[str, Any]:
    return {"rank": rank, "pp": topo.coords.pp, "dp": topo.coords.dp, "tp": topo.coords.tp}


def comm_worker(spec: BenchSpec, counter: CommCounter) -> dict[str, Any]:
    """Warm up, then record every collective of ``spec.steps`` steps; per-step totals by class."""
    rank, par, topo, cfg, engine = _setup(spec)
    engine.add_hook("loss", lambda *_: counter.phase("loss"))
    batches = step_batches(cfg, par, topo.coords.dp, spec.seed, engine.device)
    for _ in range(spec.warmup):
        engine.train_step(next(batches))
    counter.reset()
    with counter.recording():
        for _ in range(spec.steps):
            engine.train_step(next(batches))
    rows = [asdict(t) for t in totals(counter.records, _groups(topo), spec.steps)]
    n_local = sum(int(getattr(p, "ds_numel", p.numel())) for p in engine.engine.module.parameters())
    return {**_base(rank, topo), "rows": rows, "params_local": n_local}


def memory_worker(spec: BenchSpec) -> dict[str, Any]:
    """Model-state bytes by category, counted at the optimizer step of the last step."""
    from megaclip.bench.memory import count_state, state_tensors

    rank, par, topo, cfg, engine = _setup(spec)
    ds = engine.engine
    optimizer = ds.optimizer
    snapshot: dict[str, Any] = {}

    @contextlib.contextmanager
    def counting():  # entered right before the optimizer step
        snapshot["count"] = count_state(ds.module, optimizer)
        snapshot["largest"] = {
            k: sorted(v, key=lambda x: -x[1])[:4]
            for k, v in state_tensors(ds.module, optimizer).items()
        }
        yield

    engine.add_hook("optimizer_step", counting)
    batches = step_batches(cfg, par, topo.coords.dp, spec.seed, engine.device)
    for _ in range(max(2, spec.steps)):  # Adam's moments exist from the first step on
        engine.train_step(next(batches))
    n_local = sum(int(getattr(p, "ds_numel", p.numel())) for p in ds.module.parameters())
    return {
        **_base(rank, topo),
        "counted": snapshot["count"].as_dict(),
        "largest": snapshot["largest"],
        "params_local": n_local,
        "optimizer_class": type(optimizer).__name__,
    }


def steps_worker(spec: BenchSpec, counter: CommCounter) -> dict[str, Any]:
    """Per-step wall times, CPU seconds per step, and time blocked in PP-group collectives.

    The PP time counts every collective on the pipeline group (send/recv of activations and
    gradients, and the loss/metrics broadcasts a stage waits in while the last stage works).
    """
    from megaclip.bench.comm import seconds_by_class

    rank, par, topo, cfg, engine = _setup(spec)
    batches = step_batches(cfg, par, topo.coords.dp, spec.seed, engine.device)
    for _ in range(spec.warmup):
        engine.train_step(next(batches))
    counter.reset()
    times = []
    collectives.barrier()
    cpu0 = time.process_time()
    with counter.recording():
        for _ in range(spec.steps):
            times.append(engine.train_step(next(batches)).step_time)
    cpu = (time.process_time() - cpu0) / spec.steps
    by_class = seconds_by_class(counter.records, _groups(topo))
    return {
        **_base(rank, topo),
        "step_times": times,
        "cpu_s_per_step": cpu,
        "pp_wait_s": by_class.get("pp", 0.0) / spec.steps,
    }
