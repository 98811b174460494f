"""Per-step time of each engine layout, and the measured pipeline bubble of PP = 2 vs (P-1)/(m+P-1).

    python benchmarks/layouts.py [--model PATH|NAME] [--global-batch 16] [--steps 4] [--json F]

Layouts are those of tests/test_engine_layouts.py (dp2 ZeRO-1/2/3, tp2, pp2, pp2xdp2, tp2xpp2,
tp2xpp2xdp2) plus a one-process reference, all at the same global batch, so their step times
compare directly; every rank runs ``--threads`` (1) threads, so "single" uses one core (on a
machine with fewer cores than ranks the larger worlds are oversubscribed: say so when quoting
them). Next to the wall time per step, the CPU seconds per step summed over all ranks: the total
work of a layout (compute, duplicated work, communication), which a shared machine's scheduling
does not distort.

The bubble sweep runs PP = 2 with m in {1, 2, 4, 8} micro-batches of ``--bubble-micro`` samples;
a stage's measured bubble is the time it spends blocked in collectives on the pipeline group
(activation / gradient send and recv, the loss and metrics broadcasts) per step, over the step
time (megaclip.bench.workers.steps_worker). The default model
(megaclip/bench/models/bench-pp.yaml) keeps a micro-batch's compute above a message's cost.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaclip.bench.compare import run_workers  # noqa: E402
from megaclip.bench.spec import BenchSpec  # noqa: E402
from megaclip.perf.throughput import analytic_bubble, median  # noqa: E402

BENCH_MODEL = str(Path(__file__).resolve().parents[1] / "megaclip/bench/models/bench-pp.yaml")

# name -> (tp, pp, dp, zero, accum); micro = global_batch / (dp * accum)
LAYOUTS = {
    "single": (1, 1, 1, 1, 1),
    "dp2-zero1": (1, 1, 2, 1, 1),
    "dp2-zero2": (1, 1, 2, 2, 1),
    "dp2-zero3": (1, 1, 2, 3, 1),
    "tp2": (2, 1, 1, 1, 1),
    "pp2": (1, 2, 1, 1, 4),
    "pp2xdp2": (1, 2, 2, 1, 2),
    "tp2xpp2": (2, 2, 1, 1, 4),
    "tp2xpp2xdp2": (2, 2, 2, 1, 2),
}


def time_layout(model: str, tp, pp, dp, zero, micro, accum, steps, warmup, schedule="keep") -> dict:
    """Median step time (slowest rank), summed CPU s/step, per-stage bubble of one layout."""
    spec = BenchSpec(
        model=model, tp=tp, pp=pp, dp=dp, zero=zero, micro_batch=micro, accum=accum,
        steps=steps, warmup=warmup, schedule=schedule,
    )  # fmt: skip
    results = run_workers("steps", spec, tp * pp * dp)
    step = max(median(r["step_times"]) for r in results)
    stages = {}
    for r in results:
        if r["dp"] == 0 and r["tp"] == 0:
            stages[r["pp"]] = r["pp_wait_s"] / median(r["step_times"])
    return {
        "world": tp * pp * dp,
        "step_s": step,
        "cpu_s": sum(r["cpu_s_per_step"] for r in results),
        "samples_per_s": micro * accum * dp / step,
        "bubble_per_stage": [stages[s] for s in sorted(stages)] if pp > 1 else None,
    }


def main(argv: list[str] | None = None) -> int:
    """Time every layout, then sweep m for the PP=2 bubble; print tables."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=BENCH_MODEL)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--bubble-micro", type=int, default=16, help="micro-batch of the bubble sweep")
    p.add_argument("--bubble-m", default="1,2,4,8", help="comma list of m ('' to skip)")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per rank")
    p.add_argument(
        "--schedules", default="keep,recompute", help="pipeline schedules of the bubble sweep"
    )
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by every spawned rank
    out: dict = {
        "model": args.model,
        "global_batch": args.global_batch,
        "layouts": {},
        "bubble": {},
    }
    n = args.global_batch
    print(f"## per-step time, global batch {n}, model {Path(args.model).stem}")
    head = ("layout", "ranks", "micro x accum", "step ms", "samples/s", "vs single")
    head += ("CPU s/step", "vs single")
    widths = (13, 5, 13, 9, 10, 9, 10, 9)
    print(" ".join(f"{h:>{w}}" if i else f"{h:<{w}}" for i, (h, w) in enumerate(zip(head, widths))))
    base = base_cpu = None
    for name in filter(None, args.layouts.split(",")):
        tp, pp, dp, zero, accum = LAYOUTS[name]
        micro = n // (dp * accum)
        r = time_layout(args.model, tp, pp, dp, zero, micro, accum, args.steps, args.warmup)
        if name == "single":
            base, base_cpu = r["step_s"], r["cpu_s"]
        cells = (
            str(r["world"]),
            f"{micro} x {accum}",
            f"{1e3 * r['step_s']:.1f}",
            f"{r['samples_per_s']:.1f}",
            f"{r['step_s'] / base:.2f}x" if base else "-",
            f"{r['cpu_s']:.3f}",
            f"{r['cpu_s'] / base_cpu:.2f}x" if base_cpu else "-",
        )
        print(f"{name:<13} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths[1:])))
        sys.stdout.flush()
        out["layouts"][name] = r | {"micro": micro, "accum": accum}
    ms = [int(x) for x in args.bubble_m.split(",") if x]
    schedules = [s for s in args.schedules.split(",") if s]
    if ms:
        print(f"\n## pipeline bubble, PP = 2, micro-batch {args.bubble_micro}")
        head = ("schedule", "m", "step ms", "stage 0", "stage 1", "measured", "(P-1)/(m+P-1)")
        widths = (9, 3, 9, 8, 8, 9, 14)
        print(" ".join(f"{h:>{w}}" for h, w in zip(head, widths)))
    for m in ms:  # the schedules alternate per m, so both see the same machine load
        for sched in schedules:
            r = time_layout(
                args.model, 1, 2, 1, 1, args.bubble_micro, m, args.steps, args.warmup, sched
            )
            b = r["bubble_per_stage"]
            mean = sum(b) / len(b)
            print(f"{sched:>9} {m:>3} {1e3 * r['step_s']:>9.1f} {b[0]:>8.3f} {b[1]:>8.3f} "
                  f"{mean:>9.3f} {analytic_bubble(2, m):>14.3f}")  # fmt: skip
            sys.stdout.flush()
            out["bubble"][f"{sched}-{m}"] = r | {
                "measured": mean,
                "analytic": analytic_bubble(2, m),
            }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
