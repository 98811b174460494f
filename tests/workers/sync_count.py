"""Worker: count tensor -> Python conversions inside ``ClipEngine.train_step`` (one process).

For each case of SPEC_JSON's ``cases`` (model preset, ZeRO stage, accumulation steps, precision)
it builds a single-process engine, runs ``warmup`` untimed steps, then counts the calls of
``Tensor.item``, ``.tolist``, ``.numpy``, ``__bool__``, ``__float__``, ``__int__`` and
``__index__`` made during the next steps (DeepSpeed's own calls included; ``megaclip`` counts
those made by megaclip's own code). On an accelerator each of them waits for the device: the
count bounds the host synchronisations of a step. Prints one line
``SYNC_COUNTS [{case..., "per_step": [{kind: n}], "totals": [n], "megaclip": [n]}, ...]``.
"""

from __future__ import annotations

import json
import sys

from megaclip.bench.syncs import counting_host_reads, total
from megaclip.config.model import load_preset
from megaclip.config.parallel import ParallelConfig
from megaclip.parallel.runtime import init_distributed
from megaclip.parallel.topology import Topology
from megaclip.train.engine import ClipEngine, OptimConfig
from tests.reference import global_batch, rank_micro_batches


def count_case(case: dict, steps: int = 2, warmup: int = 2) -> dict:
    par = ParallelConfig(
        zero_stage=case["zero"],
        micro_batch_size=case.get("micro", 2),
        grad_accum_steps=case["accum"],
        precision=case.get("precision", "fp32"),
    )
    topo = Topology(par)
    cfg = load_preset(case["model"])
    optim = OptimConfig(lr=1e-3, grad_clip=case.get("clip", 1.0))
    engine = ClipEngine(cfg, par, topo, {}, optim, seed=0)
    per_step = []
    for step in range(warmup + steps):
        images, tokens = global_batch(cfg, par.global_batch_size, seed=step)
        if case.get("nan") and step == warmup + steps - 1:
            images[0, 0, 0, 0] = float("nan")  # the last step is skipped: same count?
        batches = rank_micro_batches(images, tokens, par, 0)
        with counting_host_reads() as counts:
            result = engine.train_step(batches)
        # warm-up steps: DeepSpeed's lazy set-up; ZeRO-3 checks its recorded parameter trace
        # across ranks once, at step 2 (one read per parameter)
        if step >= warmup:
            per_step.append(dict(counts))
    n_params = sum(1 for _ in engine.engine.module.parameters())
    return {
        **case,
        "params": n_params,
        "per_step": per_step,
        "totals": [total(c) for c in per_step],
        "megaclip": [c.get("megaclip", 0) for c in per_step],
        "skipped_last": result.skipped,
    }


def main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    init_distributed()
    results = [
        count_case(case, spec.get("steps", 2), spec.get("warmup", 2)) for case in spec["cases"]
    ]
    print("SYNC_COUNTS " + json.dumps(results), flush=True)
    from megaclip.parallel.runtime import clean_exit

    clean_exit()


if __name__ == "__main__":
    main(sys.argv[1])
