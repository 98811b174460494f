"""Peak dense BF16 tensor-core throughput of the GPUs `megaclip scaling predict` can cost runs on.

The parallelism planner (`megaclip plan`) may later own the device table; this small copy should
then import from it. Figures: vendor datasheets, dense (no 2:4 sparsity) BF16, SXM parts:
A100 312 TFLOP/s, H100 989 TFLOP/s, H200 989 TFLOP/s (same tensor cores as H100, more memory).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

from megaclip.errors import ConfigError


@dataclass(frozen=True)
class Device:
    """One accelerator: display name and dense BF16 peak in FLOP/s."""

    name: str
    peak_bf16_flops: float


DEVICES = MappingProxyType(
    {
        "a100": Device("NVIDIA A100 SXM", 312e12),
        "h100": Device("NVIDIA H100 SXM", 989e12),
        "h200": Device("NVIDIA H200 SXM", 989e12),
    }
)


def get_device(name: str) -> Device:
    """The device called ``name`` (case-insensitive), or a ConfigError listing the known ones."""
    key = name.strip().lower()
    if key not in DEVICES:
        raise ConfigError(f"unknown device '{name}'; known: {', '.join(DEVICES)}.")
    return DEVICES[key]


def gpu_hours(flops: float, device: Device, mfu: float) -> float:
    """GPU-hours to execute ``flops`` model FLOPs: flops / (peak x mfu) / 3600."""
    if not 0.0 < mfu <= 1.0:
        raise ConfigError(f"MFU must be in (0, 1], got {mfu}; e.g. --mfu 0.4 for 40%.")
    if flops <= 0:
        raise ConfigError(f"compute must be positive, got {flops} FLOPs.")
    return flops / (device.peak_bf16_flops * mfu) / 3600.0
