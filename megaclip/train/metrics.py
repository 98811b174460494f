"""Run metrics: the device peak MFU divides by, peak memory, JSONL + TensorBoard writers.

The peak of a known GPU (A100 / H100 / H200 in its reported name) is its datasheet figure from
:mod:`megaclip.perf.devices`. On CPU there is no trustworthy datasheet figure for a shared
virtual machine, so the peak is *measured*: the best of a few ``[n, n] @ [n, n]`` products
(2 n^3 FLOPs each) in the run's dtype, in the same process and thread count as the training.
``megaclip bench`` uses the same two functions.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from megaclip.perf.devices import datasheet_peak
from megaclip.perf.throughput import matmul_flops

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


@cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (avx512_bf16 or amx_bf16 in /proc/cpuinfo);
    without it torch emulates bf16 matrix products about 100x slower than fp32 (AVX2 EPYC)."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_probe_size(precision: str, size: int) -> int:
    """The GEMM size of a CPU probe: at most 512 for bf16 where the CPU emulates it (six 2048^3
    emulated bf16 products took minutes on an AVX2 EPYC; 512^3 takes about a second)."""
    if precision == "bf16" and not cpu_has_native_bf16():
        return min(size, 512)
    return size


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
        found = datasheet_peak(name, precision, tf32=tf32)
        if found is not None:
            return Peak(*found)
    if device.type == "cpu":
        probe_size = cpu_probe_size(precision, probe_size)
    return probe_matmul(precision, probe_size, probe_repeats, device)


def device_peak_tflops(precision: str) -> tuple[float, str]:
    """(peak TFLOP/s, source): the device table for known GPUs, else a matmul probe here."""
    from megaclip.parallel.device import device

    peak = device_peak(precision, device())
    return peak.flops / 1e12, peak.source


def peak_memory_gib() -> float:
    """Peak memory of this rank: accelerator allocations, or the process's max RSS on CPU."""
    from megaclip.parallel.device import accelerator

    acc = accelerator()
    if acc.device_name() != "cpu":
        return acc.max_memory_allocated() / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform != "darwin" else rss / 2**30


class MetricsWriter:
    """Rank 0's metrics sink: one JSON object per line, mirrored to TensorBoard when available."""

    def __init__(self, out_dir: Path, tensorboard: bool) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        self._file = self.path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(out_dir / "tensorboard"))
            except Exception:  # noqa: BLE001 - tensorboard is optional
                self._tb = None

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = record.get("step", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
