"""Predict the metric of a (model, samples seen) run from a ScalingFit; cost it in GPU-hours."""

from __future__ import annotations

from dataclasses import dataclass

from megaclip.config.model import ClipConfig, load_preset
from megaclip.errors import ConfigError, DataError
from megaclip.model.flops import model_cost
from megaclip.perf.devices import Device
from megaclip.scaling.fit import GroupFit, ScalingFit
from megaclip.scaling.results import canonical_model_name, format_count


@dataclass(frozen=True)
class Prediction:
    """Metric (percent) predicted by a group's compute frontier at C = flops/sample x samples."""

    model: str
    samples_seen: float
    flops_per_sample: float
    group: str
    group_dataset_size: float | None
    value: float
    low: float
    high: float
    level: float
    rmse: float
    max_fitted_compute: float
    notes: tuple[str, ...]

    @property
    def compute(self) -> float:
        """Training compute in FLOPs."""
        return self.flops_per_sample * self.samples_seen

    @property
    def extrapolation(self) -> float:
        """Compute relative to the largest fitted compute (> 1 means extrapolating)."""
        return self.compute / self.max_fitted_compute


def gpu_hours(flops: float, device: Device, mfu: float) -> float:
    """GPU-hours to execute ``flops`` model FLOPs: flops / (peak bf16 x mfu) / 3600."""
    if not 0.0 < mfu <= 1.0:
        raise ConfigError(f"MFU must be in (0, 1], got {mfu}; e.g. --mfu 0.4 for 40%.")
    if flops <= 0:
        raise ConfigError(f"compute must be positive, got {flops} FLOPs.")
    return flops / (device.peak_bf16_flops * mfu) / 3600.0


@dataclass(frozen=True)
class Cost:
    """GPU time for a training compute on one device kind at a stated MFU."""

    flops: float
    device: Device
    mfu: float

    @property
    def gpu_hours(self) -> float:
        """flops / (peak bf16 x mfu) in hours."""
        return gpu_hours(self.flops, self.device, self.mfu)


def select_group(
    fit: ScalingFit, dataset: str | None = None, dataset_size: float | None = None
) -> tuple[GroupFit, tuple[str, ...]]:
    """The group to predict from: by name, by dataset size (lower bound if unfitted), or largest."""
    if dataset is not None and dataset_size is not None:
        raise ConfigError("give either --dataset or --dataset-size, not both.")
    if dataset is not None:
        return fit.group(dataset), ()
    sized = sorted((g for g in fit.groups if g.dataset_size), key=lambda g: g.dataset_size)
    if dataset_size is None:
        if len(fit.groups) == 1:
            return fit.groups[0], ()
        if not sized:
            names = ", ".join(g.name for g in fit.groups)
            raise ConfigError(f"several fitted datasets ({names}); choose one with --dataset.")
        return sized[-1], (f"using the largest fitted dataset, {sized[-1].name}",)
    if dataset_size <= 0:
        raise ConfigError(f"dataset size must be positive, got {dataset_size}.")
    for g in sized:
        if abs(g.dataset_size / dataset_size - 1.0) < 1e-6:
            return g, ()
    below = [g for g in sized if g.dataset_size < dataset_size]
    if not below:
        known = ", ".join(f"{g.name} ({format_count(g.dataset_size)})" for g in sized) or "none"
        raise DataError(
            f"no fit for a dataset of {format_count(dataset_size)} samples and none smaller to "
            "bound it; "
            f"fitted sizes: {known}. Add results on such a dataset with --fit-from."
        )
    g = below[-1]
    return g, (
        f"no fit at dataset size {format_count(dataset_size)}; using {g.name} "
        f"({format_count(g.dataset_size)}), the largest fitted size below it: a lower-bound "
        "estimate if more unique data does not lower the metric at fixed compute (as in every "
        "model x samples pair of the shipped openCLIP table)",
    )


def predict(
    fit: ScalingFit,
    model: str | ClipConfig,
    samples_seen: float,
    *,
    dataset: str | None = None,
    dataset_size: float | None = None,
) -> Prediction:
    """Frontier prediction of the metric for ``model`` trained on ``samples_seen`` samples."""
    if samples_seen <= 0:
        raise ConfigError(f"samples seen must be positive, got {samples_seen}.")
    cfg = model if isinstance(model, ClipConfig) else load_preset(canonical_model_name(model))
    flops = float(model_cost(cfg).train_flops)
    group, notes = select_group(fit, dataset, dataset_size)
    cfit = group.compute_fit
    compute = flops * samples_seen
    lo, hi = cfit.error_interval(compute)
    notes = list(notes)
    top = group.max_compute
    low_c = min(p.compute for p in group.fitted)
    if compute > top:
        notes.append(f"extrapolates {compute / top:.1f}x beyond the largest fitted compute")
    elif compute < low_c:
        notes.append(f"{low_c / compute:.1f}x below the smallest fitted compute")
    notes.append(
        "the frontier gives the best metric reachable at this compute; a model/samples split "
        "off the compute-efficient frontier lands below it"
    )
    size = dataset_size or group.dataset_size
    if size and samples_seen > size:
        notes.append(
            f"{samples_seen / size:.0f} passes over a dataset of {format_count(size)} samples"
        )
    notes.extend(cfit.notes)
    return Prediction(
        model=cfg.name,
        samples_seen=float(samples_seen),
        flops_per_sample=flops,
        group=group.name,
        group_dataset_size=group.dataset_size,
        value=100.0 - cfit.error_at(compute),
        low=100.0 - float(hi[0]),
        high=100.0 - float(lo[0]),
        level=cfit.level,
        rmse=cfit.rmse,
        max_fitted_compute=top,
        notes=tuple(notes),
    )
