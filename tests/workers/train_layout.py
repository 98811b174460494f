"""Worker: train a few steps with ClipEngine on a (tp, pp, dp) layout; save losses and weights.

Also saved: Adam's first moment after step 1 (``exp_avg`` = (1 - beta1) x the step's gradient,
read through DeepSpeed's ``safe_get_full_optimizer_state`` for any ZeRO stage), so the tests see
the gradients themselves, which AdamW's normalised updates hide.
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

import torch

from megaclip.config.parallel import ParallelConfig
from megaclip.model.naming import to_open_clip_key
from megaclip.parallel.runtime import clean_exit, init_distributed
from megaclip.parallel.topology import Topology
from megaclip.parallel.tp_state import full_state, gather_full
from megaclip.train.ds_config import fill_offload_paths, nvme_offload, resolve_ds_config
from megaclip.train.engine import ClipEngine, OptimConfig
from tests.reference import OPTIM, global_batch, model_for, rank_micro_batches


def first_moments(engine, tp_group) -> dict[str, torch.Tensor]:
    """Adam's exp_avg of every parameter, ZeRO partitions and TP shards joined (collective)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    optimizer = engine.optimizer
    if hasattr(optimizer, "_hp_optimizer_states_linked"):
        # DeepSpeed 0.19.8's ZeRO-1/2 links the optimizer-state views right after the *first*
        # parameter group's first step, so later groups' views stay empty: link them again.
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()
    module = engine.module
    named = []
    for name, param in module.named_parameters():
        moment = safe_get_full_optimizer_state(param, "exp_avg")
        assert moment is not None, f"no exp_avg for {name}"
        named.append((name, moment.reshape(getattr(param, "ds_shape", param.shape))))
    return gather_full(named, tp_group)


def main(out_dir: str, spec_json: str) -> None:
    """One spec, or a list of specs (each with an ``out`` sub-directory) of one (tp, pp) in
    one process group: a torchrun per group of layouts, not per layout."""
    specs = json.loads(spec_json)
    _, world = init_distributed()
    if isinstance(specs, dict):
        run(out_dir, specs, world)
    else:
        for spec in specs:
            out = Path(out_dir) / spec.pop("out")
            out.mkdir(parents=True, exist_ok=True)
            run(str(out), spec, world)
            gc.collect()
    clean_exit()


def run(out_dir: str, spec: dict, world: int) -> None:
    """Train ``spec``'s layout; rank (tp 0, dp 0) of each stage writes ``stage<pp>.pt``."""
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
    optim = OptimConfig(**OPTIM)
    ds = {}
    if "ds" in spec:  # a DeepSpeed JSON's dict, resolved as megaclip train resolves it
        ds = resolve_ds_config(spec["ds"], par, gradient_clipping=optim.grad_clip)
        if spec.get("unchecked_offload"):  # benchmarks/nvme_offload_check.py: refused cases too
            for section in nvme_offload(ds):
                ds["zero_optimization"][section]["nvme_path"] = spec["offload_dir"]
        else:
            ds = fill_offload_paths(ds, spec.get("offload_dir", ""))
    engine = ClipEngine(
        cfg,
        par,
        topo,
        ds,
        optim,
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
        if step == 0:
            moments = first_moments(engine.engine, topo.tp_group_or_none)
            # ZeRO-Infinity: bytes in the offload files while training (DeepSpeed removes them)
            offload = Path(spec.get("offload_dir") or out_dir) / "zero_stage_3"
            swapped = sum(f.stat().st_size for f in offload.rglob("*") if f.is_file())
    module = engine.engine.module
    params = list(module.parameters())
    if par.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            state = full_state(module, topo.tp_group_or_none)
    else:
        state = full_state(module, topo.tp_group_or_none)
    state = {to_open_clip_key(k): v.float() for k, v in state.items()}
    exp_avg = {to_open_clip_key(k): v.float() for k, v in moments.items()}
    if topo.coords.tp == 0 and topo.coords.dp == 0:
        torch.save(
            {
                "losses": losses,
                "times": times,
                "state": state,
                "exp_avg": exp_avg,
                "swapped_bytes": swapped,
            },
            f"{out_dir}/stage{topo.coords.pp}.pt",
        )


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
