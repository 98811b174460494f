"""This process's accelerator and device (below collectives and runtime, which both use them)."""

from __future__ import annotations

import os

import torch


def accelerator():
    """DeepSpeed's accelerator abstraction (CPU here, CUDA on GPU nodes); never hard-code 'cuda'."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator()


def device() -> torch.device:
    """This process's compute device as chosen by the accelerator."""
    acc = accelerator()
    if acc.device_name() == "cpu":
        return torch.device("cpu")
    return torch.device(acc.device_name(), int(os.environ.get("LOCAL_RANK", "0")))
