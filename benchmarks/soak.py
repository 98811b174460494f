"""Soak test of `megaclip train`: random SIGKILLs of the whole job, restarts, exact-resume checks.

Trains a small CLIP (``--data photos``, the default: the demo model on real JPEG photos,
megaclip.data.photos, decoded by ``--workers`` DataLoader workers per rank; ``--data synthetic``:
the tiny model on synthetic batches) with ``--nproc`` processes (torchrun) for ``--minutes`` of
wall time, saving every ``--save-every`` steps. The job (launcher and ranks: one process group)
is SIGKILLed at random moments (every ``--kill-min``..``--kill-max`` seconds) and started again;
each start resumes from the last complete checkpoint. At the end it reports:

- steps done, restarts survived (every restart must resume and train on), steps redone (work
  lost to kills since the previous checkpoint) and kills that interrupted a save;
- samples lost / duplicated (photos): every rank traces the sample keys of each micro-batch
  (MEGACLIP_DATA_TRACE); the *effective* history (each restart replaces the micro-batches after
  the checkpoint it resumed from) is compared, as a multiset of sample keys and batch by batch,
  with the uninterrupted reference run's trace; every traced batch (also those of steps that a
  kill made redo) must equal the reference's. Synthetic data: the per-step
  ``data_fingerprint`` of rank 0's first micro-batch against the stream regenerated offline;
- the resume time of each restart: from its launch to its first new step's record;
- loss agreement with an uninterrupted run of the same number of steps (``--reference``);
- memory: the ranks' total RSS sampled each second (OUT/rss.jsonl); growth per hour from a
  least-squares fit of RSS against time with one intercept per segment, skipping the first
  ``--warmup-s`` seconds of each start (start-up, the first steps and the allocator settle for
  ~30 s; shorter windows extrapolate that settling, not a leak), for the killed segments and
  for the uninterrupted reference run (the meaningful figure: it runs as many steps as the
  soak did, in one piece).

The uninterrupted reference run (``--reference``, on by default) runs at the same time as the soak
(same settings, never killed) and is stopped once it has done as many steps as the soak: the
figures compare step by step, so sharing the CPU does not matter.

    PYTHONPATH=. python benchmarks/soak.py --minutes 3 --kill-min 20 --kill-max 40
    PYTHONPATH=. python benchmarks/soak.py --minutes 60 --out runs/soak1h

Results: OUT/soak_summary.json (and the run in OUT/run, the reference in OUT/reference).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from megaclip.train.host import children_of, pid_alive, process_table, status_kib  # noqa: E402


def train_overrides(args: argparse.Namespace, out_dir: Path) -> list[str]:
    """The `megaclip train` key=value settings of the soak run (and of its reference)."""
    if args.data == "photos":
        data = [
            "data.kind=webdataset",
            f"data.train={args.spec}",
            f"data.mode={args.mode}",
            f"data.workers={args.workers}",
            f"data.shuffle_buffer={args.shuffle_buffer}",
            f"model={args.model or 'demo'}",
        ]
    else:
        data = ["data.kind=synthetic", f"model={args.model or 'tiny'}"]
    return [
        *data,
        "zeroshot.data=",
        "deepspeed=null",
        f"parallel.dp={args.nproc}",
        f"parallel.micro_batch_size={args.micro_batch_size}",
        f"parallel.grad_accum_steps={args.grad_accum}",
        f"train.steps={args.total_steps}",
        "train.log_every=1",
        f"train.save_every={args.save_every}",
        "train.keep_last=2",
        "train.tensorboard=false",
        f"train.dist_timeout_s={args.dist_timeout_s}",
        f"train.seed={args.seed}",
        f"train.out_dir={out_dir}",
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    args: argparse.Namespace, overrides: list[str], log: Path, trace: Path | None = None
) -> subprocess.Popen:
    """Start torchrun + ranks in a new session (process group id = the launcher's pid)."""
    env = dict(os.environ)
    if trace is not None:
        env["MEGACLIP_DATA_TRACE"] = str(trace)
    env.update(
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR=env.get("DS_ACCELERATOR", "cpu"),
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
        PYTHONUNBUFFERED="1",
    )
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={args.nproc}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "megaclip",
        "train",
        *overrides,
    ]
    out = open(log, "w")  # noqa: SIM115 - the child keeps it; closed when the file is dropped
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def rank_pids(launcher: int) -> list[int]:
    """The `megaclip train` ranks torchrun ``launcher`` started (its children)."""
    return [
        pid
        for pid, (ppid, argv) in process_table().items()
        if ppid == launcher and b"megaclip" in argv
    ]


