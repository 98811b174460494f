"""Worker: run a script of checkpoint actions on one or more (tp, pp, dp, ZeRO) layouts.

argv: OUT_DIR SPEC_JSON. SPEC = {"model", "seed", "phases": [{"layout": {...}, "actions": [...]}]}
Each phase builds a Topology + ClipEngine for its layout (same processes) and runs its actions:

    {"do": "train", "steps": n}           steps on global_batch(cfg, N, seed=1000 + step)
    {"do": "save", "root": R, "keep_last": k}
    {"do": "fault_save", "root": R, "stage": S}   save with rank 0 killed after stage S
    {"do": "load", "root": R}             load_latest
    {"do": "init_from", "path": P}        initialize_from (fresh optimizer)
    {"do": "gather", "name": NAME}        full open_clip-keyed weights -> OUT/NAME_stage<s>.pt
    {"do": "load_error", "root": R}       load_latest must raise a MegaclipError: record it

A phase may set its own "model" (preset name).

Rank 0 rewrites OUT/result.pt after every action: {"log": [(phase, action, payload), ...]}.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

from megaclip.checkpoint.atomic import FAULT_ENV
from megaclip.config.model import load_preset
from megaclip.config.parallel import ParallelConfig
from megaclip.errors import MegaclipError
from megaclip.model.naming import to_open_clip_key
from megaclip.parallel.runtime import clean_exit, init_distributed
from megaclip.parallel.topology import Topology
from megaclip.parallel.tp_state import full_state
from megaclip.train.engine import ClipEngine, OptimConfig
from tests.reference import OPTIM, global_batch, rank_micro_batches


def build(cfg, layout: dict, world: int, seed: int):
    tp, pp = layout.get("tp", 1), layout.get("pp", 1)
    par = ParallelConfig(
        tp=tp,
        pp=pp,
        dp=world // (tp * pp),
        zero_stage=layout.get("zero", 1),
        micro_batch_size=layout["micro"],
        grad_accum_steps=layout.get("accum", 1),
        precision=layout.get("precision", "fp32"),
    )
    topo = Topology(par)
    return ClipEngine(cfg, par, topo, {}, OptimConfig(**OPTIM), seed=seed), par, topo


def gather(engine, par, topo, out_dir: str, name: str) -> None:
    module = engine.engine.module
    if par.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters())):
            state = full_state(module, topo.tp_group_or_none)
    else:
        state = full_state(module, topo.tp_group_or_none)
    state = {to_open_clip_key(k): v.float().clone() for k, v in state.items()}
    if topo.coords.tp == 0 and topo.coords.dp == 0:
        torch.save(state, f"{out_dir}/{name}_stage{topo.coords.pp}.pt")
    dist.barrier()


def main(out_dir: str, spec_json: str) -> None:
    spec = json.loads(spec_json)
    rank, world = init_distributed()
    log = []

    def record(phase, action, payload):
        log.append((phase, action.get("do"), payload))
        if rank == 0:
            torch.save({"log": log}, f"{out_dir}/result.pt")

    for p, phase in enumerate(spec["phases"]):
        cfg = load_preset(phase.get("model", spec.get("model", "tiny-pp")))
        engine, par, topo = build(cfg, phase["layout"], world, spec.get("seed", 3))
        for action in phase["actions"]:
            kind = action["do"]
            if kind == "train":
                losses = []
                for _ in range(action["steps"]):
                    step = engine.step_count
                    images, tokens = global_batch(cfg, par.global_batch_size, seed=1000 + step)
                    mbs = rank_micro_batches(images, tokens, par, topo.coords.dp)
                    losses.append((step, engine.train_step(mbs).loss))
                record(p, action, losses)
            elif kind in ("save", "fault_save"):
                if kind == "fault_save":
                    os.environ[FAULT_ENV] = action["stage"]
                client = {"next_step": engine.step_count, "rank": rank}
                path = engine.save(action["root"], client, keep_last=action.get("keep_last"))
                record(p, action, str(path))
            elif kind == "load":
                client = engine.load_latest(action["root"])
                record(p, action, {"client": client, "step": engine.step_count})
            elif kind == "load_error":
                try:
                    engine.load_latest(action["root"])
                    record(p, action, None)
                except MegaclipError as err:
                    record(p, action, f"{type(err).__name__}: {err}")
            elif kind == "init_from":
                engine.initialize_from(action["path"])
                record(p, action, None)
            elif kind == "gather":
                gather(engine, par, topo, out_dir, action["name"])
                record(p, action, None)
            else:
                raise ValueError(kind)
        del engine
    clean_exit()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
