"""Measured model-state memory: the tensors a DeepSpeed engine and its optimizer hold.

:func:`state_tensors` walks the module's parameters (and ZeRO-3 partitions), their gradients,
and every tensor reachable from the optimizer object (DeepSpeed's ZeRO wrappers keep flat
buffers, fp32 master partitions and gradient partitions as attributes; the wrapped torch AdamW
keeps ``exp_avg``/``exp_avg_sq`` in ``state``). Each *storage* is counted once, in the first
category that reaches it, in this order:

    params     module parameters (their flat buffers; ZeRO-3: ``ds_tensor`` partitions)
    grads      ``.grad`` of module parameters and of fp32 master partitions, and optimizer
               attributes whose name contains "grad" (partition / accumulation buffers)
    optimizer  tensors in the torch optimizer's ``state`` (Adam moments; the ``step`` counters)
               and fp32 master partitions (attributes whose name contains "fp32")
    other      anything else the optimizer holds (communication buckets, scratch buffers)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from megaclip.parallel.deepspeed_compat import zero3_partition_tensor

CATEGORIES = ("params", "grads", "optimizer", "other")
_SKIP_TYPES = (nn.Module, str, bytes, int, float, bool, type(None))


@dataclass(frozen=True)
class StateCount:
    """Bytes of unique storages per category (see module docstring) and how many tensors."""

    params: int
    grads: int
    optimizer: int
    other: int
    tensors: int

    @property
    def total(self) -> int:
        """params + grads + optimizer (the model states; 'other' excluded)."""
        return self.params + self.grads + self.optimizer

    def as_dict(self) -> dict[str, int]:
        """The categories, their total and the tensor count."""
        return {
            "params": self.params,
            "grads": self.grads,
            "optimizer": self.optimizer,
            "other": self.other,
            "total": self.total,
            "tensors": self.tensors,
        }


def _walk(obj: object, path: str, depth: int, seen: set[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """(attribute path, tensor) for every tensor reachable from ``obj`` (not through modules)."""
    if depth > 6 or id(obj) in seen:
        return
    if isinstance(obj, torch.Tensor):
        seen.add(id(obj))
        yield path, obj
        if obj.grad is not None:
            yield path + ".grad", obj.grad
        return
    if isinstance(obj, _SKIP_TYPES) or callable(obj) and not hasattr(obj, "__dict__"):
        return
    seen.add(id(obj))
    if isinstance(obj, dict):
        for k, v in list(obj.items()):
            yield from _walk(
                v, f"{path}[{k if isinstance(k, str | int) else '*'}]", depth + 1, seen
            )
    elif isinstance(obj, list | tuple | set):
        for i, v in enumerate(list(obj)):
            yield from _walk(v, f"{path}[{i}]", depth + 1, seen)
    elif hasattr(obj, "__dict__") and type(obj).__module__.split(".")[0] in ("deepspeed", "torch"):
        for k, v in list(vars(obj).items()):
            if isinstance(v, torch.distributed.ProcessGroup):
                continue
            yield from _walk(v, f"{path}.{k}", depth + 1, seen)


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    if t.device.type == "meta":  # shape-only placeholders hold no memory
        return None
    s = t.untyped_storage()
    if s.nbytes() == 0:
        return None
    return (s.data_ptr(), s.nbytes())


def _inner_optimizer(optimizer: object) -> torch.optim.Optimizer | None:
    """The torch optimizer a DeepSpeed wrapper holds (or ``optimizer`` itself)."""
    if isinstance(optimizer, torch.optim.Optimizer) and not hasattr(optimizer, "optimizer"):
        return optimizer
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else None


def state_tensors(module: nn.Module, optimizer: object) -> dict[str, list[tuple[str, int]]]:
    """Unique storages by category: {category: [(first path, bytes), ...]}."""
    found: dict[str, list[tuple[str, int]]] = {c: [] for c in CATEGORIES}
    counted: set[tuple[int, int]] = set()

    def add(category: str, path: str, t: torch.Tensor) -> None:
        key = _storage_key(t)
        if key is None or key in counted:
            return
        counted.add(key)
        found[category].append((path, key[1]))

    params = list(module.parameters())
    for i, p in enumerate(params):
        add("params", f"param[{i}]", p)
        ds = zero3_partition_tensor(p)
        if isinstance(ds, torch.Tensor):
            add("params", f"param[{i}].ds_tensor", ds)
    for i, p in enumerate(params):
        if p.grad is not None:
            add("grads", f"param[{i}].grad", p.grad)
    inner = _inner_optimizer(optimizer)
    if inner is not None:
        # The tensors the torch optimizer updates: module parameters (already counted) or
        # DeepSpeed's fp32 master partitions (optimizer state in the ZeRO accounting).
        for j, group in enumerate(inner.param_groups):
            for k, p in enumerate(group["params"]):
                add("optimizer", f"master[{j}][{k}]", p)
                if p.grad is not None:
                    add("grads", f"master[{j}][{k}].grad", p.grad)
        for j, (_, st) in enumerate(inner.state.items()):
            for k, v in st.items():
                if isinstance(v, torch.Tensor):
                    add("optimizer", f"state[{j}].{k}", v)
    seen: set[int] = {id(p) for p in params}
    for path, t in _walk(optimizer, "opt", 0, seen):
        name = path.lower()
        if name.endswith(".grad") or "grad" in name.rsplit(".", 1)[-1] or ".grad" in name:
            add("grads", path, t)
        elif "fp32" in name or "master" in name:
            add("optimizer", path, t)
        elif "bit16" in name or "fp16" in name or "lp_param" in name:
            add("params", path, t)
        else:
            add("other", path, t)
    return found


def count_state(module: nn.Module, optimizer: object) -> StateCount:
    """Bytes per category of :func:`state_tensors` (unique storages)."""
    found = state_tensors(module, optimizer)
    sums = {c: sum(b for _, b in found[c]) for c in CATEGORIES}
    n = sum(len(v) for v in found.values())
    return StateCount(sums["params"], sums["grads"], sums["optimizer"], sums["other"], n)
