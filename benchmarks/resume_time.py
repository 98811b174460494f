"""Resume time of `megaclip train`: process start to the first new training step, after 10 and
after 5000 steps, on real JPEG photos (megaclip.data.photos).

    PYTHONPATH=. python benchmarks/resume_time.py [--steps 10,5000] [--repeats 3] [--out DIR]

One process, the demo model, micro-batch 2, resampled data with shuffle windows of 256 samples,
no DataLoader workers. For each step count S a run trains S steps and stops with a checkpoint
(``train.exit_after=S``); then, ``--repeats`` times (alternating between the step counts), a copy
of that run is resumed for one more step, timing from the process start until the new step's
record appears in metrics.jsonl. A resume that replayed the data stream would grow with S; the
seek to the checkpointed data position does not. Prints one JSON line with
``resume_s_step_<S>`` for each S (the best of the repeats: on a shared machine the others
measure the scheduler; medians and every time are printed too) and ``ratio`` (last / first).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def overrides(spec: str, out: Path) -> list[str]:
    """The run settings (identical for the long run and the resumes)."""
    return [
        "model=demo",
        "data.kind=webdataset",
        f"data.train={spec}",
        "data.mode=resampled",
        "data.workers=0",
        "data.shuffle_buffer=256",
        "zeroshot.data=",
        "deepspeed=null",
        "parallel.dp=1",
        "parallel.micro_batch_size=2",
        "train.steps=1000000",
        "train.log_every=1",
        "train.save_every=0",
        "train.tensorboard=false",
        f"train.out_dir={out}",
    ]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


def train(args: list[str], log: Path) -> None:
    """Run `megaclip train` to completion; raise with its log on failure."""
    with open(log, "w") as f:
        rc = subprocess.run(
            [sys.executable, "-m", "megaclip", "train", *args],
            cwd=REPO,
            env=_env(),
            stdout=f,
            stderr=subprocess.STDOUT,
        ).returncode
    if rc != 0:
        raise SystemExit(f"megaclip train failed (rc={rc}); see {log}")


def time_resume(saved: Path, spec: str, step: int, work: Path, log: Path) -> float:
    """Seconds from starting a resume of ``saved`` (at ``step``) to its first new step record."""
    run = work / "resume"
    if run.exists():
        shutil.rmtree(run)
    shutil.copytree(saved, run)
    metrics = run / "metrics.jsonl"
    start_size = metrics.stat().st_size
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "megaclip",
                "train",
                *overrides(spec, run),
                "train.exit_after=1",
            ],
            cwd=REPO,
            env=_env(),
            stdout=f,
            stderr=subprocess.STDOUT,
        )
        seconds = None
        while seconds is None:
            with open(metrics, "rb") as m:
                m.seek(start_size)
                new = m.read()
            for line in new.splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("step") == step + 1:
                    seconds = time.perf_counter() - t0
            if seconds is None:
                if proc.poll() is not None:
                    raise SystemExit(f"the resume exited (rc={proc.returncode}); see {log}")
                time.sleep(0.02)
        proc.wait()
    if "resumed from" not in log.read_text() or "replaying" in log.read_text():
        raise SystemExit(f"the run did not resume from its data position; see {log}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", default="10,5000")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--samples", type=int, default=1200)
    p.add_argument("--out", default=None, help="work directory (default: a temporary one)")
    p.add_argument("--reuse", action="store_true", help="keep runs trained before in --out")
    args = p.parse_args(argv)
    from megaclip.data.photos import make_photo_shards

    steps = [int(s) for s in args.steps.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.out or tmp)
        work.mkdir(parents=True, exist_ok=True)
        photos = work / "photos"
        if args.reuse and photos.is_dir():
            spec = str(photos / "photo-{000000..000003}.tar")
        else:
            spec = make_photo_shards(str(photos), args.samples, 4, seed=0)
        saved = {}
        for s in steps:
            t0 = time.perf_counter()
            saved[s] = work / f"trained-{s}"
            if args.reuse and (saved[s] / "checkpoints" / "latest").is_file():
                continue
            if saved[s].exists():
                shutil.rmtree(saved[s])
            train([*overrides(spec, saved[s]), f"train.exit_after={s}"], work / f"train-{s}.log")
            print(f"trained {s} steps in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        times: dict[int, list[float]] = {s: [] for s in steps}
        for r in range(args.repeats):
            for s in steps if r % 2 == 0 else steps[::-1]:
                sec = time_resume(saved[s], spec, s, work, work / f"resume-{s}-{r}.log")
                times[s].append(sec)
                print(f"resume at step {s}: {sec:.2f} s", file=sys.stderr, flush=True)
    best = {s: min(v) for s, v in times.items()}
    med = {s: statistics.median(v) for s, v in times.items()}
    out: dict = {f"resume_s_step_{s}": round(best[s], 2) for s in steps}
    out["ratio"] = round(best[steps[-1]] / best[steps[0]], 3)
    out["median_s"] = {str(s): round(med[s], 2) for s in steps}
    out["median_ratio"] = round(med[steps[-1]] / med[steps[0]], 3)
    out["repeats"] = args.repeats
    out["all_s"] = {str(s): [round(x, 2) for x in v] for s, v in times.items()}
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
