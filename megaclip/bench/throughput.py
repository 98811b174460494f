"""Measured throughput of ClipEngine on synthetic data: samples/s, TFLOPs, MFU/HFU, memory, split.

Run on every rank of a launched world (``megaclip bench`` spawns torchrun when needed). Rank 0
returns one dict (printed as one JSON line by the CLI); the other ranks return None. What is
measured, per rank, and how it is reduced:

- step time: ``StepResult.step_time`` of the timed steps (after ``warmup`` untimed ones); the
  slowest rank's *median* is the step time (steps are synchronous; the median resists the
  load spikes of a shared machine), the mean is reported too;
- time split (mean per step, rank 0 and per stage): features (PP = 1: the forwards; PP > 1: the
  no-grad pipelined feature pass; the loss time is subtracted), loss (the exact global-batch
  loss and its gradient), backward (the rest: surrogate backward, for PP > 1 the 1F1B training
  pass; the optimizer time is subtracted), optimizer (DeepSpeed's
  optimizer ``step``), and the wall time spent inside blocking collectives
  per class (TP / DP / PP / loss), from :class:`megaclip.bench.comm.CommCounter`;
- pipeline bubble (PP > 1): time a stage spends blocked in collectives on its pipeline group
  (activation/gradient send and recv, the loss and metrics broadcasts it waits in while the
  last stage works) per step over the mean step time, next to the analytic (P-1)/(m+P-1);
- peak memory per rank: GPU ``max_memory_allocated`` over the timed steps; CPU the process's
  max RSS (``getrusage``) and its growth over the RSS at the start of the timed steps;
- peak FLOP/s per device: the GPU table, or on CPU a GEMM probe per rank run right after the
  timed steps with the same thread count (fp32 and bf16 both reported; MFU uses the run's);
- on CPU also the process CPU seconds per step of every rank and ``mfu_cpu_time``: each rank's
  model FLOPs per CPU second over the probe's FLOPs per CPU second, averaged over ranks (the
  same efficiency measured in the clock a shared machine does not distort).
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from typing import Any

import torch
import torch.distributed as dist

from megaclip.bench.comm import CommCounter, seconds_by_class
from megaclip.bench.harness import (
    BenchSpec,
    Timer,
    build_engine,
    current_rss_bytes,
    max_rss_bytes,
    quiet_deepspeed,
    step_batches,
)
from megaclip.config.model import resolve_model
from megaclip.model.flops import model_cost
from megaclip.parallel import collectives
from megaclip.perf.throughput import analytic_bubble, hardware_flops_factor, median, throughput
from megaclip.train.metrics import cpu_probe_size, device_peak, probe_matmul


def instrument(engine, counter: CommCounter | None) -> dict[str, Timer]:
    """Time the engine's loss and optimizer step through its hooks (and tag loss collectives)."""
    timers = {"loss": Timer(), "optimizer": Timer()}
    engine.add_hook("loss", lambda *_: timers["loss"])
    if counter is not None:
        engine.add_hook("loss", lambda *_: counter.phase("loss"))
    engine.add_hook("optimizer_step", lambda: timers["optimizer"])
    return timers


def _groups(topo) -> dict[str, list[int]]:
    return {
        "tp": dist.get_process_group_ranks(topo.tp_group),
        "dp": dist.get_process_group_ranks(topo.dp_group),
        "pp": dist.get_process_group_ranks(topo.pp_group),
    }


def run_throughput(
    spec: BenchSpec,
    counter: CommCounter | None = None,
    *,
    probe_size: int = 2048,
    probe_repeats: int = 5,
) -> dict[str, Any] | None:
    """Build, warm up and time ``spec`` on the launched world; rank 0 gets the result dict."""
    from megaclip.parallel.device import accelerator
    from megaclip.parallel.runtime import init_distributed
    from megaclip.parallel.topology import Topology

    quiet_deepspeed()
    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints its set-up to stdout
        rank, world = init_distributed()
        topo = Topology(spec.parallel(world))
        cfg = resolve_model(spec.model)
        engine = build_engine(spec, topo, cfg)
    par = engine.par  # resolved: the schedule that runs
    timers = instrument(engine, counter)
    batches = step_batches(cfg, par, topo.coords.dp, spec.seed, engine.device)
    for _ in range(spec.warmup):
        engine.train_step(next(batches))
    acc = accelerator()
    gpu = engine.device.type != "cpu"
    if gpu:
        acc.reset_peak_memory_stats()
    for t in timers.values():
        t.total, t.calls = 0.0, 0
    if counter is not None:
        counter.reset()
    rss_before = current_rss_bytes()
    results = []
    collectives.barrier()
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if counter is not None:
        with counter.recording():
            for _ in range(spec.steps):
                results.append(engine.train_step(next(batches)))
    else:
        for _ in range(spec.steps):
            results.append(engine.train_step(next(batches)))
    wall = time.perf_counter() - wall0
    cpu_per_step = (time.process_time() - cpu0) / spec.steps
    if gpu:
        peak_mem = int(acc.max_memory_allocated())
        mem_delta = peak_mem
    else:
        peak_mem = max_rss_bytes()
        mem_delta = max(0, peak_mem - rss_before)
    records = counter.records if counter is not None else []
    groups = _groups(topo)
    comm_s = {k: v / spec.steps for k, v in seconds_by_class(records, groups).items()}
    pp_wait_s = comm_s.get("pp", 0.0)  # every collective on the pipeline group, per step
    step_times = [r.step_time for r in results]
    mean_step = sum(step_times) / len(step_times)
    collectives.barrier()  # every rank probes at the same time, as it trained
    peak = device_peak(
        par.precision, engine.device, probe_size=probe_size, probe_repeats=probe_repeats
    )
    probes = {}
    if not gpu:
        for precision in ("fp32", "bf16"):
            probes[precision] = (
                peak.flops
                if precision == par.precision
                else probe_matmul(
                    precision, cpu_probe_size(precision, probe_size), probe_repeats
                ).flops
            ) / 1e12
    mine = {
        "rank": rank,
        "device": engine.device.type if not gpu else peak.source,
        "coords": [topo.coords.pp, topo.coords.dp, topo.coords.tp],
        "mean_step_s": mean_step,
        "median_step_s": median(step_times),
        "features_s": sum(r.feature_time for r in results) / spec.steps,
        "backward_s": sum(r.backward_time for r in results) / spec.steps,
        "loss_s": timers["loss"].total / spec.steps,
        "optimizer_s": timers["optimizer"].total / spec.steps,
        "comm_s": comm_s,
        "pp_wait_s": pp_wait_s,
        "peak_memory_bytes": peak_mem,
        "step_memory_delta_bytes": mem_delta,
        "cpu_s_per_step": cpu_per_step,
        "peak_flops": peak.flops,
        "peak_cpu_flops": peak.cpu_flops,
        "peak_source": peak.source,
        "probe_tflops": probes,
        "wall_s": wall,
    }
    everyone: list[dict[str, Any]] = collectives.all_gather_object(mine)
    if rank != 0:
        return None
    return summarize(spec, cfg, par, everyone, results[-1])


