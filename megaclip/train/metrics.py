"""Run metrics: device peak for MFU, peak memory, JSONL + TensorBoard writers."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any


def device_peak_tflops(precision: str) -> tuple[float, str]:
    """(peak TFLOP/s, source): the device table for known GPUs, else a matmul probe here."""
    from megaclip.bench.peak import device_peak
    from megaclip.parallel.runtime import device

    peak = device_peak(precision, device())
    return peak.flops / 1e12, peak.source


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
