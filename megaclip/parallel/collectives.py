"""Small differentiable collectives over an explicit process group (None = single process).

Every function takes the group as an argument and works on subgroups whose global ranks differ
from their group indices (e.g. the DP group {0, 2} under TP=2), where
``torch.distributed.nn.functional.all_gather`` fails in backward on gloo.

Gradient semantics (the adjoint of the global computation): when every rank of the group calls
``backward`` on its own output, the gradient that arrives at rank r's input is the sum over ranks r'
of the gradient of rank r''s output w.r.t. rank r's input. E.g. for ``y = all_reduce_sum(x)`` with
upstream gradient g on every rank, each rank receives ``size * g``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor

ProcessGroup = dist.ProcessGroup


def group_size(group: ProcessGroup | None) -> int:
    """Number of ranks in ``group`` (1 when ``group`` is None: single process)."""
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    """This process's index inside ``group`` (0 when ``group`` is None)."""
    return 0 if group is None else dist.get_rank(group)


def _reduce_scatter_rows(x: Tensor, group: ProcessGroup) -> Tensor:
    """Return slice r of sum_r' x_r' (x split into ``size`` equal row blocks)."""
    size = dist.get_world_size(group)
    rank = dist.get_rank(group)
    rows = x.shape[0] // size
    x = x.contiguous()
    if x.device.type == "cpu" or dist.get_backend(group) == "gloo":
        # gloo's reduce_scatter is missing in some supported torch versions: all-reduce, slice.
        buf = x.clone()
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
        return buf[rank * rows : (rank + 1) * rows].clone()
    out = torch.empty((rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x, op=dist.ReduceOp.SUM, group=group)
    return out


def gather_rows(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """y = cat([x_0, ..., x_{size-1}], dim 0) over ``group``, in group-rank order; no autograd.

    Every rank must pass a tensor of the same shape and dtype.
    """
    if group is None or dist.get_world_size(group) == 1:
        return x.detach().clone()
    size = dist.get_world_size(group)
    x = x.detach().contiguous()
    out = torch.empty((size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather(list(out.chunk(size, dim=0)), x, group=group)
    return out


def stream_rows(
    x: Tensor, group: ProcessGroup | None, per_step: int = 1
) -> Iterator[tuple[int, Tensor]]:
    """Yield (j, cat(x_j .. x_{j+k-1})) for j = 0, k, 2k, ..: blocks broadcast from their owners.

    k = ``per_step`` owner blocks (fewer in the last step) arrive in one fresh buffer per step; the
    next step's broadcasts run while the caller computes, so at most two steps are alive. No
    autograd. Every rank must pass a tensor of the same shape and consume the whole iterator (the
    broadcasts are collectives).
    """
    size, rank = group_size(group), group_rank(group)
    x = x.detach().contiguous()
    if size == 1:
        yield 0, x
        return
    rows = x.shape[0]

    def start(j0: int):
        j1 = min(size, j0 + per_step)
        buf = torch.empty(((j1 - j0) * rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
        works = []
        for j in range(j0, j1):
            part = buf[(j - j0) * rows : (j - j0 + 1) * rows]
            if j == rank:
                part.copy_(x)
            src = dist.get_global_rank(group, j)
            works.append(dist.broadcast(part, src=src, group=group, async_op=True))
        return j0, buf, works

    pending = start(0)
    while pending is not None:
        j0, buf, works = pending
        for work in works:
            work.wait()
        nxt = j0 + per_step
        pending = start(nxt) if nxt < size else None
        yield j0, buf


class _AllGatherCat(torch.autograd.Function):
    """y = cat_r x_r over the group; backward: dx_r = (sum_r' dy_r')[rows of r]."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup | None) -> Tensor:  # type: ignore[override]
        ctx.group = group
        return gather_rows(x, group)

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        group = ctx.group
        if group is None or dist.get_world_size(group) == 1:
            return dy, None
        return _reduce_scatter_rows(dy, group), None


class _AllReduceSum(torch.autograd.Function):
    """y = sum_r x_r over the group; backward: dx_r = sum_r' dy_r' (all-reduce of the grads)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: ProcessGroup | None) -> Tensor:  # type: ignore[override]
        ctx.group = group
        y = x.detach().clone()
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        group = ctx.group
        dx = dy.contiguous().clone()
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(dx, op=dist.ReduceOp.SUM, group=group)
        return dx, None


def all_gather_cat(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """y = cat_r x_r (dim 0, group-rank order); backward: reduce-scatter (all-reduce+slice)."""
    return _AllGatherCat.apply(x, group)


def all_reduce_sum(x: Tensor, group: ProcessGroup | None) -> Tensor:
    """y = sum_r x_r over ``group``; backward: dx = sum_r dy_r (all-reduce of the gradients)."""
    return _AllReduceSum.apply(x, group)
