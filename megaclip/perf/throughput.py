"""Throughput formulas: samples/s, model/hardware TFLOPs per device, MFU, HFU, bubbles.

What a measured step time means (megaclip.bench measures it, ``megaclip train`` logs its MFU).

Conventions (docs/benchmarks.md):
- model FLOPs per sample = 6 x forward MACs (:func:`megaclip.model.flops.model_cost`), whatever
  the layout: MFU = achieved model FLOP/s per device / peak FLOP/s of one device;
- hardware FLOPs per sample = (6 + 2 r + 2 g) x MACs, r = 1 with activation checkpointing
  (one more forward), g = 1 when a no-grad feature pass runs (PP > 1 with
  ``parallel.schedule: recompute``; the "keep" schedule has none):
  HFU = hardware FLOP/s per device / peak;
- the loss (O(N^2 E) per step) and element-wise work are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from megaclip.pipeline.partition import bubble_fraction


def hardware_flops_factor(recompute: bool, pp: int, schedule: str = "keep", accum: int = 1) -> int:
    """FLOPs executed per MAC of one forward: 6, +2 with recompute, +2 for a feature pass.

    The "recompute" schedule runs the feature pass unless PP = 1 with one micro-batch (the same
    single pass then).
    """
    feature_pass = schedule == "recompute" and (pp > 1 or accum > 1)
    return 6 + (2 if recompute else 0) + (2 if feature_pass else 0)


@dataclass(frozen=True)
class Throughput:
    """Throughput of one timed run and its efficiency against a per-device peak."""

    samples_per_s: float
    samples_per_s_per_device: float
    model_tflops_per_device: float
    hardware_tflops_per_device: float
    mfu: float | None
    hfu: float | None

    def as_dict(self) -> dict[str, float | None]:
        """The fields as a JSON-ready dict."""
        return {
            "samples_per_s": self.samples_per_s,
            "samples_per_s_per_device": self.samples_per_s_per_device,
            "model_tflops_per_device": self.model_tflops_per_device,
            "hardware_tflops_per_device": self.hardware_tflops_per_device,
            "mfu": self.mfu,
            "hfu": self.hfu,
        }


def throughput(
    global_batch: int,
    step_time_s: float,
    devices: int,
    macs_per_sample: float,
    peak_flops_per_device: float | None,
    *,
    recompute: bool = False,
    pp: int = 1,
    schedule: str = "keep",
    accum: int = 1,
) -> Throughput:
    """samples/s = N / t; model TFLOP/s per device = 6 MACs N / (t D); MFU = that / peak.

    HFU uses :func:`hardware_flops_factor` instead of 6. ``peak_flops_per_device`` in FLOP/s
    (None: MFU/HFU are None).
    """
    if step_time_s <= 0 or devices < 1:
        raise ValueError(f"need step_time_s > 0 and devices >= 1, got {step_time_s}, {devices}")
    sps = global_batch / step_time_s
    model = 6.0 * macs_per_sample * sps / devices
    factor = hardware_flops_factor(recompute, pp, schedule, accum)
    hardware = factor * macs_per_sample * sps / devices
    peak = peak_flops_per_device if peak_flops_per_device and peak_flops_per_device > 0 else None
    return Throughput(
        samples_per_s=sps,
        samples_per_s_per_device=sps / devices,
        model_tflops_per_device=model / 1e12,
        hardware_tflops_per_device=hardware / 1e12,
        mfu=model / peak if peak else None,
        hfu=hardware / peak if peak else None,
    )


def analytic_bubble(pp: int, micro_batches: int) -> float:
    """Idle fraction of a synchronous P-stage schedule with m micro-batches: (P-1)/(m+P-1)."""
    return bubble_fraction(pp, micro_batches)


def measured_bubble(wait_s: float, step_s: float) -> float:
    """Fraction of a step a stage spent blocked in pipeline send/recv: wait / step (in [0, 1])."""
    if step_s <= 0:
        raise ValueError(f"step time must be > 0, got {step_s}")
    return min(1.0, max(0.0, wait_s / step_s))


def matmul_flops(m: int, n: int, k: int) -> int:
    """FLOPs of one [m, k] x [k, n] matrix product: 2 m n k."""
    return 2 * m * n * k


def median(values: list[float]) -> float:
    """Median of a non-empty list (mean of the two middle values for an even count)."""
    if not values:
        raise ValueError("median of an empty list")
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else 0.5 * (s[mid - 1] + s[mid])
