"""`megaclip bench`: measured samples/s, TFLOPs, MFU/HFU, memory and step-time split of a layout.

Spawns tp x pp x dp local ranks with torchrun (or runs inside an existing torchrun / deepspeed /
SLURM launch), trains on synthetic data and prints one JSON line (``--json``) or a summary.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from megaclip.bench.spec import BenchSpec
from megaclip.errors import ConfigError


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """The layout / step-count options shared by ``megaclip bench`` and benchmarks/throughput.py."""
    p.add_argument("--model", default="tiny", help="preset name or model YAML/JSON (default tiny)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument(
        "--dp",
        type=int,
        default=None,
        help="data-parallel size (default: 1 when spawning, world / (tp*pp) when launched)",
    )
    p.add_argument("--micro-batch", type=int, default=8, help="samples per micro-batch per rank")
    p.add_argument("--accum", type=int, default=1, help="micro-batches per step (grad accum)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=1, help="ZeRO stage")
    p.add_argument("--steps", type=int, default=5, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps")
    p.add_argument("--recompute", action="store_true", help="activation checkpointing")
    p.add_argument(
        "--schedule",
        choices=("auto", "keep", "recompute"),
        default="auto",
        help="exact-loss schedule: keep graphs, recompute (flat memory), auto (docs/loss.md)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--probe-size", type=int, default=2048, help="CPU GEMM probe size n (n^3)")
    p.add_argument("--json", action="store_true", help="print one JSON line")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the `bench` sub-command to the megaclip CLI."""
    p = sub.add_parser(
        "bench",
        help="measure throughput, MFU and memory of a parallel layout",
        description=__doc__.split(":", 1)[1].strip(),
    )
    add_bench_args(p)
    p.set_defaults(func=run)


def spec_from_args(args: argparse.Namespace) -> BenchSpec:
    """The BenchSpec an argparse namespace describes (validated)."""
    for name in ("tp", "pp", "micro_batch", "accum", "steps"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        raise ConfigError(f"--warmup must be >= 0, got {args.warmup}")
    if args.dp is not None and args.dp < 1:
        raise ConfigError(f"--dp must be >= 1, got {args.dp}")
    return BenchSpec(
        model=args.model,
        tp=args.tp,
        pp=args.pp,
        dp=args.dp,
        micro_batch=args.micro_batch,
        accum=args.accum,
        precision=args.precision,
        zero=args.zero,
        steps=args.steps,
        warmup=args.warmup,
        recompute=args.recompute,
        schedule=args.schedule,
        seed=args.seed,
    )


def _forward_argv(args: argparse.Namespace, dp: int) -> list[str]:
    argv = [
        "--model", args.model, "--tp", str(args.tp), "--pp", str(args.pp), "--dp", str(dp),
        "--micro-batch", str(args.micro_batch), "--accum", str(args.accum),
        "--precision", args.precision, "--zero", str(args.zero), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--seed", str(args.seed),
        "--probe-size", str(args.probe_size),
    ]  # fmt: skip
    if args.recompute:
        argv.append("--recompute")
    if args.json:
        argv.append("--json")
    return argv


def format_summary(r: dict[str, Any]) -> str:
    """A human-readable summary of one benchmark result."""
    lay = r["layout"]
    mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
    hfu = "n/a" if r["hfu"] is None else f"{100 * r['hfu']:.1f}%"
    gib = 2**30
    mem = ", ".join(f"{b / gib:.2f}" for b in r["peak_memory_bytes_per_rank"])
    split = r["time_split"]
    lines = [
        f"model {r['model']}  tp={lay['tp']} pp={lay['pp']} dp={lay['dp']} zero={lay['zero']} "
        f"micro={lay['micro_batch']} accum={lay['accum']} {lay['precision']}"
        f"{' recompute' if lay['recompute'] else ''}  ({r['device']})",
        f"step time        {r['step_time_s'] * 1e3:.1f} ms median "
        f"(mean {r['step_time_mean_s'] * 1e3:.1f})",
        f"samples/s        {r['samples_per_s']:.2f} total, "
        f"{r['samples_per_s_per_device']:.2f} per device",
        f"TFLOP/s/device   {r['model_tflops_per_device']:.4f} model, "
        f"{r['hardware_tflops_per_device']:.4f} hardware; peak {r['peak_tflops_per_device']:.4f} "
        f"({r['peak_source']})",
        f"MFU / HFU        {mfu} / {hfu}"
        + (f"  (CPU-time MFU {100 * r['mfu_cpu_time']:.1f}%)" if r.get("mfu_cpu_time") else ""),
        f"peak memory GiB  [{mem}] ({r['peak_memory_kind']})",
        f"split (s/step)   features {split['features_s']:.4f}, loss {split['loss_s']:.4f}, "
        f"backward {split['backward_s']:.4f}, optimizer {split['optimizer_s']:.4f}, "
        f"comm {split['comm_s']}",
    ]
    if r["bubble"]:
        b = r["bubble"]
        lines.append(
            f"pipeline bubble  measured {b['measured']:.3f} (per stage {b['measured_per_stage']}), "
            f"analytic (P-1)/(m+P-1) = {b['analytic']:.3f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Spawn the ranks (or run here when launched / single process); rank 0 prints."""
    from megaclip.bench import launch

    spec = spec_from_args(args)
    if not launch.launched():
        world = spec.world_size(default_dp=1)
        if world > 1:
            dp = spec.dp if spec.dp is not None else 1
            proc = launch.spawn(world, ["-m", "megaclip", "bench", *_forward_argv(args, dp)])
            return proc.returncode
        launch.single_process_env()
    return _run_here(spec, args)


def _run_here(spec: BenchSpec, args: argparse.Namespace) -> int:
    from megaclip.bench.comm import CommCounter
    from megaclip.bench.harness import quiet_deepspeed
    from megaclip.bench.throughput import run_throughput
    from megaclip.parallel.runtime import clean_exit

    quiet_deepspeed()  # first DeepSpeed import: its logs go to stderr, stdout keeps the result
    counter = CommCounter().install()  # before init_distributed: DeepSpeed captures functions
    result = run_throughput(spec, counter, probe_size=args.probe_size)
    if result is not None:
        sys.stdout.flush()
        print(json.dumps(result) if args.json else format_summary(result), flush=True)
    clean_exit(0)
    return 0  # pragma: no cover - clean_exit does not return
