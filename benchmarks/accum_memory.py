"""Peak memory and step time of gradient accumulation: keep graphs vs recompute (PP = 1).

The micro-batch stays fixed (``--micro-batch``) while the accumulation grows (1, 4, 16, 64): the
exact global-batch step either keeps every micro-batch's autograd graph until the loss
("keep") or computes the features of all micro-batches without graphs, then the loss, then
runs each micro-batch again right before its backward ("recompute"). Each (schedule,
accumulation) runs in a fresh process (one rank) for ``--steps`` steps; the micro-batches are
regenerated from their seed in each pass (re-read, nothing cached), as a data loader re-reading
compact inputs would. Peak = the process's peak RSS (VmHWM) from engine construction to the end.

Prints one JSON line per run (schedule, accum, peak_mib, step_s = the best timed step,
step_s_median), one line for the timing run, and a final line with flat_peak_ratio (recompute:
peak at the largest accum / peak at accum 1) and time_ratio (recompute / keep step time at
accum 16). The time is measured in one process whose engine alternates the two schedules step
by step (``--time-pairs`` pairs after a warm-up pair): the machine's speed drifts over minutes
here (the same run's steps vary by 30%), and adjacent steps see the same drift. time_ratio is
the median over the pairs of recompute step / keep step; the medians and bests of each
schedule's steps are printed too.

    PYTHONPATH=. python benchmarks/accum_memory.py
    PYTHONPATH=. python benchmarks/accum_memory.py --accum 1 4 --steps 2     # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def build_engine(model: str, micro: int, accum: int, schedule: str, before=lambda: None):
    """(engine, model config) of one rank, PP = 1 ZeRO-0; ``before`` runs right before the
    engine is built (the peak measurement starts there)."""
    from megaclip.config.model import resolve_model
    from megaclip.config.parallel import ParallelConfig
    from megaclip.config.train import OptimConfig
    from megaclip.parallel.runtime import init_distributed
    from megaclip.parallel.topology import Topology
    from megaclip.train.engine import ClipEngine

    init_distributed()
    cfg = resolve_model(model)
    par = ParallelConfig(
        micro_batch_size=micro, grad_accum_steps=accum, schedule=schedule, zero_stage=0
    )
    before()
    engine = ClipEngine(cfg, par, Topology(par), {}, OptimConfig(lr=1e-4, grad_clip=0.0))
    return engine, cfg


def worker(model: str, micro: int, accum: int, schedule: str, steps: int) -> dict:
    import torch

    from benchmarks.huge_batch import LazyBatches
    from megaclip.train.memlog import peak_bytes, reset_peak

    engine, cfg = build_engine(model, micro, accum, schedule, before=reset_peak)
    times = []
    for step in range(steps):
        batches = LazyBatches(accum, step, micro, cfg)
        times.append(engine.train_step(batches).step_time)
    torch.distributed.barrier()
    return {
        "schedule": engine.schedule,
        "accum": accum,
        "micro_batch": micro,
        "peak_mib": round(peak_bytes() / 2**20, 1),
        "step_s": round(min(times[1:] or times), 4),  # best of the timed steps (load noise)
        "step_s_median": round(statistics.median(times[1:] or times), 4),
    }


def timing_worker(model: str, micro: int, accum: int, pairs: int) -> dict:
    """Step times of one engine alternating keep / recompute (the schedule is read per step)."""
    import torch

    from benchmarks.huge_batch import LazyBatches

    engine, cfg = build_engine(model, micro, accum, "keep")
    times: dict[str, list[float]] = {"keep": [], "recompute": []}
    for step in range(pairs + 1):  # the first pair warms both paths up
        for schedule in ("keep", "recompute"):
            engine.schedule = schedule
            t = engine.train_step(LazyBatches(accum, step, micro, cfg)).step_time
            if step:
                times[schedule].append(t)
    torch.distributed.barrier()
    ratios = [r / k for k, r in zip(times["keep"], times["recompute"])]
    return {
        "timing": "alternating",
        "accum": accum,
        "pairs": pairs,
        "time_ratio": round(statistics.median(ratios), 3),
        "step_s_keep_median": round(statistics.median(times["keep"]), 4),
        "step_s_recompute_median": round(statistics.median(times["recompute"]), 4),
        "step_s_keep_best": round(min(times["keep"]), 4),
        "step_s_recompute_best": round(min(times["recompute"]), 4),
        "pair_ratios": [round(x, 3) for x in ratios],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=str(REPO / "megaclip/bench/models/bench-pp.yaml"))
    p.add_argument("--micro-batch", type=int, default=32)
    p.add_argument("--accum", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--steps", type=int, default=5, help="steps per run (the first is warm-up)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--time-pairs", type=int, default=10, help="alternating keep/recompute step pairs"
    )
    p.add_argument("--worker", nargs=2, metavar=("ACCUM", "SCHEDULE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        accum, schedule = int(args.worker[0]), args.worker[1]
        if schedule == "alternate":
            row = timing_worker(args.model, args.micro_batch, accum, args.time_pairs)
        else:
            row = worker(args.model, args.micro_batch, accum, schedule, args.steps)
        print(json.dumps(row))
        sys.stdout.flush()
        os._exit(0)
    rows = []
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        DS_ACCELERATOR="cpu",
        PYTHONPATH=str(REPO),
        WORLD_SIZE="1",
        RANK="0",
        LOCAL_RANK="0",
    )

    def run(schedule: str, accum: int) -> dict:
        cmd = [
            sys.executable, str(Path(__file__).resolve()), "--worker", str(accum), schedule,
            "--model", args.model, "--micro-batch", str(args.micro_batch),
            "--steps", str(args.steps), "--time-pairs", str(args.time_pairs),
        ]  # fmt: skip
        out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"run {schedule} accum {accum} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    for schedule in ("keep", "recompute"):
        for accum in args.accum:
            row = run(schedule, accum)
            rows.append(row)
            print(json.dumps(row), flush=True)
    mid = 16 if 16 in args.accum else max(args.accum)
    timing = run("alternate", mid)
    print(json.dumps(timing), flush=True)

    def pick(schedule: str, accum: int) -> dict:
        return next(r for r in rows if r["schedule"] == schedule and r["accum"] == accum)

    big = max(args.accum)
    summary = {
        "flat_peak_ratio": round(
            pick("recompute", big)["peak_mib"] / pick("recompute", min(args.accum))["peak_mib"], 3
        ),
        "keep_peak_ratio": round(
            pick("keep", big)["peak_mib"] / pick("keep", min(args.accum))["peak_mib"], 3
        ),
        "time_ratio": timing["time_ratio"],
        "step_s_keep": timing["step_s_keep_median"],
        "step_s_recompute": timing["step_s_recompute_median"],
        "accum_for_peak": big,
        "accum_for_time": mid,
    }
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
