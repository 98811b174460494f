"""Run metrics: throughput, TFLOPs/MFU, memory; JSONL + TensorBoard writers; a CPU peak probe."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

# Dense peak TFLOP/s per device (vendor spec sheets; bf16/fp16 tensor cores, fp32 non-tensor).
DEVICE_PEAK_TFLOPS = {
    "a100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "h100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "h200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
}


def matmul_peak_tflops(
    dtype: torch.dtype = torch.float32, n: int = 1024, repeats: int = 5
) -> float:
    """Measured dense GEMM TFLOP/s of this process (best of ``repeats`` n^3 matmuls)."""
    a = torch.randn(n, n, dtype=dtype)
    b = torch.randn(n, n, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best / 1e12


def device_peak_tflops(precision: str) -> tuple[float, str]:
    """(peak TFLOP/s, how it was obtained) for this process's accelerator and precision."""
    from megaclip.parallel.runtime import accelerator

    acc = accelerator()
    if acc.device_name() == "cpu":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.bfloat16}.get(precision, torch.float32)
        return matmul_peak_tflops(dtype), "cpu matmul probe"
    name = torch.cuda.get_device_name().lower() if torch.cuda.is_available() else ""
    for key, table in DEVICE_PEAK_TFLOPS.items():
        if key in name:
            return table[precision], f"{key} spec sheet"
    return float("nan"), f"unknown device {name!r}"


def peak_memory_gib() -> float:
    """Peak memory of this rank: accelerator allocations, or the process's max RSS on CPU."""
    from megaclip.parallel.runtime import accelerator

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