def rss_mib(pid: int) -> float | None:
    """Resident memory of ``pid`` in MiB (None if it is gone)."""
    kib = status_kib("VmRSS", pid)
    return None if kib is None else kib / 1024


@dataclass
class Segment:
    """One start of the job: how it ended and what it logged."""

    index: int
    started: float
    seconds: float = 0.0
    killed: bool = False
    rc: int | None = None
    resumed_from: int = 0
    log: str = ""
    rss: list[tuple[float, float]] = field(default_factory=list)  # (seconds in, total MiB)
    orphans: int = 0  # ranks still alive 15 s after their launcher was SIGKILLed
    interrupted_save: bool = False
    logged: int = 0
    consistent: bool = True
    resume_s: float | None = None  # launch to the first new step's record


def read_records(metrics: Path, start: int) -> tuple[list[dict], int]:
    """Records of metrics.jsonl from byte ``start`` on, and the new end offset."""
    if not metrics.is_file():
        return [], start
    with open(metrics, "rb") as f:
        f.seek(start)
        data = f.read()
    end = start + data.rfind(b"\n") + 1 if b"\n" in data else start
    rows = []
    for line in data[: end - start].splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by the kill
            continue
    return rows, end


def resumed_step(log_text: str) -> int:
    """The step a segment resumed from ("resumed from ... at step M"), 0 for a fresh start."""
    for line in log_text.splitlines():
        if line.startswith("resumed from ") and " at step " in line:
            return int(line.rsplit(" at step ", 1)[1].split()[0])
    return 0


def expected_fingerprints(args: argparse.Namespace, steps: int) -> list[str]:
    """Fingerprints of steps 1..steps of an uninterrupted run (rank 0's stream, offline)."""
    from megaclip.config.train import load_run_config
    from megaclip.data.stream import batch_fingerprint
    from megaclip.parallel.topology import Topology
    from megaclip.train.loop import micro_batch_stream

    cfg = load_run_config(None, train_overrides(args, Path("unused")))
    rank0 = SimpleNamespace(coords=SimpleNamespace(dp=0, tp=0, pp=0))
    rank0.data_seed = lambda seed: Topology.data_seed(rank0, seed)
    stream = micro_batch_stream(cfg, rank0, None)
    out = []
    for _ in range(steps):
        batches = [next(stream) for _ in range(args.grad_accum)]
        out.append(batch_fingerprint(batches[0]))
    return out


def fit_growth(segments: list[Segment], warmup_s: float) -> float | None:
    """MiB per hour: least squares of RSS on time with one intercept per segment."""
    num = den = 0.0
    for seg in segments:
        pts = [(t, r) for t, r in seg.rss if t >= warmup_s]
        if len(pts) < 3:
            continue
        mt = sum(t for t, _ in pts) / len(pts)
        mr = sum(r for _, r in pts) / len(pts)
        num += sum((t - mt) * (r - mr) for t, r in pts)
        den += sum((t - mt) ** 2 for t, _ in pts)
    return num / den * 3600 if den > 0 else None


