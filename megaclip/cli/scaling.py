"""`megaclip scaling fit|predict|plot`: fit power laws to CLIP results, predict and cost runs.

Error E = 100 - metric (percentage points) is fitted as E = A * C^-alpha + E_inf per dataset on the
compute frontier (C = training FLOPs), with bootstrap intervals. See docs/scaling.md.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from megaclip.errors import ConfigError, DataError
from megaclip.perf.devices import ALIASES, get_device
from megaclip.scaling.fit import (
    GROUP_BY,
    POINTS,
    CurveFit,
    ScalingFit,
    fit_scaling,
    leave_largest_out,
)
from megaclip.scaling.predict import Cost, Prediction, predict
from megaclip.scaling.results import (
    SHIPPED_TABLE,
    Results,
    format_count,
    load_results,
    parse_count,
)


def _add_fit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--metric", default="top1", help="metric column or key (suffix match; top1)")
    p.add_argument("--group-by", default="dataset", help=f"one of {', '.join(GROUP_BY)}")
    p.add_argument(
        "--points", default="frontier", help="fit the compute 'frontier' (default) or 'all' points"
    )
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples (1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (0)")
    p.add_argument("--level", type=float, default=0.95, help="interval level (0.95)")
    p.add_argument(
        "--every-eval",
        action="store_true",
        help="use every evaluation of a run directory, not only its last",
    )


def register(sub: argparse._SubParsersAction) -> None:
    """Add `megaclip scaling` with its actions fit, predict and plot."""
    p = sub.add_parser(
        "scaling", help="fit scaling laws, predict metric and cost", description=__doc__
    )
    ssub = p.add_subparsers(dest="scaling_command", metavar="ACTION")
    p.set_defaults(func=lambda args: _usage(p))

    f = ssub.add_parser("fit", help="fit power laws to a results table or run directories")
    f.add_argument(
        "inputs",
        nargs="*",
        metavar="RESULTS.csv|RUN_DIR",
        help="CSV tables and/or run directories (default: the shipped openCLIP table)",
    )
    _add_fit_options(f)
    f.add_argument("--json", action="store_true", help="print JSON")
    f.set_defaults(func=run_fit)

    pr = ssub.add_parser("predict", help="predict the metric and cost of a model x samples run")
    pr.add_argument("--model", help="model preset, e.g. ViT-G-14")
    pr.add_argument("--samples", help="samples seen, e.g. 34e9 or 34B")
    pr.add_argument("--dataset", help="fitted dataset to predict on (name)")
    pr.add_argument("--dataset-size", help="dataset size in samples, e.g. 2e9 or 2B")
    pr.add_argument("--device", default="h100", help=f"one of {', '.join(ALIASES)} (h100)")
    pr.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation (0.4)")
    pr.add_argument(
        "--fit-from", nargs="+", metavar="RESULTS", help="tables/run dirs to fit (shipped table)"
    )
    _add_fit_options(pr)
    pr.add_argument("--json", action="store_true", help="print JSON")
    pr.set_defaults(func=run_predict)

    pl = ssub.add_parser("plot", help="PNG of the data, the fitted frontiers and a prediction")
    pl.add_argument("--out", default="scaling.png", help="output PNG (scaling.png)")
    pl.add_argument("--model", help="also plot the prediction for this model ...")
    pl.add_argument("--samples", help="... at this many samples seen")
    pl.add_argument("--fit-from", nargs="+", metavar="RESULTS", help="tables/run dirs to fit")
    _add_fit_options(pl)
    pl.set_defaults(func=run_plot)


def _usage(p: argparse.ArgumentParser) -> int:
    p.print_help()
    return 2


def _load_and_fit(inputs: list[str] | None, args: argparse.Namespace) -> tuple[Results, ScalingFit]:
    if args.group_by not in GROUP_BY:
        raise ConfigError(
            f"--group-by must be one of {', '.join(GROUP_BY)}, got '{args.group_by}'."
        )
    if args.points not in POINTS:
        raise ConfigError(f"--points must be one of {', '.join(POINTS)}, got '{args.points}'.")
    results = load_results(inputs or (), metric=args.metric, every_eval=args.every_eval)
    fit = fit_scaling(
        results.points,
        metric=results.metric,
        group_by=args.group_by,
        use=args.points,
        n_bootstrap=args.bootstrap,
        seed=args.seed,
        level=args.level,
    )
    return results, fit


def _curve_dict(c: CurveFit) -> dict[str, Any]:
    return {
        "A": c.law.A,
        "alpha": c.law.alpha,
        "e_inf": c.law.e_inf,
        "A_ci": list(c.A_ci),
        "alpha_ci": list(c.alpha_ci),
        "e_inf_ci": list(c.e_inf_ci),
        "level": c.level,
        "r2": c.r2,
        "rmse": c.rmse,
        "n_points": c.n_points,
        "n_bootstrap": c.n_bootstrap,
        "notes": list(c.notes),
    }


def _ci(lo: float, hi: float, fmt: str) -> str:
    if math.isnan(lo):
        return "[n/a]"
    return f"[{lo:{fmt}}, {hi:{fmt}}]"


def run_fit(args: argparse.Namespace) -> int:
    """Print the fits per group (text or JSON) with intervals, R^2, RMSE and leave-largest-out."""
    results, fit = _load_and_fit(args.inputs, args)
    loo = {}
    for g in fit.groups:
        try:
            loo[g.name] = leave_largest_out(
                g.points,
                group_by="none",
                use=args.points,
                n_bootstrap=args.bootstrap,
                seed=args.seed,
                level=args.level,
            )[0]
        except DataError as err:  # too few points once one is held out
            loo[g.name] = str(err)
    if args.json:
        out = {
            "metric": fit.metric,
            "error": "E = 100 - metric (points)",
            "law": "E = A * C^-alpha + E_inf, C = training FLOPs",
            "points": fit.points_used,
            "sources": list(results.sources),
            "groups": [],
        }
        for g in fit.groups:
            lo = loo[g.name]
            out["groups"].append(
                {
                    "name": g.name,
                    "dataset_size": g.dataset_size,
                    "n_points": len(g.points),
                    "n_fitted": len(g.fitted),
                    "compute_fit": _curve_dict(g.compute_fit),
                    "fitted_points": [
                        {
                            "model": p.model,
                            "samples_seen": p.samples_seen,
                            "compute": p.compute,
                            "value": p.value,
                        }
                        for p in g.fitted
                    ],
                    "model_curves": [
                        {"model": m.model, **_curve_dict(m.fit)} for m in g.model_curves
                    ],
                    "model_curves_skipped": list(g.skipped),
                    "leave_largest_out": lo
                    if isinstance(lo, str)
                    else {
                        "model": lo.held_out.model,
                        "samples_seen": lo.held_out.samples_seen,
                        "measured": lo.held_out.value,
                        "predicted": lo.predicted,
                        "interval": [lo.low, lo.high],
                        "residual": lo.residual,
                    },
                }
            )
        print(json.dumps(out, indent=2))
        return 0
    level = round(100 * args.level)
    used = "the compute-frontier points" if fit.points_used == "frontier" else "all points"
    print(
        f"metric: {fit.metric} (%); fitted error E = 100 - metric (points) as "
        f"E = A * C^-alpha + E_inf, C = training FLOPs"
    )
    print(
        f"{len(results.points)} points from {', '.join(results.sources)}; fit on "
        f"{used} of each {fit.group_by}; {args.bootstrap} bootstrap resamples "
        f"(seed {args.seed}), {level}% intervals"
    )
    for g in fit.groups:
        c = g.compute_fit
        size = f" ({format_count(g.dataset_size)} samples)" if g.dataset_size else ""
        print(f"\n{g.name}{size}: {len(g.points)} points, {len(g.fitted)} fitted")
        print(
            f"  alpha = {c.law.alpha:.3f} {_ci(*c.alpha_ci, '.3f')}   "
            f"E_inf = {c.law.e_inf:.1f} {_ci(*c.e_inf_ci, '.1f')} points "
            f"(ceiling {100 - c.law.e_inf:.1f}%)   A = {c.law.A:.3g}"
        )
        print(f"  R^2 = {c.r2:.3f}, RMSE = {c.rmse:.2f} points over {c.n_points} points")
        for note in c.notes:
            print(f"  note: {note}")
        lo = loo[g.name]
        if isinstance(lo, str):
            print(f"  leave-largest-out: not possible ({lo})")
        else:
            held = lo.held_out
            print(
                f"  leave-largest-out: {held.model} x {format_count(held.samples_seen)} "
                f"samples measured {lo.held_out.value:.2f}, predicted {lo.predicted:.2f} "
                f"{_ci(lo.low, lo.high, '.2f')} -> {lo.residual:+.2f} points"
            )
        for m in g.model_curves:
            mc = m.fit
            print(
                f"  {m.model} vs samples seen: beta = {mc.law.alpha:.3f} "
                f"{_ci(*mc.alpha_ci, '.3f')}, E_inf = {mc.law.e_inf:.1f}, "
                f"R^2 = {mc.r2:.3f}, RMSE = {mc.rmse:.2f}"
            )
        if g.skipped:
            print(f"  per-model curves skipped: {'; '.join(g.skipped)}")
    return 0


def _target(args: argparse.Namespace) -> tuple[str, float] | None:
    if args.model is None and args.samples is None:
        return None
    if args.model is None or args.samples is None:
        raise ConfigError("give both --model and --samples (e.g. --model ViT-G-14 --samples 34e9).")
    return args.model, parse_count(args.samples, "--samples")


def run_predict(args: argparse.Namespace) -> int:
    """Print the predicted metric with its interval, the compute and its GPU-hours."""
    target = _target(args)
    if target is None:
        raise ConfigError("give --model and --samples (e.g. --model ViT-G-14 --samples 34e9).")
    device = get_device(args.device, what="device")
    if not 0.0 < args.mfu <= 1.0:
        raise ConfigError(f"--mfu must be in (0, 1], got {args.mfu}; e.g. 0.4 for 40%.")
    size = parse_count(args.dataset_size, "--dataset-size") if args.dataset_size else None
    _, fit = _load_and_fit(args.fit_from, args)
    pr = predict(fit, target[0], target[1], dataset=args.dataset, dataset_size=size)
    cost = Cost(pr.compute, device, args.mfu)
    hours = cost.gpu_hours
    if args.json:
        print(
            json.dumps(
                {
                    "model": pr.model,
                    "samples_seen": pr.samples_seen,
                    "fit_dataset": pr.group,
                    "fit_dataset_size": pr.group_dataset_size,
                    "metric": fit.metric,
                    "predicted": pr.value,
                    "interval": [pr.low, pr.high],
                    "level": pr.level,
                    "fit_rmse": pr.rmse,
                    "train_flops_per_sample": pr.flops_per_sample,
                    "compute_flops": pr.compute,
                    "extrapolation": pr.extrapolation,
                    "device": args.device.lower(),
                    "device_peak_bf16_flops": device.peak_bf16_flops,
                    "mfu": args.mfu,
                    "gpu_hours": hours,
                    "notes": list(pr.notes),
                    "fit_sources": list(args.fit_from or [str(SHIPPED_TABLE)]),
                },
                indent=2,
            )
        )
        return 0
    size_txt = f" ({format_count(pr.group_dataset_size)} samples)" if pr.group_dataset_size else ""
    print(
        f"{pr.model} x {format_count(pr.samples_seen)} samples seen, "
        f"from the {pr.group}{size_txt} fit"
    )
    print(
        f"  predicted {fit.metric}: {pr.value:.1f}%  "
        f"({round(100 * pr.level)}% bootstrap interval {_ci(pr.low, pr.high, '.1f')}; "
        f"fit RMSE {pr.rmse:.2f} points)"
    )
    print(
        f"  training compute: {pr.compute:.3g} FLOPs "
        f"({pr.flops_per_sample / 1e9:.1f} GFLOPs/sample x {format_count(pr.samples_seen)} samples)"
    )
    print(
        f"  on {device.note} ({device.peak_bf16_flops / 1e12:.0f} TFLOP/s bf16 dense) at MFU "
        f"{args.mfu:.2f}: {hours:,.0f} GPU-hours = {hours / 24:,.0f} GPU-days"
    )
    for note in pr.notes:
        print(f"  note: {note}")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    """Write the scaling PNG (points, frontier fits, bands, optional target)."""
    from megaclip.scaling.plot import plot_scaling

    target = _target(args)
    _, fit = _load_and_fit(args.fit_from, args)
    preds: list[Prediction] = []
    if target is not None:
        preds = [predict(fit, target[0], target[1], dataset=g.name) for g in fit.groups]
    out = plot_scaling(fit, args.out, preds)
    print(f"wrote {out}")
    return 0
