"""Process start-up and shutdown shared by every entry point (train, tests, benchmarks)."""

from __future__ import annotations

import contextlib
import os
import random
import socket
import sys
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from megaclip.parallel.device import accelerator, device


def pin_memory_default() -> bool:
    """Whether host batches should be pinned: only when the accelerator is not the CPU (pinned
    pages make host-to-device copies asynchronous; on CPU they only cost locked memory)."""
    return device().type != "cpu"


def host_to_device(
    batches: Sequence[tuple[torch.Tensor, ...]], dev: torch.device
) -> list[tuple[torch.Tensor, ...]]:
    """Copy each micro-batch's tensors to ``dev`` without blocking the host.

    From pinned memory (the loader pins when :func:`pin_memory_default`) the copies overlap
    with the host's work; the stream orders them before the kernels that read them.
    """
    return [tuple(t.to(dev, non_blocking=True) for t in mb) for mb in batches]


def tf32_enabled_by_env() -> bool:
    """TF32 for fp32 matmuls unless MEGACLIP_TF32=0 (exactness checks against fp32 references)."""
    return os.environ.get("MEGACLIP_TF32", "1") != "0"


def configure_backends(precision: str) -> dict[str, bool]:
    """The one place that sets torch's matmul and attention backends for a run; returns them.

    - fp32: TF32 tensor cores for matmuls and convolutions (``allow_tf32``; the default is off
      in torch), unless MEGACLIP_TF32=0;
    - every precision: SDPA's flash and memory-efficient kernels allowed (they serve bf16 and
      fp16; megaclip's attention calls ``F.scaled_dot_product_attention`` with ``is_causal``
      and no mask, which both kernels accept), the math fallback kept.
    Harmless on a CPU-only build (the flags are global switches).
    """
    tf32 = precision == "fp32" and tf32_enabled_by_env()
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cuda.enable_flash_sdp(True)
    torch.backends.cuda.enable_mem_efficient_sdp(True)
    torch.backends.cuda.enable_math_sdp(True)
    return {
        "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "flash_sdp": bool(torch.backends.cuda.flash_sdp_enabled()),
        "mem_efficient_sdp": bool(torch.backends.cuda.mem_efficient_sdp_enabled()),
    }


def seed_training_rng(seed: int, dp_rank: int) -> None:
    """Seed torch (every device), python and numpy from (seed, DP rank).

    The training-time random numbers (FLIP patch dropout) then depend on the run's seed and
    the DP rank only: the same in every run, and the same on the TP and PP ranks of one model
    replica, which must drop the same patches.
    """
    value = (int(seed) * 1_000_003 + int(dp_rank)) % 2**63
    torch.manual_seed(value)
    random.seed(value)
    np.random.seed(value % 2**32)


def rng_state() -> dict[str, Any]:
    """This process's RNG states: torch CPU, accelerator (if not CPU), python, numpy."""
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    acc = accelerator()
    if acc.device_name() != "cpu":
        state["accelerator"] = acc.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "accelerator" in state:
        accelerator().set_rng_state(state["accelerator"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tune_host_allocator() -> bool:
    """CPU runs: glibc returns freed blocks >= 1 MiB to the kernel at once; whether it applied.

    glibc's default *dynamic* mmap threshold rises to the size of freed blocks (up to 32 MiB),
    after which such blocks are recycled inside its heap and never given back: measured on a
    ViT-L-14 ZeRO-3 rank, +0.8 GiB of resident memory that no tensor held. A fixed threshold
    keeps the resident set equal to live memory (what the planner predicts). Off with
    MEGACLIP_MALLOC_TUNING=0; a no-op where glibc's mallopt is absent.
    """
    if os.environ.get("MEGACLIP_MALLOC_TUNING", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok = libc.mallopt(m_mmap_threshold, 1 << 20) == 1
        return ok and libc.mallopt(m_trim_threshold, 8 << 20) == 1
    except (OSError, AttributeError):
        return False


def init_distributed(timeout_s: float = 600.0) -> tuple[int, int]:
    """Initialise torch.distributed from launcher env vars (torchrun / deepspeed / SLURM).

    Returns (rank, world_size). The backend is the accelerator's (gloo on CPU, nccl on CUDA).
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ and "SLURM_PROCID" in os.environ:
        os.environ["RANK"] = os.environ["SLURM_PROCID"]
        os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
        os.environ.setdefault("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        # A launcher always sets it; a lone process takes any free port (29500 may be busy).
        os.environ["MASTER_PORT"] = (
            str(_free_port()) if os.environ["WORLD_SIZE"] == "1" else "29500"
        )
    acc = accelerator()
    if acc.device_name() != "cpu":
        acc.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        tune_host_allocator()
    import deepspeed

    deepspeed.init_distributed(
        dist_backend=acc.communication_backend_name(),
        timeout=timedelta(seconds=timeout_s),
        verbose=False,
    )
    return dist.get_rank(), dist.get_world_size()


def clean_exit(code: int = 0) -> None:
    """Barrier, flush and leave without interpreter teardown.

    gloo worker threads can abort the interpreter at exit ("terminate called without an active
    exception", about 1 run in 10); skipping teardown after a barrier avoids it.
    """
    if dist.is_initialized():
        from megaclip.parallel.collectives import barrier

        # A peer already gone must not turn this rank's success into a failure.
        with contextlib.suppress(Exception):
            barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