def run_soak(args: argparse.Namespace) -> dict:
    """The soak itself; returns the summary."""
    out = Path(args.out)
    run_dir = out / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.minutes * 60
    overrides = train_overrides(args, run_dir)
    metrics = run_dir / "metrics.jsonl"
    trace = out / "trace-run" if args.data == "photos" else None
    if trace is not None and trace.exists():
        shutil.rmtree(trace)
    reference = start_reference(args, out) if args.reference and args.data == "photos" else None
    offset = 0
    history: list[dict] = []  # effective history: one record per step, replaced on resume
    segments: list[Segment] = []
    failures: list[str] = []
    steps_logged = 0
    while time.monotonic() < deadline:
        seg = Segment(len(segments), time.monotonic())
        log = out / "logs" / f"segment{seg.index:03d}.log"
        proc = launch(args, overrides, log, trace)
        kill_at = min(deadline, time.monotonic() + rng.uniform(args.kill_min, args.kill_max))
        first_step: list[float] = []
        ranks = watch(
            proc, args.nproc, kill_at, seg.started, seg.rss, (metrics, offset, first_step)
        )
        seg.resume_s = first_step[0] if first_step else None
        if proc.poll() is None:
            ranks = ranks if len(ranks) == args.nproc else rank_pids(proc.pid)
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher's group: not the ranks' sessions
            seg.killed = True
        proc.wait()
        seg.orphans = reap_orphans(ranks)
        seg.rc = proc.returncode
        seg.seconds = time.monotonic() - seg.started
        seg.log = log.read_text(errors="replace")
        seg.resumed_from = resumed_step(seg.log)
        ckpt = run_dir / "checkpoints"
        seg.interrupted_save = ckpt.is_dir() and any(
            p.name.startswith("tmp-") for p in ckpt.iterdir()
        )
        rows, offset = read_records(metrics, offset)
        rows = [r for r in rows if "loss" in r]
        steps_logged += len(rows)
        seg.logged = len(rows)
        if rows:
            first = rows[0]["step"]
            if first != seg.resumed_from + 1 or seg.resumed_from > len(history):
                seg.consistent = False
                failures.append(
                    f"segment {seg.index}: resumed from step {seg.resumed_from} but logged "
                    f"step {first} first"
                )
            del history[seg.resumed_from :]
            history.extend(rows)
        if not seg.killed and seg.rc != 0:
            failures.append(f"segment {seg.index} failed (rc={seg.rc}); see {log}")
            segments.append(seg)
            break
        segments.append(seg)
        print(
            f"segment {seg.index:>3}: {seg.seconds:5.1f} s, resumed at step {seg.resumed_from:>5},"
            f" logged {len(rows):>5} steps, {'killed' if seg.killed else f'rc={seg.rc}'}"
            f"{' during a save' if seg.interrupted_save else ''}",
            flush=True,
        )

    steps = len(history)
    if args.data == "photos":
        return finish_photos(args, out, segments, history, failures, steps_logged, reference)
    got = [r["data_fingerprint"] for r in history]
    want = expected_fingerprints(args, steps)
    position_ok = [r["step"] for r in history] == list(range(1, steps + 1))
    index = {fp: i for i, fp in enumerate(want)}
    seen_count: dict[str, int] = {}
    for fp in got:
        seen_count[fp] = seen_count.get(fp, 0) + 1
    duplicated = sum(c - 1 for c in seen_count.values() if c > 1)
    lost = sum(1 for fp in want if fp not in seen_count)
    misplaced = sum(1 for i, fp in enumerate(got) if index.get(fp) != i)
    samples_per_step = args.micro_batch_size * args.grad_accum * args.nproc
    restarts = max(0, len(segments) - 1)
    # a restart survived: the job came back, resumed where the checkpoint said and trained on
    survived = sum(1 for s in segments[1:] if s.logged > 0 and s.consistent)
    summary = {
        "minutes": args.minutes,
        "nproc": args.nproc,
        "model": args.model,
        "save_every": args.save_every,
        "segments": len(segments),
        "kills": sum(s.killed for s in segments),
        "kills_during_save": sum(s.interrupted_save for s in segments),
        "orphaned_ranks_after_kill": sum(s.orphans for s in segments),
        "restarts": restarts,
        "restarts_survived": survived,
        "restarts_killed_before_training": sum(1 for s in segments[1:] if not s.logged),
        "restarts_from_step_0": sum(1 for s in segments[1:] if s.logged and not s.resumed_from),
        "steps_done": steps,
        "steps_logged_incl_redone": steps_logged,
        "steps_redone": steps_logged - steps,
        "batches_lost": lost,
        "batches_duplicated": duplicated,
        "batches_out_of_place": misplaced,
        "samples_lost": lost * samples_per_step,
        "samples_duplicated": duplicated * samples_per_step,
        "history_consecutive": position_ok,
        "failures": failures,
    }
    with open(out / "rss.jsonl", "w") as f:
        for seg in segments:
            f.write(json.dumps({"segment": seg.index, "rss": seg.rss}) + "\n")
    all_rss = [r for s in segments for _, r in s.rss]
    growth = fit_growth(segments, args.warmup_s)
    summary["rss_total_mib_max"] = max(all_rss) if all_rss else None
    # sum over the ranks; None when no segment outlived the warm-up
    summary["rss_growth_mib_per_hour_killed_segments"] = growth
    summary["rss_samples"] = len(all_rss)
    if reference is not None:  # synthetic data: the reference runs afterwards
        os.killpg(reference[0].pid, signal.SIGKILL)
        reference[0].wait()
    if args.reference and steps:
        summary.update(reference_check(args, history, out))
    return summary