def summarize(spec: BenchSpec, cfg, par, ranks: list[dict[str, Any]], last) -> dict[str, Any]:
    """Combine the per-rank measurements into the benchmark's one result dict (pure); ``par``
    is the resolved layout that ran (its schedule "keep" or "recompute")."""
    cost = model_cost(cfg)
    step = max(r["median_step_s"] for r in ranks)
    peak = min(r["peak_flops"] for r in ranks)  # a device is as fast as the slowest probe
    tput = throughput(
        par.global_batch_size,
        step,
        par.world_size,
        cost.macs_total,
        peak,
        recompute=par.activation_checkpointing,
        pp=par.pp,
        schedule=par.schedule,
        accum=par.grad_accum_steps,
    )
    r0 = ranks[0]

    def split(r: dict[str, Any]) -> dict[str, Any]:
        return {
            "features_s": r["features_s"] - r["loss_s"],
            "loss_s": r["loss_s"],
            "backward_s": r["backward_s"] - r["optimizer_s"],
            "optimizer_s": r["optimizer_s"],
            "comm_s": {k: round(v, 6) for k, v in sorted(r["comm_s"].items()) if k != "self"},
        }

    stage_reps = {}
    for r in ranks:
        pp_rank, dp_rank, tp_rank = r["coords"]
        if dp_rank == 0 and tp_rank == 0:
            stage_reps[pp_rank] = r
    bubble = None
    if par.pp > 1:
        per_stage = [
            stage_reps[s]["pp_wait_s"] / stage_reps[s]["mean_step_s"] for s in range(par.pp)
        ]
        bubble = {
            "measured_per_stage": [round(x, 4) for x in per_stage],
            "measured": round(sum(per_stage) / len(per_stage), 4),
            "analytic": round(analytic_bubble(par.pp, par.grad_accum_steps), 4),
        }
    probe = r0["probe_tflops"]
    mfu_cpu = None
    if all(r["peak_cpu_flops"] for r in ranks):
        flops_per_rank = 6.0 * cost.macs_total * par.global_batch_size / par.world_size
        per_rank = [flops_per_rank / r["cpu_s_per_step"] / r["peak_cpu_flops"] for r in ranks]
        mfu_cpu = sum(per_rank) / len(per_rank)
    return {
        "model": cfg.name,
        "layout": {
            "tp": par.tp,
            "pp": par.pp,
            "dp": par.dp,
            "zero": par.zero_stage,
            "micro_batch": par.micro_batch_size,
            "accum": par.grad_accum_steps,
            "global_batch": par.global_batch_size,
            "precision": par.precision,
            "recompute": par.activation_checkpointing,
            "schedule": par.schedule,
            "world_size": par.world_size,
        },
        "device": r0["device"],
        "host": platform.node(),
        "threads_per_rank": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "steps": spec.steps,
        "warmup": spec.warmup,
        "step_time_s": step,
        "step_time_mean_s": max(r["mean_step_s"] for r in ranks),
        **tput.as_dict(),
        "macs_per_sample": cost.macs_total,
        "model_flops_per_sample": 6 * cost.macs_total,
        "hardware_flops_factor": hardware_flops_factor(
            par.activation_checkpointing, par.pp, par.schedule, par.grad_accum_steps
        ),
        "peak_tflops_per_device": peak / 1e12,
        "peak_source": r0["peak_source"],
        "probe_tflops": probe,
        "cpu_s_per_step_per_rank": [r["cpu_s_per_step"] for r in ranks],
        "mfu_cpu_time": mfu_cpu,
        "peak_memory_kind": "max_rss" if r0["device"] == "cpu" else "max_memory_allocated",
        "peak_memory_bytes_per_rank": [r["peak_memory_bytes"] for r in ranks],
        "step_memory_delta_bytes_per_rank": [r["step_memory_delta_bytes"] for r in ranks],
        "time_split": split(r0),
        "time_split_per_stage": [split(stage_reps[s]) for s in sorted(stage_reps)]
        if par.pp > 1
        else None,
        "bubble": bubble,
        "loss": last.loss,
    }
