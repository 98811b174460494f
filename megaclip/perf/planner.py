"""Cluster planner: enumerate (tp, pp, dp, ZeRO, micro-batch, accumulation, checkpointing)
layouts of a model on N GPUs, keep those that fit in memory, rank them by predicted throughput.

Search space (all pure arithmetic, see docs/planner.md):
- tp: divides both towers' heads and MLP widths, <= min(max_tp, GPUs per node) (TP stays on
  NVLink), divides the GPU count;
- pp: divides gpus / tp, at most the number of residual blocks; dp = gpus / (tp * pp);
- ZeRO 0..3 when pp = 1, 0/1 when pp > 1 (DeepSpeed's pipeline engine);
- micro-batch b and accumulation m with b * m * dp equal to the requested global batch, or within
  ``batch_tolerance`` of it, or else the closest reachable value;
- activation checkpointing off and on.
Ranking: predicted samples/s in tiers of ``tie`` (1%) below the fastest, then the simpler layout
(lower ZeRO stage, less TP x PP), then the faster. A layout fits when every stage's peak
(megaclip.perf.memory) is at most ``memory * (1 - margin) - reserved``; its step time comes
from megaclip.perf.timing.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field, replace

from megaclip.config.deepspeed import deepspeed_config
from megaclip.config.model import ClipConfig
from megaclip.config.parallel import ParallelConfig
from megaclip.config.train import OptimConfig
from megaclip.errors import ConfigError
from megaclip.perf.calibration import CALIBRATED
from megaclip.perf.memory import StageMemory, default_stages, layout_memory
from megaclip.perf.timing import Cluster, Efficiency, StepTime, Workload, step_time

GIB = 2**30


def parse_batch(text: str | int) -> int:
    """A batch size from "163840", "160k" (k = 1024, CLIP's convention: 32k = 32,768) or "1e5"."""
    if isinstance(text, int):
        value: float = text
    else:
        s = text.strip().lower().replace("_", "").replace(",", "")
        match = re.fullmatch(r"(\d+(?:\.\d+)?)k", s)
        try:
            value = float(match.group(1)) * 1024 if match else float(s)
        except ValueError:
            raise ConfigError(
                f"cannot read global batch '{text}'; use an integer, '160k' (x1024) or '1e5'"
            ) from None
    if value < 1 or value != int(value):
        raise ConfigError(f"global batch must be a positive integer, got '{text}'")
    return int(value)


def divisors(n: int) -> list[int]:
    """Positive divisors of n in increasing order."""
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


@dataclass(frozen=True)
class PlanRequest:
    """What to plan: a model on a cluster with a target global batch, and the model constants."""

    model: ClipConfig
    cluster: Cluster
    global_batch: int
    precision: str = "bf16"
    efficiency: Efficiency = CALIBRATED
    memory_margin: float = 0.10
    reserved_gib: float = 2.0
    max_tp: int = 8
    batch_tolerance: float = 0.01
    checkpointing: tuple[bool, ...] = (False, True)
    max_micro_batch: int = 1024
    tie: float = 0.01
    schedule: str = "auto"  # auto: per layout, keep graphs where they fit, else recompute

    @property
    def usable_bytes(self) -> float:
        """Memory a rank may plan for: total * (1 - margin) - reserved (context, NCCL, frag.)."""
        return self.cluster.device.memory_bytes * (1 - self.memory_margin) - self.reserved_gib * GIB


@dataclass(frozen=True)
class Candidate:
    """One evaluated layout: its per-stage memory and, when it fits, its predicted step."""

    par: ParallelConfig
    memory: tuple[StageMemory, ...]
    time: StepTime | None

    @property
    def peak_bytes(self) -> float:
        """Largest per-rank peak over the stages."""
        return max(m.peak for m in self.memory)

    def row(self) -> dict[str, object]:
        """Flat summary used by the table and the JSON output."""
        p, t = self.par, self.time
        out: dict[str, object] = {
            "tp": p.tp,
            "pp": p.pp,
            "dp": p.dp,
            "zero": p.zero_stage,
            "micro_batch": p.micro_batch_size,
            "grad_accum": p.grad_accum_steps,
            "checkpointing": p.activation_checkpointing,
            "global_batch": p.global_batch_size,
            "precision": p.precision,
            "schedule": p.schedule,
            "peak_gib": round(self.peak_bytes / GIB, 2),
        }
        if t is not None:
            comm = t.tp_s + t.pp_s + t.loss_s + t.dp_exposed_s
            out |= {
                "step_s": round(t.total_s, 4),
                "samples_per_s": round(t.samples_per_s, 1),
                "samples_per_s_per_gpu": round(t.samples_per_s_per_gpu, 3),
                "mfu": round(t.mfu, 4),
                "bubble": round(t.bubble_fraction, 4),
                "comm_s": round(comm, 4),
            }
        return out


@dataclass(frozen=True)
class PlanResult:
    """Feasible candidates best first, plus what was tried and the least memory-hungry misfit."""

    request: PlanRequest
    feasible: tuple[Candidate, ...]
    tried: int
    smallest_misfit: Candidate | None = field(default=None)

    @property
    def best(self) -> Candidate:
        """The top-ranked feasible layout."""
        return self.feasible[0]


def tp_options(cfg: ClipConfig, gpus: int, node_size: int, max_tp: int) -> list[int]:
    """TP sizes dividing heads and MLP widths of both towers and the GPU count, within a node."""
    dims = (cfg.vision.heads, cfg.text.heads, cfg.vision.mlp_dim, cfg.text.mlp_dim)
    limit = min(max_tp, node_size)
    return [t for t in divisors(gpus) if t <= limit and all(x % t == 0 for x in dims)]


def batch_options(
    global_batch: int, dp: int, tolerance: float, max_micro: int
) -> list[tuple[int, int]]:
    """(micro, accum) pairs with micro * accum * dp within ``tolerance`` of the global batch.

    Micro-batches tried: the divisors of the per-rank batch and the powers of two below it.
    When none is within tolerance, the pairs reaching the closest global batch are returned.
    """
    local = max(1, round(global_batch / dp))
    micros = set(divisors(local))
    micros |= {2**k for k in range(int(math.log2(local)) + 1)}
    pairs: dict[tuple[int, int], float] = {}
    for b in sorted(x for x in micros if x <= max_micro):
        m = max(1, round(global_batch / (dp * b)))
        pairs[(b, m)] = abs(b * m * dp - global_batch) / global_batch
    if not pairs:
        pairs[(1, local)] = abs(local * dp - global_batch) / global_batch
    within = [k for k, e in pairs.items() if e <= tolerance]
    if within:
        return sorted(within)
    best = min(pairs.values())
    return sorted(k for k, e in pairs.items() if e == best)


def layouts(req: PlanRequest) -> Iterator[ParallelConfig]:
    """Every layout of the search space (module docstring), validated by ParallelConfig."""
    cfg, gpus = req.model, req.cluster.gpus
    blocks = cfg.vision.layers + cfg.text.layers
    for tp in tp_options(cfg, gpus, req.cluster.node_size, req.max_tp):
        for pp in (p for p in divisors(gpus // tp) if p <= blocks):
            dp = gpus // (tp * pp)
            zeros = (0, 1) if pp > 1 else (0, 1, 2, 3)
            for b, m in batch_options(
                req.global_batch, dp, req.batch_tolerance, req.max_micro_batch
            ):
                for zero in zeros:
                    if zero > 0 and dp == 1:
                        continue  # nothing to shard
                    for ckpt in req.checkpointing:
                        yield ParallelConfig(
                            tp=tp,
                            pp=pp,
                            dp=dp,
                            zero_stage=zero,
                            micro_batch_size=b,
                            grad_accum_steps=m,
                            precision=req.precision,  # type: ignore[arg-type]
                            activation_checkpointing=ckpt,
                            # ZeRO-3 with accumulation can only recompute
                            schedule="recompute"
                            if (zero == 3 and pp == 1 and m > 1)
                            else req.schedule,  # type: ignore[arg-type]
                        )


def check_request(req: PlanRequest) -> None:
    """Raise a ConfigError naming the fix for GPU counts the planner cannot lay out."""
    gpus, node = req.cluster.gpus, req.cluster.node_size
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    if gpus > node and gpus % node:
        raise ConfigError(
            f"--gpus {gpus} is not a multiple of the {node} GPUs per node; "
            f"use {gpus // node * node} or {(gpus // node + 1) * node} (or set --gpus-per-node)"
        )
    if not tp_options(req.model, gpus, node, req.max_tp):
        raise ConfigError(f"no tensor-parallel size divides both --gpus {gpus} and the model")


def _with_schedule(
    cfg: ClipConfig, par: ParallelConfig, stages: tuple, limit: float
) -> tuple[ParallelConfig, tuple[StageMemory, ...]]:
    """``par`` with "auto" resolved (keep where its peak fits ``limit``, else recompute)."""
    if par.schedule != "auto":
        return par, layout_memory(cfg, par, stages, schedule=par.schedule)
    for schedule in ("keep", "recompute") if par.grad_accum_steps > 1 else ("keep",):
        mem = layout_memory(cfg, par, stages, schedule=schedule)
        if max(m.peak for m in mem) <= limit:
            break
    return replace(par, schedule=schedule), mem  # type: ignore[arg-type]


def plan(req: PlanRequest) -> PlanResult:
    """Evaluate all layouts of ``req``; feasible ones ranked by samples/s (then less memory)."""
    check_request(req)
    limit = req.usable_bytes
    stage_cache: dict[int, tuple] = {}

    feasible: list[Candidate] = []
    misfit: Candidate | None = None
    tried = 0
    for par in layouts(req):
        tried += 1
        stages = stage_cache.setdefault(par.pp, default_stages(req.model, par.pp))
        par, mem = _with_schedule(req.model, par, stages, limit)
        cand = Candidate(par, mem, None)
        if cand.peak_bytes > limit:
            if misfit is None or cand.peak_bytes < misfit.peak_bytes:
                misfit = cand
            continue
        work = Workload(schedule=par.schedule)
        t = step_time(req.model, par, req.cluster, req.efficiency, stages, work)
        feasible.append(Candidate(par, mem, t))
    if feasible:
        best_rate = max(c.time.samples_per_s for c in feasible)  # type: ignore[union-attr]
        feasible.sort(key=lambda c: rank_key(c, best_rate, req.tie))
    return PlanResult(req, tuple(feasible), tried, misfit)


def rank_key(c: Candidate, best_rate: float, tie: float) -> tuple[float, ...]:
    """Tier of throughput (tiers of ``tie`` x the best), then lower ZeRO, less TP x PP, faster.

    The model cannot tell layouts apart within about a percent, so among layouts within ``tie``
    of each other the simpler one wins (ZeRO-3's many gathers, TP and PP carry overheads the
    model does not price); the best tier holds everything within ``tie`` of the fastest.
    """
    assert c.time is not None
    rate = c.time.samples_per_s
    tier = math.floor((best_rate - rate) / (tie * best_rate)) if tie > 0 else 0
    return (tier, c.par.zero_stage, c.par.tp * c.par.pp, -rate, c.peak_bytes)


def nothing_fits_message(result: PlanResult) -> str:
    """One line saying that no layout fits, the closest one, and what to change."""
    req = result.request
    dev = req.cluster.device
    usable = req.usable_bytes / GIB
    closest = ""
    if result.smallest_misfit is not None:
        p = result.smallest_misfit.par
        ckpt = "on" if p.activation_checkpointing else "off"
        closest = (
            f"; the smallest needs {result.smallest_misfit.peak_bytes / GIB:.1f} GiB "
            f"(tp={p.tp} pp={p.pp} zero={p.zero_stage} micro={p.micro_batch_size} "
            f"accum={p.grad_accum_steps} checkpointing={ckpt})"
        )
    return (
        f"no layout of {req.model.name} with global batch {req.global_batch} fits in "
        f"{usable:.1f} GiB usable per {dev.name} on {req.cluster.gpus} GPUs{closest}. "
        "Use more GPUs or a GPU with more memory, lower --global-batch (the exact loss keeps every "
        "micro-batch's activations alive), or lower --memory-margin"
    )


def plan_ds_config(par: ParallelConfig) -> dict[str, object]:
    """The DeepSpeed config `megaclip plan --out-dir` writes for ``par``: the one builder's
    (:func:`megaclip.config.deepspeed.deepspeed_config`), with ``overlap_comm`` on, as the step
    time (DP reductions under the backward) and the memory model (two reduce buckets) assume,
    and ``optim.grad_clip``'s default clipping (`megaclip train` sets it from the run config)."""
    return deepspeed_config(par, OptimConfig().grad_clip, overlap_comm=True)
