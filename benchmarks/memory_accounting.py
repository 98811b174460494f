"""Parameter, gradient and optimizer-state bytes per rank: counted in the engine vs the planner.

    python benchmarks/memory_accounting.py [--model tiny-pp] [--precision fp32|bf16] [--json F]

For each layout (ZeRO-0/1/2/3 with DP = 2, TP = 2, PP = 2) it launches torchrun, trains two
steps and, at the last optimizer step (before DeepSpeed frees the gradients), counts every
unique tensor storage the module and DeepSpeed's optimizer hold (megaclip.bench.memory): module
parameters / ZeRO-3 partitions, gradients and gradient partitions, fp32 master partitions and
Adam's moments. Next to the count: megaclip.perf.memory.rank_model_states (what ``megaclip
plan`` uses), evaluated with the bucket settings of the DeepSpeed config the engine runs with
(megaclip's resolved defaults: 5e7-element buckets). "buffers" is the planner's persistent-buffer
term (ZeRO-3's gradient bucket), compared with the count's "other".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaclip.bench.compare import (  # noqa: E402
    fmt_bytes,
    layout_spec,
    memory_row,
    report_all,
    run_workers,
)
from megaclip.bench.harness import ZERO3_ALL_GATHERED, ds_config_for  # noqa: E402
from megaclip.config.model import resolve_model  # noqa: E402
from megaclip.train.ds_config import resolve_ds_config  # noqa: E402

# name -> (tp, pp, dp, zero, micro, accum, ds_overrides)
LAYOUTS = {
    "dp2-zero0": (1, 1, 2, 0, 2, 1, {}),
    "dp2-zero1": (1, 1, 2, 1, 2, 1, {}),
    "dp2-zero2": (1, 1, 2, 2, 2, 1, {}),
    "dp2-zero3": (1, 1, 2, 3, 2, 1, ZERO3_ALL_GATHERED),
    "tp2": (2, 1, 1, 1, 2, 1, {}),
    "pp2": (1, 2, 1, 1, 2, 2, {}),
}


def measure(name: str, model: str, precision: str) -> dict:
    """Run one layout's memory workers; counted vs predicted rows per rank."""
    spec = layout_spec(LAYOUTS[name], model=model, precision=precision, steps=2, warmup=0)
    world = spec.world_size()
    results = run_workers("memory", spec, world)
    cfg = resolve_model(model)
    par = spec.parallel(world)
    rows = [
        memory_row(cfg, par, r, resolve_ds_config(ds_config_for(spec), par))
        | {k: r[k] for k in ("largest", "optimizer_class")}
        for r in results
    ]
    return {"layout": name, "spec": json.loads(spec.to_json()), "ranks": rows}


def print_layout(res: dict) -> None:
    """Print one layout's table."""
    spec = res["spec"]
    print(f"\n## {res['layout']}  ({spec['model']}, {spec['precision']}, ZeRO-{spec['zero']}, "
          f"{res['ranks'][0]['optimizer_class']})")  # fmt: skip
    print(f"{'rank':>4} {'n':>8} {'kind':<10} {'counted':>11} {'planner':>11} {'ratio':>7}")
    for r in res["ranks"]:
        for kind in ("params", "grads", "optimizer", "total"):
            n = f"{r['n_measured']}" if kind == "params" else ""
            print(f"{r['rank']:>4} {n:>8} {kind:<10} {fmt_bytes(r[kind]):>11} "
                  f"{fmt_bytes(r[kind + '_analytic']):>11} {r[kind + '_ratio']:>7.4f}")  # fmt: skip
        print(f"{r['rank']:>4} {'':>8} {'other':<10} {fmt_bytes(r['other']):>11} "
              f"{fmt_bytes(r['buffers']):>11} (buffers)")  # fmt: skip
    worst = max(abs(r["total_ratio"] - 1) for r in res["ranks"])
    print(f"max |counted/planner - 1| of the total over {len(res['ranks'])} ranks: {worst:.4f}")


def main(argv: list[str] | None = None) -> int:
    """Measure and print every requested layout."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny-pp")
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--json", metavar="FILE", help="also write all results to FILE")
    args = p.parse_args(argv)
    run = lambda name: measure(name, args.model, args.precision)  # noqa: E731
    return report_all(args.layouts.split(","), run, print_layout, args.json)


if __name__ == "__main__":
    sys.exit(main())
