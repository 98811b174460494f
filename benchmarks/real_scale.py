"""Real model sizes on this machine: train, save, resume, convert, strict-load; memory vs plan.

Trains a real preset (ViT-L-14, ViT-H-14, ...) for a few steps on synthetic data with
`megaclip train` under torchrun, in one layout, then

1. resumes the run for one more step (a second launch),
2. converts the checkpoint with `megaclip convert` (streaming) and measures its peak RSS,
3. strict-loads the converted file into open_clip's model of the same name (another process).

Memory per rank is what each rank records of itself (megaclip.train.memlog: VmHWM per phase on
CPU, ``max_memory_allocated`` on GPU), cross-checked by sampling every rank's VmRSS from /proc
every 0.2 s. The prediction is the planner's (megaclip.perf.memory.rank_peaks) for the same
layout and budget. Prints one JSON line:

    model, layout, steps_ok, resume_ok, peak_gib_per_rank, planned_gib_per_rank, ratio_max,
    convert_peak_gib, export_gib, open_clip_strict_load (+ per-phase peaks, timings)

Run it alone on the machine (it uses most of the memory):

    python benchmarks/real_scale.py --model ViT-L-14 --layout dp2-zero3
    python benchmarks/real_scale.py --model ViT-H-14 --layout dp2-zero3 --recompute
    python benchmarks/real_scale.py --model ViT-L-14 --layout pp2-zero1
    python benchmarks/real_scale.py --model ViT-L-14 --layout tp2-zero0
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GIB = 2**30


def parse_layout(text: str) -> dict[str, int]:
    """'dp2-zero3', 'pp2-zero1', 'tp2', 'tp2xpp2-zero1' -> {tp, pp, dp, zero}."""
    out = {"tp": 1, "pp": 1, "dp": 1, "zero": 0}
    for part in re.split(r"[-x]", text.lower()):
        m = re.fullmatch(r"(tp|pp|dp|zero)(\d+)", part)
        if m is None:
            raise SystemExit(f"bad --layout {text!r}: use e.g. dp2-zero3, pp2-zero1, tp2-zero0")
        out[m.group(1)] = int(m.group(2))
    return out


class RssSampler:
    """Max VmRSS of every descendant process of ``root`` (sampled), keyed by its RANK."""

    def __init__(self, root: int, period: float = 0.2) -> None:
        self.root, self.period = root, period
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _children(self, pid: int) -> list[int]:
        try:
            text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        except OSError:
            return []
        kids = [int(x) for x in text.split()]
        return kids + [g for k in kids for g in self._children(k)]

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in [self.root, *self._children(self.root)]:
                try:
                    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                rank = next((e[5:].decode() for e in env if e.startswith(b"RANK=")), None)
                m = re.search(r"VmRSS:\s+(\d+) kB", status)
                if rank is not None and m:
                    key = f"rank{rank}"
                    self.peaks[key] = max(self.peaks.get(key, 0), int(m.group(1)) * 1024)
            self._stop.wait(self.period)

    def stop(self) -> dict[str, int]:
        self._stop.set()
        self._thread.join()
        return self.peaks


def train(
    args, layout: dict[str, int], out: Path, steps: int, log: Path
) -> tuple[int, dict, float]:
    world = layout["tp"] * layout["pp"] * layout["dp"]
    overrides = [
        f"model={args.model}",
        "data.kind=synthetic",
        "deepspeed=null",
        f"parallel.tp={layout['tp']}",
        f"parallel.pp={layout['pp']}",
        f"parallel.dp={layout['dp']}",
        f"parallel.zero_stage={layout['zero']}",
        f"parallel.precision={args.precision}",
        f"parallel.micro_batch_size={args.micro_batch}",
        f"parallel.grad_accum_steps={args.accum}",
        f"parallel.activation_checkpointing={str(args.recompute).lower()}",
        f"train.steps={steps}",
        f"train.save_every={args.steps}",
        "train.log_every=1",
        "train.tensorboard=false",
        f"train.out_dir={out}",
        *args.set,
    ]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={world}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={29500 + os.getpid() % 1000}",
        "-m",
        "megaclip.cli.main",
        "train",
        *overrides,
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        sampler = RssSampler(proc.pid)
        rc = proc.wait()
    return rc, sampler.stop(), time.perf_counter() - t0


def timed(cmd: list[str], log: Path) -> tuple[int, float, float]:
    """(return code, peak RSS GiB by /usr/bin/time, seconds) of a command."""
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    with open(log, "w") as f:
        rc = subprocess.call(["/usr/bin/time", "-v", *cmd], cwd=REPO, env=env, stdout=f, stderr=f)
    text = log.read_text()
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return rc, (int(m.group(1)) * 1024 / GIB if m else float("nan")), time.perf_counter() - t0


STRICT_LOAD = """
import sys, torch, open_clip
from megaclip.checkpoint.openclip_io import OpenClipFile
from megaclip.checkpoint.openclip import to_open_clip
model = open_clip.create_model(sys.argv[1], pretrained=None)
with OpenClipFile(sys.argv[2]) as f:
    state = to_open_clip(f.state())
