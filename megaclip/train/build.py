"""Build this rank's part of the model without ever holding what it does not own.

The architecture is megaclip.model's; parallelism is applied from outside it:

- ZeRO-0/1/2 (any TP x PP): the rank's module (its TP shard of its pipeline stage) is built on
  the meta device, then materialised directly in the training dtype on the accelerator, then
  filled from the layout-free initialisation (megaclip.model.init), shard by shard;
- ZeRO-3 (PP = 1): built under ``deepspeed.zero.Init``, which partitions each layer over the DP
  group as soon as it is constructed (one layer is whole at a time); each rank then fills its own
  partition of every parameter from the same initialisation.

So every layout starts from exactly the single-process model's weights with the same seed.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from megaclip.config.model import ClipConfig
from megaclip.config.parallel import ParallelConfig
from megaclip.model.clip import ClipModel
from megaclip.model.init import fill_local, init_parameters
from megaclip.model.naming import to_open_clip_key
from megaclip.parallel.deepspeed_compat import zero3_partition
from megaclip.parallel.device import device as accelerator_device
from megaclip.parallel.sharding import tp_partition
from megaclip.parallel.topology import Topology
from megaclip.pipeline.partition import StagePlan, partition
from megaclip.pipeline.stages import PipeStage
from megaclip.train.ds_config import nvme_offload

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def materialize_(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Replace every meta parameter by real (uninitialised) storage on ``device``.

    The new Parameter carries the old one's attributes (tensor-parallel partition dim, stride).
    Call it before anything (an optimizer) holds references to the parameters.
    """
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None and p.is_meta:
                kind = dtype if p.is_floating_point() else p.dtype
                real = nn.Parameter(
                    torch.empty(p.shape, dtype=kind, device=device), p.requires_grad
                )
                real.__dict__.update(p.__dict__)
                sub._parameters[name] = real
    return module


@torch.no_grad()
def init_zero3_partitions(module: nn.Module, cfg: ClipConfig, seed: int, tp: tuple[int, int]):
    """Fill this DP rank's ZeRO-3 partition of every parameter (padding zeroed)."""
    for name, param in module.named_parameters():
        local = zero3_partition(param)
        dest, n = local.data, local.valid
        dest[n:].zero_()
        key = to_open_clip_key(name)
        shape = tuple(param.ds_shape)
        fill_local(dest[:n], key, shape, tp_partition(name), tp, cfg, seed, local.start)


@torch.no_grad()
def init_gathered(module: nn.Module, cfg: ClipConfig, seed: int, tp: tuple[int, int]) -> None:
    """Fill every parameter through DeepSpeed's gather (one tensor at a time, then partitioned
    again): the path where partitions live on NVMe (offload_param), not in ``ds_tensor``."""
    import deepspeed

    for name, param in module.named_parameters():
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            key, shape = to_open_clip_key(name), tuple(param.ds_shape)
            fill_local(param.data.view(-1), key, shape, tp_partition(name), tp, cfg, seed, 0)


class BuiltModule:
    """The rank's module and, under pipelining, the stage plans it was cut from."""

    def __init__(self, module: nn.Module, plans: list[StagePlan] | None) -> None:
        self.module, self.plans = module, plans


def build_module(
    cfg: ClipConfig,
    par: ParallelConfig,
    topo: Topology,
    ds_config: dict[str, Any],
    *,
    seed: int,
    patch_dropout: float = 0.0,
    loss_fn=None,
) -> BuiltModule:
    """This rank's initialised module for layout ``par`` (a PipelineModule when pp > 1)."""
    tp_group = topo.tp_group_or_none
    tp = (topo.coords.tp, par.tp)
    dtype = DTYPES[par.precision]
    kw = dict(
        tp_group=tp_group, patch_dropout=patch_dropout, recompute=par.activation_checkpointing
    )
    if par.pp == 1 and par.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.Init(
            config_dict_or_path=ds_config,
            data_parallel_group=topo.dp_group,
            # dtype from the config: DeepSpeed 0.19.8 ignores an explicit dtype on a device
            # without fp16 (operator precedence in Init._set_dtype) and would pick bf16.
            dtype=None,
            mpu=topo.mpu() if par.tp > 1 else None,
        ):
            module = ClipModel(cfg, **kw)
        if "offload_param" in nvme_offload(ds_config):
            init_gathered(module, cfg, seed, tp)
        else:
            init_zero3_partitions(module, cfg, seed, tp)
        return BuiltModule(module, None)
    dev = accelerator_device()
    if par.pp == 1:
        with torch.device("meta"):
            module = ClipModel(cfg, **kw)
        materialize_(module, dev, dtype)
        init_parameters(module, cfg, seed, tp_group)
        return BuiltModule(module, None)
    from deepspeed.pipe import LayerSpec, PipelineModule

    plans = partition(cfg, par.pp)
    here = topo.coords.pp
    with torch.device("meta"):
        local = PipeStage(cfg, plans[here], **kw)
    materialize_(local, dev, dtype)
    init_parameters(local, cfg, seed, tp_group)
    # Only this stage is built; the others stay specs that DeepSpeed never builds here.
    layers = [
        local if s == here else LayerSpec(PipeStage, cfg, plans[s], **kw) for s in range(par.pp)
    ]
    module = PipelineModule(
        layers=layers, topology=topo.ds_topology, loss_fn=loss_fn, partition_method="uniform"
    )
    return BuiltModule(module, plans)
