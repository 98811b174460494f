"""Worker: train a few steps with ClipEngine on a (tp, pp, dp) layout; save losses and weights."""

from __future__ import annotations

import json
import sys

import torch

from megaclip.config.parallel import ParallelConfig
from megaclip.model.naming import to_open_clip_key
from megaclip.parallel.runtime import clean_exit, init_distributed
from megaclip.parallel.topology import Topology
from megaclip.parallel.tp_state import full_state
from megaclip.train.engine import ClipEngine, OptimConfig
from tests.reference import OPTIM, global_batch, model_for, rank_micro_batches


def main(out_dir: str, spec_json: str) -> None:
    spec = json.loads(spec_json)
    rank, world = init_distributed()
    tp, pp = spec["tp"], spec["pp"]
    par = ParallelConfig(
        tp=tp,
        pp=pp,
        dp=world // (tp * pp),
        zero_stage=spec["zero"],
        micro_batch_size=spec["micro"],
        grad_accum_steps=spec["accum"],
        precision=spec.get("precision", "fp32"),
        activation_checkpointing=spec.get("recompute", False),
        schedule=spec.get("schedule", "auto"),
    )
    topo = Topology(par)
    cfg = model_for(spec["model"], spec.get("loss", "clip"))
    engine = ClipEngine(
        cfg,
        par,
        topo,
        {},
        OptimConfig(**OPTIM),
        seed=spec["seed"],
        loss_mode=spec.get("loss_mode", "allgather"),
        loss=spec.get("loss", "clip"),
        patch_dropout=spec.get("patch_dropout", 0.0),
    )
    losses, times = [], []
    for step in range(spec["steps"]):
        images, tokens = global_batch(cfg, par.global_batch_size, seed=1000 + step)
        result = engine.train_step(rank_micro_batches(images, tokens, par, topo.coords.dp))
        losses.append(result.loss)
        times.append(result.step_time)
    module = engine.engine.module
    params = list(module.parameters())
    if par.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            state = full_state(module, topo.tp_group_or_none)
    else:
        state = full_state(module, topo.tp_group_or_none)
    state = {to_open_clip_key(k): v.float() for k, v in state.items()}
    if topo.coords.tp == 0 and topo.coords.dp == 0:
        torch.save(
            {"losses": losses, "times": times, "state": state},
            f"{out_dir}/stage{topo.coords.pp}.pt",
        )
    clean_exit()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
