"""Thin wrappers over megatron-core's tensor-parallel linear layers.

Both return a single tensor (megatron returns ``(output, bias)``) and take the tensor-parallel
process group as an argument; ``tp_group=None`` means no tensor parallelism: the same parameters
with plain ``F.linear`` math, so a single device needs no process group at all.
Weights are left uninitialised here: :func:`megaclip.model.init.init_parameters` fills them
deterministically from the full (unsharded) tensors so every layout starts from the same model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from megaclip.parallel.sharding import BLOCK_LINEARS, LinearSplit


def tp_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, size) of this process in the tensor-parallel group (0, 1 without one)."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _mp_config(group: dist.ProcessGroup | None) -> ModelParallelConfig:
    return ModelParallelConfig(
        tensor_model_parallel_size=tp_world(group)[1],
        use_cpu_initialization=True,
        perform_initialization=False,
        gradient_accumulation_fusion=False,
        params_dtype=torch.float32,
    )


def _mark_sharded(param: torch.Tensor, dim: int, stride: int) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = stride


def _no_init(_: torch.Tensor) -> None:
    return None


class _MegaclipLinear(nn.Module):
    """What both wrappers add to megatron: plain math without a TP group, clean state dicts.

    A Module subclass with its own ``__init__`` so that DeepSpeed's ``zero.Init`` (which wraps
    the ``__init__`` of every Module subclass that defines one) partitions the parameters built
    here; the megatron class comes after it in each subclass's MRO.
    """

    # megatron adds an empty "_extra_state" entry per layer; keep state dicts to real tensors.
    get_extra_state = nn.Module.get_extra_state
    set_extra_state = nn.Module.set_extra_state
    # megatron's repr reads attributes the plain (no TP group) form does not set
    __repr__ = nn.Module.__repr__

    def extra_repr(self) -> str:
        out, inp = tuple(getattr(self.weight, "ds_shape", self.weight.shape))  # ZeRO-3: full
        tp = (
            "none"
            if self.explicit_tp_group is None
            else dist.get_world_size(self.explicit_tp_group)
        )
        return f"in={inp}, out={out} (local), bias={self.bias is not None}, tp={tp}"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        split: LinearSplit,
        *,
        tp_group: dist.ProcessGroup | None,
        bias: bool = True,
    ) -> None:
        """The megatron layer over ``tp_group``, or without a TP group the unsharded parameters,
        without megatron: its layers fall back to the process's global TP group when given
        none, so a whole-model layer built in a TP > 1 process (the export, shape checks) would
        come out sharded."""
        if tp_group is None:
            nn.Module.__init__(self)
            self.weight = nn.Parameter(torch.empty(out_features, in_features))
            self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        else:
            super().__init__(  # the megatron class after this one in the subclass's MRO
                in_features,
                out_features,
                config=_mp_config(tp_group),
                init_method=_no_init,
                bias=bias,
                tp_group=tp_group,
                **self.megatron_args(split),
            )
        self.explicit_tp_group = tp_group  # megatron may substitute its global group for None
        self._load_state_dict_pre_hooks.clear()  # megatron's hook injects "_extra_state" keys
        # megatron sets these only for TP > 1 (DeepSpeed's gradient norm reads them); set them
        # always, so a test can hold every built parameter to the sharding table.
        for param, part in ((self.weight, split.weight), (self.bias, split.bias)):
            if param is not None and part.dim is not None:
                _mark_sharded(param, part.dim, part.stride)

    @staticmethod
    def megatron_args(split: LinearSplit) -> dict[str, Any]:
        """The megatron class's own keyword arguments for ``split``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [..., in(/tp)] -> [..., out(/tp)]
        if self.explicit_tp_group is None:
            return F.linear(x, self.weight, self.bias)
        return super().forward(x)[0]


class ColumnLinear(_MegaclipLinear, ColumnParallelLinear):
    """y_r = x A_r^T + b_r, A split by output rows over TP ranks; backward all-reduces dL/dx."""

    @staticmethod
    def megatron_args(split: LinearSplit) -> dict[str, Any]:
        return {"gather_output": False, "stride": split.stride}


class RowLinear(_MegaclipLinear, RowParallelLinear):
    """y = all_reduce_r(x_r A_r^T) + b, A split by input columns over TP ranks; b replicated."""

    @staticmethod
    def megatron_args(split: LinearSplit) -> dict[str, Any]:
        return {"input_is_parallel": True, "skip_bias_add": False}


def tp_linear(
    path: str, in_features: int, out_features: int, *, tp_group: dist.ProcessGroup | None
) -> ColumnLinear | RowLinear:
    """The block's linear layer ``path`` (a key of BLOCK_LINEARS), split as the table says."""
    split = BLOCK_LINEARS[path]
    layer = ColumnLinear if split.dim == 0 else RowLinear
    return layer(in_features, out_features, split, tp_group=tp_group)
