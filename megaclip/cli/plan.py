"""`megaclip plan`: rank parallel layouts of a model on a GPU cluster by predicted throughput.

Examples:
    megaclip plan --model ViT-G-14 --gpus 1024 --gpu a100-40gb --global-batch 160k
    megaclip plan --model ViT-G-14 --gpus 256 --gpu h100-80gb --out-dir plan/   # files, below
    bash plan/launch.sh train.steps=1000      # trains the best layout (deepspeed launcher)
    megaclip plan --calibrate                                                  # model vs papers
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import yaml

from megaclip.cli.common import add_documented
from megaclip.config.model import resolve_model
from megaclip.config.parallel import ParallelConfig
from megaclip.config.schema import load_mapping, to_dict
from megaclip.errors import ConfigError
from megaclip.model.flops import model_cost
from megaclip.perf.calibration import (
    BAND,
    CALIBRATED,
    CROSS_CHECK,
    RUNS,
    cross_check_ratio,
    fit,
    predict,
)
from megaclip.perf.devices import DEVICES, get_device
from megaclip.perf.planner import (
    GIB,
    PlanRequest,
    PlanResult,
    nothing_fits_message,
    parse_batch,
    plan,
    plan_ds_config,
)
from megaclip.perf.timing import Cluster

#: The Efficiency fields that ``--NAME-eff`` overrides (the two calibrated constants).
EFFICIENCY_OVERRIDES = ("matmul", "memory")


def register(sub: argparse._SubParsersAction) -> None:
    p = add_documented(
        sub,
        "plan",
        help="choose TP/PP/DP/ZeRO/micro-batch for a model on N GPUs (analytic model)",
        doc=__doc__,
    )
    p.add_argument("--model", help="preset name (e.g. ViT-G-14) or a model YAML/JSON file")
    p.add_argument("--gpus", type=int, help="total number of GPUs")
    p.add_argument("--gpu", help=f"GPU kind: {', '.join(DEVICES)}")
    p.add_argument(
        "--global-batch", default="32k", help="global batch: 163840, 160k (k = 1024) or 1e5"
    )
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--top", type=int, default=10, help="rows to show (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--out-dir",
        help="write the best layout's ds_config.json, run.yaml, launch.sh (+ hostfile on one "
        "node) and plan.json: `bash DIR/launch.sh` trains it",
    )
    p.add_argument("--gpus-per-node", type=int, help="default: the GPU kind's usual node (8)")
    p.add_argument("--internode-gbps", type=float, help="network GB/s per GPU per direction")
    p.add_argument(
        "--memory-margin",
        type=float,
        default=0.10,
        help="fraction of GPU memory kept free (default 0.10), besides 2 GiB reserved",
    )
    p.add_argument(
        "--schedule",
        default="auto",
        choices=("auto", "keep", "recompute"),
        help="exact-loss schedule: keep = every micro-batch's graph alive; recompute = a no-grad "
        "feature pass first (flat memory); auto (default) = keep where it fits, else recompute",
    )
    for name in EFFICIENCY_OVERRIDES:
        p.add_argument(
            f"--{name}-eff", type=float, help=f"override the calibrated {name} efficiency"
        )
    p.add_argument(
        "--train-config",
        help="run config (data, optim, train) that --out-dir's run.yaml copies, with the plan's "
        "model and parallel sections (default: none, synthetic data)",
    )
    p.add_argument(
        "--calibrate", action="store_true", help="show the model against the published runs"
    )
    p.add_argument(
        "--run", metavar="RUN_DIR", help="a `megaclip train` out_dir: measured memory vs predicted"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.calibrate:
        return _calibrate(args.json)
    if args.run:
        return _run_memory(args.run, args.json)
    missing = [f"--{n}" for n in ("model", "gpus", "gpu") if getattr(args, n) is None]
    if missing:
        raise ConfigError(f"plan needs {', '.join(missing)} (or --calibrate)")
    if args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    if not 0 <= args.memory_margin < 1:
        raise ConfigError(f"--memory-margin must be in [0, 1), got {args.memory_margin}")
    device = get_device(args.gpu)
    overrides = {name: getattr(args, f"{name}_eff") for name in EFFICIENCY_OVERRIDES}
    eff = replace(CALIBRATED, **{name: v for name, v in overrides.items() if v is not None})
    if not (0 < eff.matmul <= 1 and 0 < eff.memory <= 1):
        raise ConfigError("--matmul-eff and --memory-eff must be in (0, 1]")
    req = PlanRequest(
        model=resolve_model(args.model),
        cluster=Cluster(device, args.gpus, args.gpus_per_node, args.internode_gbps),
        global_batch=parse_batch(args.global_batch),
        precision=args.precision,
        efficiency=eff,
        memory_margin=args.memory_margin,
        schedule=args.schedule,
    )
    result = plan(req)
    if not result.feasible:
        raise ConfigError(nothing_fits_message(result))
    if args.json:
        print(json.dumps(_as_json(result, args.top), indent=2))
    else:
        _print_table(result, args.top, args.global_batch)
    if args.out_dir:
        written = _write_out(result, Path(args.out_dir), args.model, args.train_config, args.top)
        if not args.json:
            print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


def _header(result: PlanResult) -> dict[str, object]:
    req = result.request
    cost = model_cost(req.model)
    return {
        "model": req.model.name,
        "params": cost.params_total,
        "gmacs_per_sample": round(cost.gmacs, 2),
        "gpus": req.cluster.gpus,
        "gpu": req.cluster.device.name,
        "gpus_per_node": req.cluster.node_size,
        "global_batch_requested": req.global_batch,
        "precision": req.precision,
        "schedule": req.schedule,
        "usable_gib": round(req.usable_bytes / GIB, 2),
        "efficiency": asdict(req.efficiency),
        "evaluated": result.tried,
        "feasible": len(result.feasible),
    }


def _as_json(result: PlanResult, top: int) -> dict[str, object]:
    out = _header(result)
    out["plans"] = [c.row() for c in result.feasible[:top]]
    best = result.best
    out["best_memory_per_stage"] = [m.as_dict() for m in best.memory]
    out["best_step"] = best.time.as_dict() if best.time else None
    out["deepspeed_config"] = plan_ds_config(best.par)
    out["launch"] = shlex.join(launch_argv(best.par, result.request.cluster.node_size))
    return out


def _print_table(result: PlanResult, top: int, batch_text: str) -> None:
    h = _header(result)
    req = result.request
    nodes = -(-req.cluster.gpus // req.cluster.node_size)
    eff = req.efficiency
    print(
        f"{h['model']}: {h['params'] / 1e6:.1f}M params, {h['gmacs_per_sample']} GMACs/sample "
        f"on {req.cluster.gpus} x {req.cluster.device.name} ({nodes} node(s) of "
        f"{req.cluster.node_size})"
    )
    print(
        f"global batch {req.global_batch} (from '{batch_text}'), {req.precision}, schedule "
        f"{req.schedule}, planning for {h['usable_gib']} GiB per GPU"
    )
    print(
        f"efficiency: matmul {eff.matmul:.3f}, memory {eff.memory:.3f} "
        f"(see `megaclip plan --calibrate`); {result.tried} layouts evaluated, "
        f"{len(result.feasible)} fit"
    )
    cols = (
        f"{'#':>3} {'tp':>2} {'pp':>3} {'dp':>5} {'zero':>4} {'micro':>5} {'accum':>5} "
        f"{'ckpt':>4} {'sched':>5} {'gbatch':>7} {'mem GiB':>7} {'step s':>7} {'samples/s':>9} "
        f"{'/GPU':>7} {'MFU':>6} {'bubble':>6} {'comm s':>6}"
    )
    print(cols)
    for i, c in enumerate(result.feasible[:top], 1):
        p, t = c.par, c.time
        assert t is not None
        comm = t.tp_s + t.pp_s + t.loss_s + t.dp_exposed_s
        print(
            f"{i:>3} {p.tp:>2} {p.pp:>3} {p.dp:>5} {p.zero_stage:>4} {p.micro_batch_size:>5} "
            f"{p.grad_accum_steps:>5} {'on' if p.activation_checkpointing else 'off':>4} "
            f"{SCHEDULE_SHORT[p.schedule]:>5} {p.global_batch_size:>7} "
            f"{c.peak_bytes / GIB:>7.1f} {t.total_s:>7.2f} "
            f"{t.samples_per_s:>9.0f} {t.samples_per_s_per_gpu:>7.2f} {t.mfu:>6.1%} "
            f"{t.bubble_fraction:>6.1%} {comm:>6.2f}"
        )
    best = result.best
    assert best.time is not None
    t = best.time
    print(
        f"best: compute {t.compute_s:.2f} s + TP {t.tp_s:.2f} + PP {t.pp_s:.2f} + bubble "
        f"{t.bubble_s:.2f} + loss {t.loss_s:.2f} + DP exposed {t.dp_exposed_s:.2f} + optimizer "
        f"{t.optimizer_s:.2f} = {t.total_s:.2f} s/step"
    )
    print("launch: " + shlex.join(launch_argv(best.par, req.cluster.node_size)))


SCHEDULE_SHORT = {"keep": "keep", "recompute": "recmp", "auto": "auto"}


def _nodes(par: ParallelConfig, node_size: int) -> tuple[int, int]:
    """(nodes, processes per node) of a layout on nodes of ``node_size`` GPUs."""
    return max(1, math.ceil(par.world_size / node_size)), min(par.world_size, node_size)


def launch_argv(
    par: ParallelConfig,
    node_size: int,
    config: str = "run.yaml",
    ds_config: str = "ds_config.json",
    hostfile: str = "hostfile",
) -> list[str]:
    """The command that trains layout ``par``: ``python -m megaclip.cli.launch`` (the one
    launch-command builder, megaclip.launch.plan) for the deepspeed launcher over a hostfile;
    the layout itself is in ``config`` (run.yaml), parallel.dp is derived again at launch."""
    nodes, per_node = _nodes(par, node_size)
    return [
        "python", "-m", "megaclip.cli.launch", "--launcher", "deepspeed",
        "--hostfile", hostfile, "--num-nodes", str(nodes), "--gpus-per-node", str(per_node),
        "--config", config, "--ds-config", ds_config,
    ]  # fmt: skip


def run_overlay(
    par: ParallelConfig, model: str, model_cfg: Any, train_config: str | None
) -> dict[str, Any]:
    """run.yaml: ``train_config`` (if any) with the plan's ``model`` and ``parallel`` sections.

    A preset name stays a name; a model file is written out as its mapping (no path to go
    stale). Its ``deepspeed`` key is dropped: launch.sh passes the plan's ds_config.json.
    """
    data = load_mapping(train_config) if train_config else {}
    data.pop("deepspeed", None)
    data["model"] = to_dict(model_cfg) if model.endswith((".yaml", ".yml", ".json")) else model
    data["parallel"] = to_dict(par)
    return data


_LAUNCH_SH = """#!/usr/bin/env bash
# written by `megaclip plan` for {what}
# Trains it: the layout is in run.yaml, the DeepSpeed config in ds_config.json (both beside this
# file); arguments go to `megaclip train` (key=value overrides, e.g. train.steps=100).
#   bash launch.sh                    the deepspeed launcher over $HOSTFILE ({hostfile_default})
#   LAUNCHER=torchrun bash launch.sh  one torchrun agent per node (NODE_RANK, MASTER_ADDR)
#   DRY_RUN=1 bash launch.sh          print the launch plan, run nothing
# Also MASTER_PORT, PYTHON, DEEPSPEED / TORCHRUN (the launcher program), as in launch/*.sh.
set -euo pipefail
HERE="$(cd "$(dirname "${{BASH_SOURCE[0]}}")" && pwd)"
PYTHON="${{PYTHON:-python}}"
case "${{LAUNCHER:-deepspeed}}" in
    deepspeed)
        if [[ -z "${{DEEPSPEED:-}}" ]]; then
            if command -v deepspeed >/dev/null 2>&1; then DEEPSPEED=deepspeed
            else DEEPSPEED="$PYTHON -m deepspeed.launcher.runner"; fi
        fi
        opts=(--launcher deepspeed --hostfile "${{HOSTFILE:-{hostfile}}}" --num-nodes {nodes}
              --gpus-per-node {per_node} --launcher-cmd "$DEEPSPEED")
        [[ -z "${{MASTER_ADDR:-}}" ]] || opts+=(--master-addr "$MASTER_ADDR") ;;
    torchrun)
        if [[ -z "${{TORCHRUN:-}}" ]]; then
            if command -v torchrun >/dev/null 2>&1; then TORCHRUN=torchrun
            else TORCHRUN="$PYTHON -m torch.distributed.run"; fi
        fi
        opts=(--launcher torchrun --nnodes {nodes} --nproc-per-node {per_node}
              --node-rank "${{NODE_RANK:-0}}" --master-addr "${{MASTER_ADDR:-127.0.0.1}}"
              --launcher-cmd "$TORCHRUN") ;;
    *) echo "launch.sh: LAUNCHER must be deepspeed or torchrun, got '$LAUNCHER'" >&2; exit 2 ;;
