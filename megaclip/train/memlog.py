"""Per-rank memory by phase of a run (build, resume, steps, save, zero-shot, export).

What is measured is what runs out: accelerator allocations on a GPU (``max_memory_allocated``),
the process's resident set on a CPU (``VmRSS`` / ``VmHWM``, the peak reset at every phase:
megaclip.train.host). Each rank writes ``<out_dir>/memory/rank_<r>.json``;
``megaclip plan --run <out_dir>`` prints it next to the planner's prediction
(megaclip.train.memory_report).
"""

from __future__ import annotations

import contextlib
import json
import resource
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from megaclip.train.host import reset_rss_peak, status_kib

GIB = 2**30
MEMORY_DIR = "memory"


def _accelerator():
    from megaclip.parallel.device import accelerator

    acc = accelerator()
    return None if acc.device_name() == "cpu" else acc


def current_bytes() -> int:
    """Bytes in use now: accelerator allocations, else the resident set."""
    acc = _accelerator()
    if acc is not None:
        return int(acc.memory_allocated())
    kib = status_kib("VmRSS")
    return 0 if kib is None else kib * 1024


def peak_bytes() -> int:
    """Peak bytes since the last :func:`reset_peak` (process start if never reset)."""
    acc = _accelerator()
    if acc is not None:
        return int(acc.max_memory_allocated())
    kib = status_kib("VmHWM")
    if kib is None:  # not Linux: the lifetime peak
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024
    return kib * 1024


def reset_peak() -> None:
    """Start a new peak window (accelerator stats, or Linux's resident-set high-water mark)."""
    acc = _accelerator()
    if acc is not None:
        acc.reset_peak_memory_stats()
        return
    reset_rss_peak()


class PhaseLog:
    """Peak and end-of-phase memory of this rank for each named phase of a run."""

    def __init__(self) -> None:
        self.phases: list[dict[str, Any]] = []
        self.lifetime_peak = 0
        reset_peak()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Measure the body as phase ``name`` (phases of one name are merged: max peak)."""
        start = current_bytes()
        reset_peak()
        try:
            yield
        finally:
            peak = max(peak_bytes(), start)
            self.lifetime_peak = max(self.lifetime_peak, peak)
            for p in self.phases:
                if p["phase"] == name:
                    p["peak_gib"] = max(p["peak_gib"], peak / GIB)
                    p["end_gib"] = current_bytes() / GIB
                    break
            else:
                record = {"phase": name, "start_gib": start / GIB, "peak_gib": peak / GIB}
                record["end_gib"] = current_bytes() / GIB
                self.phases.append(record)

    def as_dict(self, rank: int, coords: dict[str, int]) -> dict[str, Any]:
        kind = "accelerator" if _accelerator() is not None else "rss"
        peak = max([self.lifetime_peak, *(p["peak_gib"] * GIB for p in self.phases)])
        return {
            "rank": rank,
            "coords": coords,
            "measure": kind,
            "peak_gib": peak / GIB,
            "phases": self.phases,
        }

    def write(self, out_dir: str | Path, rank: int, coords: dict[str, int]) -> Path:
        """Write ``out_dir/memory/rank_<rank>.json``."""
        path = Path(out_dir) / MEMORY_DIR / f"rank_{rank:05d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_dict(rank, coords), indent=1) + "\n", encoding="utf-8")
        return path


def read_run_memory(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every rank's record of a run directory, in rank order (empty if none were written)."""
    root = Path(out_dir) / MEMORY_DIR
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(root.glob("rank_*.json"))]