def watch(
    proc: subprocess.Popen,
    nproc: int,
    until: float,
    t0: float,
    samples: list[tuple[float, float]],
    first_step: tuple[Path, int, list[float]] | None = None,
) -> list[int]:
    """Sample the ranks' total RSS each second until ``proc`` ends or ``until``; the rank pids.

    ``first_step`` = (metrics file, offset, out): appends to ``out`` the seconds from ``t0`` to
    the first step record written after ``offset``.
    """
    next_sample = time.monotonic()
    ranks: list[int] = []
    while proc.poll() is None and time.monotonic() < until:
        now = time.monotonic()
        if first_step is not None and not first_step[2] and first_step[0].is_file():
            rows, _ = read_records(first_step[0], first_step[1])
            if any("loss" in r for r in rows):
                first_step[2].append(now - t0)
        if now >= next_sample:
            if len(ranks) < nproc:
                ranks = rank_pids(proc.pid)
            rss = [rss_mib(pid) for pid in ranks]
            if len(ranks) == nproc and None not in rss:  # + the ranks' DataLoader workers
                workers = [rss_mib(pid) for pid in children_of(ranks)]
                samples.append((now - t0, sum(rss) + sum(w for w in workers if w is not None)))
            next_sample = now + 1.0
        time.sleep(0.05)
    return ranks


