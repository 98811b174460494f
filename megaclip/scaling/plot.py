"""PNG of a ScalingFit: points, fitted compute frontier per dataset with bootstrap band, targets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megaclip.errors import ConfigError
from megaclip.scaling.fit import ScalingFit
from megaclip.scaling.predict import Prediction
from megaclip.scaling.results import format_count

_COLORS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def plot_scaling(
    fit: ScalingFit,
    out: str | Path,
    predictions: Sequence[Prediction] = (),
    title: str | None = None,
) -> Path:
    """Write a PNG: metric vs training FLOPs (log x), frontier fits with bands, predictions."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(
            "plotting needs matplotlib: pip install 'megaclip[plot]' (or matplotlib>=3.7)."
        ) from None
    out = Path(out)
    fig = Figure(figsize=(9.0, 6.0), dpi=130)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    models = sorted({p.model for g in fit.groups for p in g.points})
    marker = {m: _MARKERS[i % len(_MARKERS)] for i, m in enumerate(models)}
    x_hi = max([g.max_compute for g in fit.groups] + [p.compute for p in predictions], default=1.0)
    x_lo = min(p.compute for g in fit.groups for p in g.points)
    for i, g in enumerate(fit.groups):
        color = _COLORS[i % len(_COLORS)]
        cf = g.compute_fit
        frontier = {id(p) for p in g.fitted}
        for p in g.points:
            on = id(p) in frontier
            ax.scatter(
                p.compute,
                p.value,
                marker=marker[p.model],
                s=55,
                facecolors=color if on else "none",
                edgecolors=color,
                linewidths=1.3,
                zorder=3,
            )
        xs_in = np.geomspace(x_lo / 1.5, g.max_compute, 200)
        xs_out = np.geomspace(g.max_compute, x_hi * 1.5, 100)
        law = cf.law
        label = (
            f"{g.name}: E = {law.A:.3g}·C^-{law.alpha:.3f} + {law.e_inf:.1f}  "
            f"(R²={cf.r2:.2f}, RMSE={cf.rmse:.2f} pt)"
        )
        ax.plot(xs_in, 100.0 - law(xs_in), color=color, lw=2.0, label=label, zorder=2)
        ax.plot(xs_out, 100.0 - law(xs_out), color=color, lw=2.0, ls="--", zorder=2)
        xs = np.concatenate([xs_in, xs_out])
        lo, hi = cf.error_interval(xs)
        if np.all(np.isfinite(lo)):
            ax.fill_between(
                xs,
                100.0 - hi,
                100.0 - lo,
                color=color,
                alpha=0.15,
                lw=0,
                label=f"{g.name}: {round(100 * cf.level)}% bootstrap band",
                zorder=1,
            )
        for pr in predictions:
            if pr.group != g.name:
                continue
            ax.errorbar(
                pr.compute,
                pr.value,
                yerr=[[pr.value - pr.low], [pr.high - pr.value]],
                fmt="*",
                ms=16,
                color=color,
                mec="black",
                capsize=4,
                zorder=4,
            )
            ax.annotate(
                f"{pr.model}, {format_count(pr.samples_seen)} samples\n"
                f"{pr.value:.1f}% [{pr.low:.1f}, {pr.high:.1f}]",
                (pr.compute, pr.value),
                textcoords="offset points",
                xytext=(-12, -34 if i % 2 else 14),
                ha="right",
                fontsize=8.5,
                color=color,
                bbox={"boxstyle": "round,pad=0.2", "fc": "white", "alpha": 0.85, "lw": 0},
                zorder=5,
            )
    for m in models:
        ax.scatter([], [], marker=marker[m], color="gray", label=m)
    ax.scatter([], [], marker="o", facecolors="none", edgecolors="gray", label="off the frontier")
    ax.set_xscale("log")
    ax.set_xlabel("training compute C (FLOPs = 6 × MACs × samples seen)")
    ax.set_ylabel(f"{fit.metric} (%)")
    ax.set_title(
        title
        or f"{fit.metric} vs compute: E = 100 - metric = A·C^-α + E∞ fitted on the "
        f"{fit.points_used} points; dashed = extrapolation",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right", framealpha=0.9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    return out
