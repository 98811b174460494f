"""AdamW parameter groups and the warmup + cosine learning-rate schedule (open_clip's recipe)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from megaclip.parallel.deepspeed_compat import replace_overflow_scan

_NO_DECAY_NAMES = ("embedding", "class_embedding", "logit_scale", "logit_bias")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Gains, biases, embeddings and the temperature get no weight decay (as in open_clip).

    ZeRO-3 parameters are judged by their full shape (``ds_shape``), not their empty storage.
    """
    ndim = len(getattr(param, "ds_shape", param.shape))
    return ndim < 2 or any(key in name for key in _NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices, and everything :func:`no_weight_decay` exempts."""
    decay, keep = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (keep if no_weight_decay(name, param) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    groups.append({"params": keep, "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def lr_at(step: int, base_lr: float, warmup_steps: int, total_steps: int, min_lr: float) -> float:
    """Linear warmup to ``base_lr`` over ``warmup_steps``, then cosine decay to ``min_lr``."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))


def non_finite_flag(tensors: list[torch.Tensor]) -> torch.Tensor:
    """1.0 when any element of ``tensors`` is NaN or infinite, else 0.0: a 0-dim float32 tensor
    on their device, from one fused reduction (no host synchronisation).

    Per-tensor L1 norms (``torch._foreach_norm``, accumulated in float32) then one sum: NaN and
    infinity propagate through sums, so the sum is finite exactly when every element is (a sum
    above float32's range, ~3e38, also counts as non-finite: such gradients are unusable).
    """
    if not tensors:
        return torch.zeros((), dtype=torch.float32)
    norms = torch._foreach_norm(tensors, ord=1, dtype=torch.float32)
    total = torch.stack([n.to(tensors[0].device) for n in norms]).sum()
    return (~torch.isfinite(total)).float()


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips the whole step when any gradient on any rank is non-finite.

    For engines that call the optimizer directly (ZeRO-0; under fp16/bf16 it is the inner
    optimizer of DeepSpeed's wrapper, which checks first). It sets ``overflow`` the way
    DeepSpeed's own optimizers do, so the engine counts the skipped step and does not advance
    the learning-rate schedule. ZeRO-1/2/3 optimizers run their own check. The check
    is one fused reduction, one all-reduce (on the gradients' device) and one host read per
    step, whatever the number of parameters.
    """

    overflow = False

    def step(self, closure=None):  # type: ignore[override]
        from megaclip.parallel import collectives

        grads = [p.grad for group in self.param_groups for p in group["params"]]
        grads = [g for g in grads if g is not None]
        dev = grads[0].device if grads else collectives.comm_device()
        flag = non_finite_flag(grads) if grads else torch.zeros((), device=dev)
        collectives.all_reduce(flag, "max")  # on the gradients' device; every rank skips together
        self.overflow = bool(flag.item())
        if self.overflow:
            return None
        return super().step(closure)


def fuse_overflow_check(ds_optimizer) -> bool:
    """Replace the per-parameter overflow scan of DeepSpeed's fp16/bf16 ZeRO-0 optimizer wrapper
    (``CheckOverflow.has_overflow_serial``: one host read per parameter) by
    :func:`non_finite_flag` (one); its all-reduce logic is kept. Whether it applied.
    """

    def has_overflow_serial(params) -> bool:
        grads = [p.grad.data for p in params if p.grad is not None]
        return bool(non_finite_flag(grads).item())

    return replace_overflow_scan(ds_optimizer, has_overflow_serial)


def build_optimizer(
    params: Iterable[dict],
    lr: float,
    betas: tuple[float, float] = (0.9, 0.98),
    eps: float = 1e-6,
    guard_non_finite: bool = False,
) -> torch.optim.Optimizer:
    """torch's fused AdamW (no JIT build, any accelerator); guarded for ZeRO-0 (see above)."""
    cls = GuardedAdamW if guard_non_finite else torch.optim.AdamW
    return cls(list(params), lr=lr, betas=betas, eps=eps, fused=True)
