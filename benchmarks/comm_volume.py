"""Bytes each collective moves per step per rank, measured vs analytic, for several layouts.

    python benchmarks/comm_volume.py [--model tiny-pp] [--layouts tp2,dp2-zero1,...] [--json]

For every layout it launches torchrun, wraps torch.distributed's collectives in a counting shim
(megaclip.bench.comm) before DeepSpeed starts, records ``--steps`` steps after ``--warmup``,
classifies each call by process group (TP / DP / PP; the loss's gathers are tagged while the
engine computes the global loss) and compares the per-step payload with
megaclip.perf.comm.comm_volume. Initialisation broadcasts happen before recording and are excluded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaclip.bench.compare import (  # noqa: E402
    compare_comm,
    fmt_bytes,
    layout_spec,
    report_all,
    run_workers,
    summarize_comm,
)
from megaclip.bench.harness import ZERO3_ALL_GATHERED  # noqa: E402
from megaclip.config.model import resolve_model  # noqa: E402
from megaclip.perf.comm import comm_volume  # noqa: E402

# name -> (tp, pp, dp, zero, micro, accum, ds_overrides)
LAYOUTS = {
    "tp2": (2, 1, 1, 1, 4, 1, {}),
    "dp2-zero0": (1, 1, 2, 0, 2, 2, {}),
    "dp2-zero1": (1, 1, 2, 1, 2, 2, {}),
    "dp2-zero2": (1, 1, 2, 2, 2, 2, {}),
    "dp2-zero3": (1, 1, 2, 3, 2, 2, ZERO3_ALL_GATHERED),
    "dp2-zero3-m1": (1, 1, 2, 3, 4, 1, ZERO3_ALL_GATHERED),
    "pp2": (1, 2, 1, 1, 2, 2, {}),
    "tp2xpp2": (2, 2, 1, 1, 2, 2, {}),
    "pp2-recompute": (1, 2, 1, 1, 2, 2, {}),
    "tp2xpp2-recompute": (2, 2, 1, 1, 2, 2, {}),
}
#: PP layouts on the two-pass schedule (no-grad feature pass, then stock 1F1B); else "auto".
RECOMPUTE = ("pp2-recompute", "tp2xpp2-recompute")
DEFAULT = ",".join(LAYOUTS)


def measure(name: str, model: str, steps: int, warmup: int, precision: str) -> dict:
    """Run one layout; per rank: rows (measured vs analytic) and the summary."""
    spec = layout_spec(
        LAYOUTS[name], model=model, precision=precision, steps=steps, warmup=warmup,
        schedule="recompute" if name in RECOMPUTE else "auto",
    )  # fmt: skip
    world = spec.world_size()
    results = run_workers("comm", spec, world)
    cfg = resolve_model(model)
    par = spec.parallel(world)
    ranks = []
    for r in results:
        rows = compare_comm(r["rows"], comm_volume(cfg, par, r["pp"]))
        s = summarize_comm(rows)
        ranks.append(
            {
                **{k: r[k] for k in ("rank", "pp", "dp", "tp")},
                "rows": [row.__dict__ | {"ratio": row.ratio} for row in rows],
                "summary": s.__dict__ | {"ratio": s.ratio, "sent_ratio": s.sent_ratio},
            }
        )
    return {"layout": name, "spec": json.loads(spec.to_json()), "ranks": ranks}


def print_layout(res: dict) -> None:
    """Print one layout's rows (ranks with dp = tp = 0) and the worst ratio of all ranks."""
    spec = res["spec"]
    print(
        f"\n## {res['layout']}  (model {spec['model']}, micro {spec['micro_batch']}, "
        f"accum {spec['accum']}, {spec['precision']}, ZeRO-{spec['zero']})"
    )
    print(f"{'rank':>4} {'class':<6} {'op':<15} {'calls':>6} {'measured':>11} {'analytic':>11}"
          f" {'ratio':>7} {'sent/rank':>11}")  # fmt: skip
    worst = 0.0
    for r in res["ranks"]:
        s = r["summary"]
        worst = max(worst, abs(s["ratio"] - 1.0))
        if r["dp"] != 0 or r["tp"] != 0:
            continue
        for row in sorted(
            r["rows"], key=lambda x: (x["analytic_payload"] is None, x["cls"], x["op"])
        ):
            ratio = "-" if row["ratio"] is None else f"{row['ratio']:.4f}"
            label = row["cls"] if row["analytic_payload"] is not None else row["cls"] + "*"
            print(f"{r['rank']:>4} {label:<6} {row['op']:<15} {row['calls']:>6.1f} "
                  f"{fmt_bytes(row['payload']):>11} {fmt_bytes(row['analytic_payload']):>11} "
                  f"{ratio:>7} {fmt_bytes(row['sent']):>11}")  # fmt: skip
        print(f"{r['rank']:>4} {'TOTAL':<6} {'modelled':<15} {'':>6} "
              f"{fmt_bytes(s['measured_payload']):>11} {fmt_bytes(s['analytic_payload']):>11} "
              f"{s['ratio']:>7.4f} {fmt_bytes(s['measured_sent']):>11}"
              f"   (* unmodelled: {fmt_bytes(s['unmodelled_payload'])})")  # fmt: skip
    print(f"max |measured/analytic - 1| over all {len(res['ranks'])} ranks: {worst:.4f}")


def main(argv: list[str] | None = None) -> int:
    """Measure and print every requested layout."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-pp")
    p.add_argument("--layouts", default=DEFAULT, help=f"comma list of {', '.join(LAYOUTS)}")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--json", metavar="FILE", help="also write all results to FILE")
    args = p.parse_args(argv)
    run = lambda name: measure(name, args.model, args.steps, args.warmup, args.precision)  # noqa: E731
    return report_all(args.layouts.split(","), run, print_layout, args.json)


if __name__ == "__main__":
    sys.exit(main())
