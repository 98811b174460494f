"""Collect the full model (all TP shards and pipeline stages) on global rank 0, in process."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from megaclip.checkpoint.openclip import from_open_clip, to_open_clip
from megaclip.model.clip import ClipModel
from megaclip.parallel.tp_state import full_state


def gather_open_clip_state(clip_engine) -> dict[str, torch.Tensor] | None:
    """open_clip-format fp32 state dict of the whole model on global rank 0 (None elsewhere).

    Every rank must call it. TP shards are all-gathered inside each TP group, ZeRO-3 partitions
    gathered, then the stage owners (dp = tp = 0) send their stage's tensors to rank 0.
    """
    module = clip_engine.engine.module
    topo = clip_engine.topo
    gather = contextlib.nullcontext()
    if clip_engine.par.zero_stage == 3:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters(list(module.parameters()))
    with gather:
        state = full_state(module, topo.tp_group_or_none)
    owner = topo.coords.tp == 0 and topo.coords.dp == 0
    mine = to_open_clip({k: v.float().cpu() for k, v in state.items()}) if owner else {}
    if dist.get_world_size() == 1:
        return mine
    received = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, received, dst=0)
    if dist.get_rank() != 0:
        return None
    merged: dict[str, torch.Tensor] = {}
    for part in received:
        merged.update(part)
    return merged


def model_from_open_clip_state(cfg, state: dict[str, torch.Tensor]) -> ClipModel:
    """A single-device ClipModel holding ``state`` (open_clip format)."""
    model = ClipModel(cfg)
    model.load_state_dict(from_open_clip(state), strict=True)
    return model.eval()
