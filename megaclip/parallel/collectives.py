"""Every torch.distributed collective megaclip makes goes through this module.

NCCL accepts only tensors on the accelerator; gloo accepts CPU tensors and so hides a misplaced
tensor on a CPU test machine. Two kinds of helper make placement right by construction:

- **device collectives** (:func:`all_reduce`, :func:`broadcast`, :func:`all_gather_cat`, ...)
  take tensors that already live where the group's backend wants them (the accelerator for
  NCCL, the CPU for gloo) and check it (:func:`check_placement`): a CPU tensor handed to a NCCL
  group fails here with a clear message on the first try;
- **host helpers** (:func:`host_all_reduce`, :func:`host_broadcast`) take host-side values (CPU
  tensors, e.g. counters), move them to the group's device and back: one transfer each way;
- **bookkeeping** (:func:`barrier`, :func:`all_gather_object`, :func:`broadcast_object`) runs on
  the *host group*: one gloo group over all ranks, created once by
  :class:`megaclip.parallel.topology.Topology` (:func:`create_host_group`). Barriers and small
  pickled objects then cost no device memory, no device synchronisation and no NCCL
  watchdog time while a rank does long host work (a checkpoint fsync, an export). Where the
  default backend is already gloo, the host group is the default group.

DeepSpeed's and megatron-core's internal collectives are theirs. tests/test_collectives_ast.py
fails when a torch.distributed collective is called anywhere else in megaclip.

The differentiable collectives below take the group as an argument and work on subgroups whose
global ranks differ from their group indices (e.g. the DP group {0, 2} under TP=2), where
``torch.distributed.nn.functional.all_gather`` fails in backward on gloo.

Gradient semantics (the adjoint of the global computation): when every rank of the group calls
``backward`` on its own output, the gradient that arrives at rank r's input is the sum over ranks r'
of the gradient of rank r''s output w.r.t. rank r's input. E.g. for ``y = all_reduce_sum(x)`` with
upstream gradient g on every rank, each rank receives ``size * g``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

ProcessGroup = dist.ProcessGroup

#: Backend of the host (bookkeeping) group.
HOST_BACKEND = "gloo"

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
_host: dict[str, Any] = {"group": None, "world": None}  # set once by create_host_group


def is_distributed() -> bool:
    """torch.distributed is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


# ---------------------------------------------------------------- placement


def backend_of(group: ProcessGroup | None = None) -> str:
    """The backend name of ``group`` (None: the default group), e.g. 'nccl' or 'gloo'."""
    return str(dist.get_backend(group)).lower()


def device_type_for(backend: str) -> str:
    """The device type a backend communicates from: 'cpu' for gloo, else the accelerator's."""
    if backend.lower() in ("gloo", "mpi"):
        return "cpu"
    from megaclip.parallel.device import device

    return device().type


def comm_device(group: ProcessGroup | None = None) -> torch.device:
    """Where tensors of collectives over ``group`` must live (this rank's accelerator or CPU)."""
    if not is_distributed() or device_type_for(backend_of(group)) == "cpu":
        return torch.device("cpu")
    from megaclip.parallel.device import device

    return device()


def check_placement(tensor: Tensor, backend: str) -> None:
    """Raise ValueError when ``tensor`` is not on the device type ``backend`` communicates from.

    NCCL rejects CPU tensors (and gloo accelerator tensors) with an error that names neither the
    tensor nor the call; this names both.
    """
    want = device_type_for(backend)
    if tensor.device.type != want:
        raise ValueError(
            f"a {tuple(tensor.shape)} {tensor.dtype} tensor on {tensor.device} was handed to a "
            f"{backend} collective, which needs it on {want}: use the host_* helpers of "
            "megaclip.parallel.collectives for host-side values"
        )


def _op(op: str):
    try:
        return _OPS[op]
    except KeyError:
        raise ValueError(f"unknown reduction {op!r}; valid: {', '.join(_OPS)}") from None


# ---------------------------------------------------------------- the host group