esac
case "${{DRY_RUN:-0}}" in 0 | "" | false | no) ;; *) opts+=(--dry-run) ;; esac
exec "$PYTHON" -m megaclip.cli.launch "${{opts[@]}}" --master-port "${{MASTER_PORT:-29500}}" \
    --python "$PYTHON" --config "$HERE/run.yaml" --ds-config "$HERE/ds_config.json" -- "$@"
"""


def _write_out(
    result: PlanResult, out: Path, model: str, train_config: str | None, top: int
) -> list[Path]:
    """The best layout as files `megaclip train` runs as written (docs/planner.md)."""
    out.mkdir(parents=True, exist_ok=True)
    best, req = result.best, result.request
    ds_path = out / "ds_config.json"
    ds_path.write_text(json.dumps(plan_ds_config(best.par), indent=2) + "\n")
    run_path = out / "run.yaml"
    overlay = yaml.safe_dump(run_overlay(best.par, model, req.model, train_config), sort_keys=False)
    source = f" over {train_config}" if train_config else ""
    run_path.write_text(
        f"# written by `megaclip plan`{source}: the planned model and layout\n"
        "# megaclip train --config run.yaml --deepspeed ds_config.json (or bash launch.sh)\n"
        + overlay
    )
    nodes, per_node = _nodes(best.par, req.cluster.node_size)
    written = [ds_path, run_path]
    hostfile = "hostfile"
    if nodes == 1:  # one node: a hostfile for this machine, so launch.sh runs as written
        host_path = out / "hostfile"
        host_path.write_text(f"localhost slots={per_node}\n")
        hostfile = "$HERE/hostfile"
        written.append(host_path)
    hostfile_default = "the hostfile beside this file" if nodes == 1 else "./hostfile"
    p = best.par
    what = (
        f"{req.model.name} on {req.cluster.gpus} x {req.cluster.device.name}: tp {p.tp} x pp "
        f"{p.pp} x dp {p.dp}, ZeRO-{p.zero_stage}, micro-batch {p.micro_batch_size} x accum "
        f"{p.grad_accum_steps}, {p.precision}, schedule {p.schedule}"
    )
    launch = out / "launch.sh"
    launch.write_text(
        _LAUNCH_SH.format(
            what=what,
            hostfile=hostfile,
            hostfile_default=hostfile_default,
            nodes=nodes,
            per_node=per_node,
        )
    )
    os.chmod(launch, 0o755)
    plan_path = out / "plan.json"
    plan_path.write_text(json.dumps(_as_json(result, top), indent=2) + "\n")
    return [*written, launch, plan_path]


def _run_memory(run_dir: str, as_json: bool) -> int:
    from megaclip.train.memory_report import run_memory_report

    report = run_memory_report(run_dir)
    if as_json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['model']} in {report['run']} ({report['measure']}, GiB per rank)")
    phases = list(report["ranks"][0]["phases"])
    print(f"{'rank':>4} " + " ".join(f"{p:>9}" for p in phases) + "  measured predicted ratio")
    for r in report["ranks"]:
        cells = " ".join(f"{r['phases'].get(p, float('nan')):>9.2f}" for p in phases)
        print(
            f"{r['rank']:>4} {cells}  {r['measured_gib']:>8.2f} {r['predicted_gib']:>9.2f} "
            f"{r['ratio']:>5.2f}"
        )
    parts = report["ranks"][0]["predicted_parts_gib"]
    print(
        "predicted, rank 0: "
        + ", ".join(f"{k.removesuffix('_gib')} {v:.2f}" for k, v in parts.items())
    )
    return 0


def _calibrate(as_json: bool) -> int:
    refit = fit()
    rows = []
    for r in RUNS:
        pred = predict(r, CALIBRATED)
        pub_mfu = pred.mfu * r.samples_per_s_per_gpu / pred.samples_per_s_per_gpu
        rows.append(
            {
                "run": r.name,
                "model": r.model,
                "gpus": r.gpus,
                "gpu": r.device,
                "global_batch": r.global_batch,
                "published_samples_per_s_per_gpu": round(r.samples_per_s_per_gpu, 2),
                "predicted_samples_per_s_per_gpu": round(pred.samples_per_s_per_gpu, 2),
                "error": round(pred.samples_per_s_per_gpu / r.samples_per_s_per_gpu - 1, 4),
                "published_mfu": round(pub_mfu, 4),
                "predicted_mfu": round(pred.mfu, 4),
                "source": r.source,
            }
        )
    ratio = cross_check_ratio(CALIBRATED)
    summary = {
        "runs": rows,
        "calibrated": {"matmul": CALIBRATED.matmul, "memory": CALIBRATED.memory},
        "refit": {"matmul": round(refit.matmul, 4), "memory": round(refit.memory, 4)},
        "band": BAND,
        "cross_check": {
            "what": f"{CROSS_CHECK.model} samples/s on {CROSS_CHECK.gpus} H100 / A100-80GB",
            "published": round(CROSS_CHECK.ratio, 3),
            "predicted": round(ratio, 3),
            "source": CROSS_CHECK.source,
        },
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return 0
    print("step-time model vs published runs (fitted: two runs, two constants)")
    print(
        f"{'run':<32} {'model':<9} {'GPUs':>5} {'gpu':<10} {'batch':>7} {'published':>9} "
        f"{'predicted':>9} {'error':>7} {'MFU pub':>7} {'MFU pred':>8}"
    )
    for row in rows:
        print(
            f"{row['run']:<32} {row['model']:<9} {row['gpus']:>5} {row['gpu']:<10} "
            f"{row['global_batch']:>7} {row['published_samples_per_s_per_gpu']:>9.2f} "
            f"{row['predicted_samples_per_s_per_gpu']:>9.2f} {row['error']:>+7.1%} "
            f"{row['published_mfu']:>7.1%} {row['predicted_mfu']:>8.1%}"
        )
    print("(samples/s per GPU; MFU = samples/s/GPU x 6 x MACs / dense bf16 peak)")
    print(
        f"constants: matmul {CALIBRATED.matmul}, memory {CALIBRATED.memory} "
        f"(a refit now gives {refit.matmul:.4f}, {refit.memory:.4f}); band +-{BAND:.0%}"
    )
    cc = summary["cross_check"]
    print(
        f"cross-check, not fitted: {cc['what']}: published {cc['published']:.2f}, "
        f"model {cc['predicted']:.2f} ({cc['predicted'] / cc['published'] - 1:+.0%})"
    )
    return 0