missing, unexpected = model.load_state_dict(state, strict=True)
print("strict load ok", len(state), "tensors")
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="ViT-L-14")
    p.add_argument("--layout", default="dp2-zero3")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--precision", default="bf16")
    p.add_argument("--recompute", action="store_true", help="activation checkpointing")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    p.add_argument("--out", default="runs/real_scale")
    p.add_argument("--set", nargs="*", default=[], help="extra train key=value settings")
    p.add_argument("--keep", action="store_true", help="keep the run directory")
    args = p.parse_args()

    from megaclip.config.model import resolve_model
    from megaclip.config.parallel import ParallelConfig
    from megaclip.perf.memory import rank_peaks
    from megaclip.train.ds_config import resolve_ds_config

    layout = parse_layout(args.layout)
    name = f"{args.model}-{args.layout}{'-ckpt' if args.recompute else ''}"
    out = (REPO / args.out / name).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    run = out / "run"
    cfg = resolve_model(args.model)
    par = ParallelConfig(
        tp=layout["tp"],
        pp=layout["pp"],
        dp=layout["dp"],
        zero_stage=layout["zero"],
        micro_batch_size=args.micro_batch,
        grad_accum_steps=args.accum,
        precision=args.precision,
        activation_checkpointing=args.recompute,
    )
    ds = resolve_ds_config({}, par, gradient_clipping=0.0)  # what `deepspeed=null` runs with
    planned = [r.peak / GIB for r in rank_peaks(cfg, par, host=True, ds=ds)]

    rc1, sampled1, t1 = train(args, layout, run, args.steps, out / "train.log")
    steps_ok = rc1 == 0
    mem1 = _memory(run)
    rc2, sampled2, t2 = (1, {}, 0.0)
    mem2: list[dict] = []
    if steps_ok:
        shutil.rmtree(run / "memory", ignore_errors=True)
        rc2, sampled2, t2 = train(args, layout, run, args.steps + 1, out / "resume.log")
        mem2 = _memory(run)
    resume_ok = rc2 == 0 and "resumed from" in (out / "resume.log").read_text()

    export = out / "model.safetensors"
    rc3, convert_peak, t3 = (1, float("nan"), 0.0)
    if steps_ok:
        cmd = [sys.executable, "-m", "megaclip.cli.main", "convert", str(run / "checkpoints")]
        rc3, convert_peak, t3 = timed(
            [*cmd, "--to", "open_clip", "--fp32-master", "--out", str(export)], out / "convert.log"
        )
    export_gib = export.stat().st_size / GIB if export.is_file() else float("nan")
    strict = False
    if rc3 == 0:
        with open(out / "strict_load.log", "w") as f:
            rc4 = subprocess.call(
                [sys.executable, "-c", STRICT_LOAD, args.model, str(export)],
                cwd=REPO,
                env=dict(os.environ, PYTHONPATH=str(REPO)),
                stdout=f,
                stderr=subprocess.STDOUT,
            )
        strict = rc4 == 0

    world = par.world_size
    peaks = [max(_rank_peak(mem1, r), _rank_peak(mem2, r)) for r in range(world)]
    sampled = [
        max(sampled1.get(f"rank{r}", 0), sampled2.get(f"rank{r}", 0)) / GIB for r in range(world)
    ]
    ratios = [m / p for m, p in zip(peaks, planned)] if all(peaks) else []
    result = {
        "model": args.model,
        "layout": args.layout + ("-ckpt" if args.recompute else ""),
        "precision": args.precision,
        "micro_batch": args.micro_batch,
        "steps_ok": steps_ok,
        "resume_ok": resume_ok,
        "peak_gib_per_rank": [round(x, 3) for x in peaks],
        "sampled_rss_gib_per_rank": [round(x, 3) for x in sampled],
        "planned_gib_per_rank": [round(x, 3) for x in planned],
        "ratio_max": round(max(ratios), 3) if ratios else None,
        "ratio_min": round(min(ratios), 3) if ratios else None,
        "rank0_over_others": round(peaks[0] / max(peaks[1:]), 3)
        if world > 1 and all(peaks)
        else None,
        "phase_peaks_gib": _phases(mem1, mem2),
        "convert_peak_gib": round(convert_peak, 3),
        "export_gib": round(export_gib, 3),
        "convert_over_export": round(convert_peak / export_gib, 3) if export_gib else None,
        "open_clip_strict_load": strict,
        "train_s": round(t1, 1),
        "resume_s": round(t2, 1),
        "convert_s": round(t3, 1),
    }
    print(json.dumps(result), flush=True)
    with open(REPO / args.out / "results.jsonl", "a") as f:
        f.write(json.dumps(result) + "\n")
    if not args.keep:
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
        export.unlink(missing_ok=True)
        (run / "final_open_clip.pt").unlink(missing_ok=True)


def _memory(run: Path) -> list[dict]:
    from megaclip.train.memlog import read_run_memory

    return read_run_memory(run)


def _rank_peak(records: list[dict], rank: int) -> float:
    for r in records:
        if r["rank"] == rank:
            return r["peak_gib"]
    return 0.0


def _phases(*runs: list[dict]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for records in runs:
        for r in records:
            for ph in r["phases"]:
                row = out.setdefault(ph["phase"], [0.0] * (max(x["rank"] for x in records) + 1))
                row[r["rank"]] = round(max(row[r["rank"]], ph["peak_gib"]), 3)
    return out


if __name__ == "__main__":
    main()