def create_host_group(timeout: timedelta | None = None) -> ProcessGroup | None:
    """Create (once per world) the gloo group over all ranks used for bookkeeping; collective.

    Every rank must call it at the same point (Topology's constructor does). Returns None when
    the default backend is gloo already (the default group serves).
    """
    world = (dist.get_world_size(), id(dist.group.WORLD))
    if _host["world"] == world:
        return _host["group"]
    group = None
    if backend_of(None) != HOST_BACKEND:
        kwargs = {"timeout": timeout} if timeout is not None else {}
        group = dist.new_group(backend=HOST_BACKEND, **kwargs)
    _host["group"], _host["world"] = group, world
    return group


def host_group() -> ProcessGroup | None:
    """The bookkeeping group (None: the default group, which is gloo or not yet paired)."""
    if not is_distributed() or _host["world"] != (dist.get_world_size(), id(dist.group.WORLD)):
        return None  # no Topology in this world yet: the default group
    return _host["group"]


def _bookkeeping(group: ProcessGroup | None) -> ProcessGroup | None:
    return host_group() if group is None else group


# ---------------------------------------------------------------- bookkeeping


def barrier(group: ProcessGroup | None = None) -> None:
    """Wait for every rank of ``group`` (None: all ranks, on the host group); no-op alone."""
    if is_distributed():
        dist.barrier(group=_bookkeeping(group))


def all_gather_object(obj: Any, group: ProcessGroup | None = None) -> list[Any]:
    """Every rank's picklable ``obj`` in group-rank order (None: all ranks, host group)."""
    if not is_distributed():
        return [obj]
    group = _bookkeeping(group)
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0, group: ProcessGroup | None = None) -> Any:
    """``obj`` of global rank ``src`` on every rank of ``group`` (None: all ranks, host group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_bookkeeping(group))
    return box[0]


# ---------------------------------------------------------------- device tensors


def all_reduce(tensor: Tensor, op: str = "sum", group: ProcessGroup | None = None) -> Tensor:
    """In-place reduction ('sum', 'max', 'min') of a tensor on the group's device; returns it."""
    if is_distributed():
        check_placement(tensor, backend_of(group))
        dist.all_reduce(tensor, op=_op(op), group=group)
    return tensor


def broadcast(tensor: Tensor, src: int, group: ProcessGroup | None = None) -> Tensor:
    """In place: global rank ``src``'s ``tensor`` on every rank of ``group``; returns it."""
    if is_distributed():
        check_placement(tensor, backend_of(group))
        dist.broadcast(tensor, src=src, group=group)
    return tensor


def last_rank(group: ProcessGroup | None) -> int:
    """Global rank of the last member of ``group`` (e.g. the last pipeline stage)."""
    if group is None:
        return dist.get_world_size() - 1 if is_distributed() else 0
    return dist.get_process_group_ranks(group)[-1]


# ---------------------------------------------------------------- host values


def host_all_reduce(
    values: Tensor | Sequence[float | int], op: str = "sum", group: ProcessGroup | None = None
) -> Tensor:
    """Reduce host-side values over ``group``: to the group's device, reduce, back (a CPU tensor).

    A list becomes a float64 tensor (int64 when every value is an int).
    """
    t = values if isinstance(values, Tensor) else torch.tensor(values)
    if not is_distributed():
        return t.clone()
    dev = comm_device(group)
    buf = t.to(dev, copy=True)
    all_reduce(buf, op, group)
    return buf.cpu()


def host_broadcast(values: Tensor, src: int, group: ProcessGroup | None = None) -> Tensor:
    """Global rank ``src``'s host-side ``values`` on every rank of ``group`` (a CPU tensor)."""
    if not is_distributed():
        return values.clone()
    buf = values.to(comm_device(group), copy=True)
    broadcast(buf, src, group)
    return buf.cpu()


def all_gather_list(tensor: Tensor, group: ProcessGroup | None) -> list[Tensor]:
    """[x_0, .., x_{n-1}]: every rank's equally shaped ``tensor`` over ``group`` (no autograd)."""
    if group is None or not is_distributed() or dist.get_world_size(group) == 1:
        return [tensor.detach().clone()]
    value = tensor.detach().contiguous()
    check_placement(value, backend_of(group))
    parts = [torch.empty_like(value) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, value, group=group)
    return parts


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