def reap_orphans(ranks: list[int], grace_s: float = 15.0) -> int:
    """How many of ``ranks`` outlived their launcher by ``grace_s``; those are SIGKILLed."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(pid_alive(pid) for pid in ranks):
        time.sleep(0.05)
    left = [pid for pid in ranks if pid_alive(pid)]
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(left)


def start_reference(args: argparse.Namespace, out: Path) -> tuple[subprocess.Popen, float, list]:
    """Start the uninterrupted reference run now; (process, start time, RSS samples)."""
    ref_dir = out / "reference"
    for d in (ref_dir, out / "trace-reference"):
        if d.exists():
            shutil.rmtree(d)
    trace = out / "trace-reference" if args.data == "photos" else None
    proc = launch(args, train_overrides(args, ref_dir), out / "logs" / "reference.log", trace)
    samples: list[tuple[float, float]] = []
    t0 = time.monotonic()
    thread = threading.Thread(
        target=watch, args=(proc, args.nproc, float("inf"), t0, samples), daemon=True
    )
    thread.start()
    return proc, t0, samples


def read_trace(d: Path, limit: int) -> tuple[dict[str, dict[int, list[str]]], dict[str, list]]:
    """Per rank file: {micro-batch: keys} (the last record of a batch wins, batches <= limit)
    and every record in order."""
    last: dict[str, dict[int, list[str]]] = {}
    every: dict[str, list] = {}
    for f in sorted(d.glob("rank*.jsonl")):
        rows = []
        for line in f.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by the kill
                continue
        every[f.name] = [(r["batch"], r["keys"]) for r in rows if r["batch"] <= limit]
        last[f.name] = dict(every[f.name])
    return last, every


def finish_photos(args, out, segments, history, failures, steps_logged, reference) -> dict:
    """The summary of a photos soak: sample keys and losses against the reference run."""
    steps = len(history)
    batches = steps * args.grad_accum
    summary: dict = {
        "minutes": args.minutes,
        "nproc": args.nproc,
        "model": args.model or "demo",
        "data": f"{args.samples} JPEG photos, {args.mode}, {args.workers} worker(s) per rank",
        "save_every": args.save_every,
        "segments": len(segments),
        "kills": sum(s.killed for s in segments),
        "kills_during_save": sum(s.interrupted_save for s in segments),
        "orphaned_ranks_after_kill": sum(s.orphans for s in segments),
        "restarts": max(0, len(segments) - 1),
        "restarts_survived": sum(1 for s in segments[1:] if s.logged > 0 and s.consistent),
        "restarts_killed_before_training": sum(1 for s in segments[1:] if not s.logged),
        "steps_done": steps,
        "steps_logged_incl_redone": steps_logged,
        "steps_redone": steps_logged - steps,
        "history_consecutive": [r["step"] for r in history] == list(range(1, steps + 1)),
        "resume_s_per_restart": [
            None if s.resume_s is None else round(s.resume_s, 1) for s in segments[1:]
        ],
    }
    times = [s.resume_s for s in segments[1:] if s.resume_s is not None]
    summary["resume_s_max"] = round(max(times), 1) if times else None
    ref_rows: dict[int, dict] = {}
    if reference is not None:
        proc, t0, samples = reference
        deadline = time.monotonic() + args.reference_wait_s
        ref_metrics = out / "reference" / "metrics.jsonl"
        while proc.poll() is None and time.monotonic() < deadline:
            rows, _ = read_records(ref_metrics, 0)
            if sum(1 for r in rows if "loss" in r) >= steps:
                break
            time.sleep(1.0)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rows, _ = read_records(ref_metrics, 0)
        ref_rows = {r["step"]: r for r in rows if "loss" in r}
        ref_segment = Segment(-1, t0, rss=samples)
        summary["reference_steps"] = len(ref_rows)
        summary["reference_rss_total_mib_max"] = max((r for _, r in samples), default=None)
        summary["reference_rss_growth_mib_per_hour"] = fit_growth([ref_segment], args.warmup_s)
        with open(out / "rss.jsonl", "a") as f:
            f.write(json.dumps({"segment": "reference", "rss": samples}) + "\n")
    compared = [r for r in history if r["step"] in ref_rows]
    worst = max((abs(r["loss"] - ref_rows[r["step"]]["loss"]) for r in compared), default=None)
    summary["steps_compared_with_reference"] = len(compared)
    summary["loss_max_abs_diff_vs_uninterrupted"] = worst
    summary["loss_steps_differing"] = sum(
        1 for r in compared if r["loss"] != ref_rows[r["step"]]["loss"]
    )
    upto = min(batches, len(compared) * args.grad_accum)
    got_last, got_every = read_trace(out / "trace-run", upto)
    ref_last, _ = read_trace(out / "trace-reference", upto)
    lost = duplicated = differing = 0
    for rank, ref in ref_last.items():
        mine = got_last.get(rank, {})
        want_keys = [k for b in sorted(ref) for k in ref[b]]
        got_keys = [k for b in sorted(mine) for k in mine[b]]
        have, need = Counter(got_keys), Counter(want_keys)
        lost += sum((need - have).values())
        duplicated += sum((have - need).values())
        differing += sum(1 for b, keys in got_every.get(rank, []) if ref.get(b) != keys)
    summary["micro_batches_compared_per_rank"] = upto
    summary["samples_compared"] = sum(len(k) for r in ref_last.values() for k in r.values())
    summary["samples_lost"] = lost
    summary["samples_duplicated"] = duplicated
    summary["trace_batches_differing"] = differing
    summary["failures"] = failures
    with open(out / "rss.jsonl", "w") as f:
        for seg in segments:
            f.write(json.dumps({"segment": seg.index, "rss": seg.rss}) + "\n")
    all_rss = [r for s in segments for _, r in s.rss]
    summary["rss_total_mib_max"] = max(all_rss) if all_rss else None
    summary["rss_growth_mib_per_hour_killed_segments"] = fit_growth(segments, args.warmup_s)
    return summary


def reference_check(args: argparse.Namespace, history: list[dict], out: Path) -> dict:
    """Run the same steps uninterrupted; compare losses and fingerprints step by step."""
    ref_dir = out / "reference"
    if ref_dir.exists():
        shutil.rmtree(ref_dir)
    steps = len(history)
    t0 = time.monotonic()
    proc = launch(
        args,
        [*train_overrides(args, ref_dir), f"train.exit_after={steps}"],
        out / "logs" / "reference.log",
    )
    samples: list[tuple[float, float]] = []
    watch(proc, args.nproc, float("inf"), t0, samples)
    proc.wait()
    rows = [
        json.loads(x) for x in (ref_dir / "metrics.jsonl").read_text().splitlines() if "loss" in x
    ]
    ref_segment = Segment(-1, t0, rss=samples)
    with open(out / "rss.jsonl", "a") as f:
        f.write(json.dumps({"segment": "reference", "rss": samples}) + "\n")
    ref = {r["step"]: r for r in rows}
    worst, mismatched, fp_mismatch = 0.0, 0, 0
    for r in history:
        a = ref.get(r["step"])
        if a is None:
            mismatched += 1
            continue
        rel = abs(a["loss"] - r["loss"]) / max(abs(a["loss"]), 1e-12)
        worst = max(worst, rel)
        mismatched += rel > 1e-6
        fp_mismatch += a["data_fingerprint"] != r["data_fingerprint"]
    return {
        "reference_rc": proc.returncode,
        "reference_seconds": time.monotonic() - t0,
        "reference_steps": len(ref),
        "reference_rss_total_mib_max": max((r for _, r in samples), default=None),
        "reference_rss_growth_mib_per_hour": fit_growth([ref_segment], args.warmup_s),
        "reference_rss_mib_after_warmup": next((r for t, r in samples if t >= args.warmup_s), None),
        "reference_rss_mib_end": samples[-1][1] if samples else None,
        "loss_max_rel_diff_vs_uninterrupted": worst,
        "loss_steps_differing_gt_1e-6": mismatched,
        "fingerprint_mismatches_vs_reference_run": fp_mismatch,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=3.0, help="wall time of the soak")
    p.add_argument("--out", default="runs/soak")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--data", choices=("photos", "synthetic"), default="photos")
    p.add_argument("--samples", type=int, default=2000, help="photos in the dataset")
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers per rank")
    p.add_argument("--mode", choices=("resampled", "epoch"), default="resampled")
    p.add_argument("--shuffle-buffer", type=int, default=64)
    p.add_argument("--model", default=None, help="default: demo (photos), tiny (synthetic)")
    p.add_argument("--micro-batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--save-every", type=int, default=20)
    p.add_argument("--total-steps", type=int, default=1_000_000, help="train.steps (LR schedule)")
    p.add_argument("--kill-min", type=float, default=150.0, help="seconds to the next kill, min")
    p.add_argument("--kill-max", type=float, default=210.0, help="seconds to the next kill, max")
    p.add_argument("--dist-timeout-s", type=float, default=60.0)
    p.add_argument("--warmup-s", type=float, default=30.0, help="RSS samples ignored per start")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-reference", dest="reference", action="store_false")
    p.add_argument(
        "--reference-wait-s",
        type=float,
        default=1800.0,
        help="how long to wait for the reference to catch up after the soak",
    )
    args = p.parse_args(argv)
    args.spec = None
    if args.data == "photos":
        from megaclip.data.photos import make_photo_shards

        args.spec = make_photo_shards(str(Path(args.out) / "photos"), args.samples, 8, seed=0)
    summary = run_soak(args)
    path = Path(args.out) / "soak_summary.json"
    path.write_text(json.dumps(summary, indent=2) + "\n")
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")
    print(f"summary: {path}")
    ok = (
        not summary["failures"]
        and summary["orphaned_ranks_after_kill"] == 0
        and summary.get("batches_lost", 0) == 0
        and summary.get("batches_duplicated", 0) == 0
        and summary.get("batches_out_of_place", 0) == 0
        and summary.get("loss_steps_differing_gt_1e-6", 0) == 0
        and summary.get("samples_lost", 0) == 0
        and summary.get("samples_duplicated", 0) == 0
        and summary.get("trace_batches_differing", 0) == 0
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
