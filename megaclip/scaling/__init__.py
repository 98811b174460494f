"""Scaling laws: fit saturating power laws to CLIP results and extrapolate metric and cost.

GPU-hours use :mod:`megaclip.perf.devices`, the one device table (re-exported here).
"""

from megaclip.perf.devices import DEVICES, Device, get_device
from megaclip.scaling.fit import (
    CurveFit,
    GroupFit,
    LeaveOneOut,
    ModelCurve,
    PowerLaw,
    ScalingFit,
    fit_curve,
    fit_group,
    fit_law,
    fit_scaling,
    leave_largest_out,
    pareto_frontier,
)
from megaclip.scaling.predict import Cost, Prediction, gpu_hours, predict, select_group
from megaclip.scaling.results import (
    SHIPPED_TABLE,
    Results,
    ScalingPoint,
    canonical_model_name,
    load_results,
    read_run,
    read_table,
)

__all__ = [
    "DEVICES",
    "SHIPPED_TABLE",
    "Cost",
    "CurveFit",
    "Device",
    "GroupFit",
    "LeaveOneOut",
    "ModelCurve",
    "PowerLaw",
    "Prediction",
    "Results",
    "ScalingFit",
    "ScalingPoint",
    "canonical_model_name",
    "fit_curve",
    "fit_group",
    "fit_law",
    "fit_scaling",
    "get_device",
    "gpu_hours",
    "leave_largest_out",
    "load_results",
    "pareto_frontier",
    "predict",
    "read_run",
    "read_table",
    "select_group",
]
