"""Worker: step 1 of 3 gets a NaN pixel; record whether each step changed the parameters."""

from __future__ import annotations

import json
import sys

import torch

from megaclip.config.model import load_preset
from megaclip.config.parallel import ParallelConfig
from megaclip.parallel.runtime import clean_exit, init_distributed
from megaclip.parallel.topology import Topology
from megaclip.train.engine import ClipEngine, OptimConfig
from tests.reference import global_batch, rank_micro_batches

spec = json.loads(sys.argv[1])
rank, world = init_distributed()
par = ParallelConfig(
    tp=1,
    pp=spec["pp"],
    dp=world // spec["pp"],
    zero_stage=spec["zero"],
    micro_batch_size=2,
    grad_accum_steps=2,
    precision=spec.get("precision", "fp32"),
)
topo = Topology(par)
cfg = load_preset("tiny-pp")
eng = ClipEngine(cfg, par, topo, {}, OptimConfig(lr=1e-3, grad_clip=spec.get("clip", 1.0)), seed=0)


def snap():
    return torch.cat(
        [
            getattr(p, "ds_tensor", p).detach().float().flatten()
            for p in eng.engine.module.parameters()
        ]
    )


records = []
for step in range(3):
    images, tokens = global_batch(cfg, par.global_batch_size, seed=step)
    if step == 1:
        images[0, 0, 0, 0] = float("nan")
    before = snap()
    r = eng.train_step(rank_micro_batches(images, tokens, par, topo.coords.dp))
    after = snap()
    records.append(
        {
            "loss": r.loss,
            "skipped": r.skipped,
            "changed": (after - before).abs().max().item(),
            "finite": bool(torch.isfinite(after).all()),
        }
    )
torch.save(records, f"{sys.argv[2]}/rank{rank}.pt")
clean_exit()
