"""Gather tensor-parallel shards back to full tensors (checkpoint export, tests, eval)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.distributed as dist

from megaclip.parallel.collectives import all_gather_list
from megaclip.parallel.shapes import unshard
from megaclip.parallel.sharding import tp_partition


def gather_full(
    named: Iterable[tuple[str, torch.Tensor]], tp_group: dist.ProcessGroup | None
) -> dict[str, torch.Tensor]:
    """{name: full tensor} from (parameter name, local value) pairs; split ones all-gathered.

    The name gives the split (megaclip.parallel.sharding); the value is the parameter itself or
    its gradient. Every rank of ``tp_group`` must call this with the same names.
    """
    size = 1 if tp_group is None else dist.get_world_size(tp_group)
    out = {}
    for name, value in named:
        dim, stride = tp_partition(name)
        value = value.detach().contiguous()
        if dim is None or size == 1:
            out[name] = value.clone()
            continue
        out[name] = unshard(all_gather_list(value, tp_group), dim, stride)
    return out


def full_state(
    module: torch.nn.Module, tp_group: dist.ProcessGroup | None
) -> dict[str, torch.Tensor]:
    """Full (TP-unsharded) parameters of ``module`` keyed by their local names."""
    return gather_full(module.named_parameters(), tp_group)


def full_grads(
    module: torch.nn.Module, tp_group: dist.ProcessGroup | None
) -> dict[str, torch.Tensor]:
    """Full (TP-unsharded) gradients of ``module``'s parameters (zeros where grad is None)."""
    return gather_full(
        (
            (n, p.grad if p.grad is not None else torch.zeros_like(p))
            for n, p in module.named_parameters()
        ),
        tp_group,
    )
