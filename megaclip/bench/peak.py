"""Peak matmul FLOP/s of one device: a datasheet table for GPUs, a measured GEMM probe on CPU.

GPU peaks (dense, TFLOP/s; NVIDIA datasheets) are taken from ``megaclip.perf.devices`` when that
module is present, else from :data:`GPU_PEAK_TFLOPS` below (the same numbers):

    A100 SXM: bf16/fp16 312, tf32 156, fp32 19.5
    H100 SXM / H200: bf16/fp16 989.4, tf32 494.7, fp32 66.9

On CPU there is no trustworthy datasheet figure for a shared virtual machine, so the peak is
*measured*: the best of a few ``[n, n] @ [n, n]`` products (2 n^3 FLOPs each) in the benchmark's
dtype, in the same process and with the same thread count as the training steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from megaclip.bench.formulas import matmul_flops

#: Dense peaks per GPU family in TFLOP/s: precision -> value ("fp32" = without TF32).
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "A100": {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5},
    "H100": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
    "H200": {"bf16": 989.4, "fp16": 989.4, "tf32": 494.7, "fp32": 66.9},
}

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Peak:
    """A per-device peak in FLOP/s and where it came from ("table:<name>" or "probe:<n>").

    ``cpu_flops`` (probes on CPU only): the same GEMMs timed in process CPU time, i.e. what the
    cores deliver while this process actually runs (robust to a shared machine's scheduling).
    """

    flops: float
    source: str
    cpu_flops: float | None = None


def torch_dtype(precision: str) -> torch.dtype:
    """torch dtype of a precision name ('fp32', 'bf16', 'fp16')."""
    try:
        return _DTYPES[precision]
    except KeyError:
        raise ValueError(f"unknown precision {precision!r}; valid: {', '.join(_DTYPES)}") from None


def _family(device_name: str) -> str | None:
    name = device_name.upper()
    for family in ("H200", "H100", "A100"):
        if family in name:
            return family
    return None


def table_peak(device_name: str, precision: str, tf32: bool = True) -> Peak | None:
    """Datasheet peak of a GPU whose name contains A100/H100/H200 (None if unknown).

    fp32 uses the TF32 tensor-core figure when ``tf32`` (torch's matmul TF32 switch) is on.
    """
    family = _family(device_name)
    if family is None:
        return None
    key = precision if precision != "fp32" else ("tf32" if tf32 else "fp32")
    try:  # the planner's device table, when that package is installed alongside
        from megaclip.perf.devices import DEVICES  # type: ignore[import-not-found]

        for dev in DEVICES.values():
            if dev.name.upper().startswith(family):
                return Peak(dev.peak_flops(precision, tf32=tf32), f"table:megaclip.perf:{dev.name}")
    except ImportError:
        pass
    return Peak(GPU_PEAK_TFLOPS[family][key] * 1e12, f"table:{family}:{key}")


def probe_matmul(
    precision: str,
    size: int = 2048,
    repeats: int = 5,
    device: torch.device | str = "cpu",
    min_seconds: float = 0.0,
) -> Peak:
    """Best measured FLOP/s of a square GEMM of ``size`` in ``precision`` on ``device``.

    One warm-up product, then ``repeats`` timed ones (at least ``min_seconds`` in total); the
    fastest counts (the machine's capability, not its average load).
    """
    dtype = torch_dtype(precision)
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    sync = _synchronizer(torch.device(device))
    torch.mm(a, b)
    sync()
    best = best_cpu = float("inf")
    start = time.perf_counter()
    done = 0
    while done < repeats or time.perf_counter() - start < min_seconds:
        t0, c0 = time.perf_counter(), time.process_time()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
        done += 1
    flops = matmul_flops(size, size, size)
    cpu = flops / best_cpu if torch.device(device).type == "cpu" and best_cpu > 0 else None
    return Peak(flops / best, f"probe:{precision}:{size}^3", cpu)


def _synchronizer(device: torch.device):
    if device.type == "cpu":
        return lambda: None
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().synchronize


def device_peak(
    precision: str, device: torch.device, *, probe_size: int = 2048, probe_repeats: int = 5
) -> Peak:
    """Per-device peak for ``precision``: the GPU table when the device is known, else a probe."""
    if device.type != "cpu":
        from deepspeed.accelerator import get_accelerator

        name = get_accelerator().device_name(device.index)
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
        tf32 = bool(torch.backends.cuda.matmul.allow_tf32) if device.type == "cuda" else False
        peak = table_peak(name, precision, tf32=tf32)
        if peak is not None:
            return peak
    return probe_matmul(precision, probe_size, probe_repeats, device)
