"""Saturating power-law fits of error vs compute (per dataset) and vs samples seen (per model).

Law: ``E(x) = A * x**(-alpha) + E_inf`` with ``A >= 0``, ``alpha`` in [1e-3, 5] and
``0 <= E_inf <= min(E)`` (the error floor cannot lie above the best error measured), where
``E = 100 - metric`` in percentage points and ``x`` is training compute in FLOPs (frontier fits)
or samples seen (per-model curves).

Solver (numpy only, no SciPy): variable projection. For a fixed ``alpha`` the law is linear in
``(A, E_inf)``, so the box-constrained least-squares optimum of those two is found in closed form
(interior solution or the best point on each edge of the box). The remaining 1-D problem in
``log(alpha)`` is solved by a dense grid followed by golden-section refinement around the best
grid point. This finds the global least-squares optimum up to the grid's resolution of
separate basins, and never diverges. Bootstrap replicates (resampled points, seeded) are fitted
together, vectorised as integer weights over the original points.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from megaclip.errors import ConfigError, DataError
from megaclip.scaling.results import ScalingPoint, format_count

N_PARAMS = 3
ALPHA_MIN, ALPHA_MAX = 1e-3, 5.0
_GRID = np.linspace(math.log(ALPHA_MIN), math.log(ALPHA_MAX), 241)
_GOLDEN_STEPS = 48
_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0
_CHUNK = 256  # bootstrap replicates solved at once (bounds memory: chunk x grid x points)
GROUP_BY = ("dataset", "dataset_size", "none")
POINTS = ("frontier", "all")


@dataclass(frozen=True)
class PowerLaw:
    """E(x) = A * x**(-alpha) + e_inf (error in percentage points)."""

    A: float
    alpha: float
    e_inf: float

    def __call__(self, x: float | np.ndarray) -> float | np.ndarray:
        """The error at ``x`` (same units as the fit: FLOPs or samples)."""
        lx = np.log(np.asarray(x, dtype=float))
        if self.A <= 0:
            out = np.full_like(lx, self.e_inf)
        else:
            out = np.exp(math.log(self.A) - self.alpha * lx) + self.e_inf
        return float(out) if out.ndim == 0 else out


@dataclass(frozen=True)
class CurveFit:
    """A least-squares PowerLaw on (x, E) with goodness of fit and bootstrap replicates."""

    law: PowerLaw
    x: tuple[float, ...]
    errors: tuple[float, ...]
    r2: float
    rmse: float
    level: float
    A_ci: tuple[float, float]
    alpha_ci: tuple[float, float]
    e_inf_ci: tuple[float, float]
    bootstrap: tuple[PowerLaw, ...] = field(repr=False)
    n_bootstrap: int = 0
    notes: tuple[str, ...] = ()

    @property
    def n_points(self) -> int:
        """Number of fitted points."""
        return len(self.x)

    def error_at(self, x: float) -> float:
        """Fitted error (points) at ``x``."""
        return float(self.law(x))

    def error_interval(self, x: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bootstrap percentile interval of the fitted error at ``x`` (NaN without replicates)."""
        xs = np.atleast_1d(np.asarray(x, dtype=float))
        if not self.bootstrap:
            nan = np.full(xs.shape, np.nan)
            return nan, nan
        vals = np.stack([law(xs) for law in self.bootstrap])
        tail = 50.0 * (1.0 - self.level)
        return np.percentile(vals, tail, axis=0), np.percentile(vals, 100.0 - tail, axis=0)


def _edge_candidates(
    b: np.ndarray, w: np.ndarray, y: np.ndarray, ymin: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Box-constrained LS of y ~ a*b + e (a >= 0, 0 <= e <= ymin), weighted, over the last axis.

    ``b`` is (..., n); ``w`` and ``y`` broadcast to it; ``ymin`` to its leading shape.
    Returns (a, e, sse) of the best feasible candidate: interior optimum or optimum on an edge.
    """
    sw = np.sum(w * np.ones_like(b), axis=-1)
    sb = np.sum(w * b, axis=-1)
    sbb = np.sum(w * b * b, axis=-1)
    sy = np.sum(w * y * np.ones_like(b), axis=-1)
    sby = np.sum(w * b * y, axis=-1)
    det = sbb * sw - sb * sb
    safe = np.where(np.abs(det) > 1e-12 * np.maximum(sbb * sw, 1e-300), det, np.nan)
    a_int = (sw * sby - sb * sy) / safe
    e_int = (sbb * sy - sb * sby) / safe
    ok_int = np.isfinite(a_int) & (a_int >= 0) & (e_int >= 0) & (e_int <= ymin)
    sbb_safe = np.where(sbb > 0, sbb, np.nan)
    cands = [
        (a_int, e_int, ok_int),
        (np.maximum(0.0, np.nan_to_num(sby / sbb_safe)), np.zeros_like(sb), None),
        (
            np.maximum(0.0, np.nan_to_num((sby - ymin * sb) / sbb_safe)),
            ymin * np.ones_like(sb),
            None,
        ),
        (np.zeros_like(sb), np.clip(sy / sw, 0.0, ymin), None),
    ]
    best_a = best_e = best_sse = None
    for a, e, ok in cands:
        a_f = np.nan_to_num(a)
        e_f = np.nan_to_num(e)
        r = a_f[..., None] * b + e_f[..., None] - y
        sse = np.sum(w * r * r, axis=-1)
        if ok is not None:
            sse = np.where(ok, sse, np.inf)
        if best_sse is None:
            best_a, best_e, best_sse = a_f, e_f, sse
        else:
            take = sse < best_sse
            best_a = np.where(take, a_f, best_a)
            best_e = np.where(take, e_f, best_e)
            best_sse = np.where(take, sse, best_sse)
    return best_a, best_e, best_sse


def _solve(lx: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, ...]:
    """Fit (a, alpha, e) of y ~ a*exp(-alpha*lx) + e for each weight row of ``w`` (R, n)."""
    ymin = np.min(np.where(w > 0, y, np.inf), axis=-1)  # (R,)
    # Grid over log(alpha): shapes (R, K, n).
    b = np.exp(-np.exp(_GRID)[None, :, None] * lx[None, None, :])
    _, _, sse = _edge_candidates(b, w[:, None, :], y[None, None, :], ymin[:, None])
    k = np.argmin(sse, axis=1)
    lo = _GRID[np.maximum(k - 1, 0)]
    hi = _GRID[np.minimum(k + 1, len(_GRID) - 1)]

    def f(la: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        bb = np.exp(-np.exp(la)[:, None] * lx[None, :])
        return _edge_candidates(bb, w, y[None, :], ymin)

    c = hi - _INV_PHI * (hi - lo)
    d = lo + _INV_PHI * (hi - lo)
    fc, fd = f(c)[2], f(d)[2]
    for _ in range(_GOLDEN_STEPS):
        left = fc < fd
        hi = np.where(left, d, hi)
        lo = np.where(left, lo, c)
        c_new = hi - _INV_PHI * (hi - lo)
        d_new = lo + _INV_PHI * (hi - lo)
        c, d = np.where(left, c_new, d), np.where(left, c, d_new)
        fc, fd = np.where(left, f(c)[2], fd), np.where(left, fc, f(d)[2])
    # Keep the better of the refined point and the best grid point (guards flat valleys).
    la_ref = 0.5 * (lo + hi)
    a_r, e_r, s_r = f(la_ref)
    a_g, e_g, s_g = f(_GRID[k])
    take = s_r <= s_g
    return (
        np.where(take, a_r, a_g),
        np.exp(np.where(take, la_ref, _GRID[k])),
        np.where(take, e_r, e_g),
        np.where(take, s_r, s_g),
    )


def _check_xy(x: Sequence[float], errors: Sequence[float], what: str) -> tuple[np.ndarray, ...]:
    xa = np.asarray(x, dtype=float)
    ya = np.asarray(errors, dtype=float)
    if xa.shape != ya.shape or xa.ndim != 1:
        raise DataError(f"{what}: x and errors must be 1-D sequences of the same length.")
    if not (np.all(np.isfinite(xa)) and np.all(np.isfinite(ya))):
        raise DataError(f"{what}: x and errors must be finite numbers.")
    if np.any(xa <= 0):
        raise DataError(
            f"{what}: compute and samples must be positive (got {xa.min():.3g}); "
            "check samples_seen and the model's FLOPs."
        )
    if np.any(ya < 0):
        raise DataError(f"{what}: errors must be >= 0 (metric above 100%?).")
    n_distinct = len(np.unique(xa))
    if n_distinct < N_PARAMS + 1:
        raise DataError(
            f"{what}: too few points to fit E = A*x^-alpha + E_inf: {n_distinct} distinct x "
            f"values, need at least {N_PARAMS + 1} (parameters + 1). Add runs or use --points all."
        )
    return xa, ya


def fit_law(x: Sequence[float], errors: Sequence[float], what: str = "fit") -> PowerLaw:
    """Least-squares E = A x^-alpha + E_inf (box-constrained; see the module docstring)."""
    xa, ya = _check_xy(x, errors, what)
    return _fit_weighted(xa, ya, np.ones((1, len(xa))))[0]


def _fit_weighted(xa: np.ndarray, ya: np.ndarray, w: np.ndarray) -> list[PowerLaw]:
    lx0 = float(np.mean(np.log(xa)))  # reference x0 = geometric mean: well-conditioned basis
    lx = np.log(xa) - lx0
    parts = [_solve(lx, ya, w[i : i + _CHUNK]) for i in range(0, len(w), _CHUNK)]
    a, alpha, e = (np.concatenate([part[j] for part in parts]) for j in range(3))
    # a * (x/x0)^-alpha = (a * x0^alpha) * x^-alpha
    return [
        PowerLaw(float(ai * math.exp(al * lx0)) if ai > 0 else 0.0, float(al), float(ei))
        for ai, al, ei in zip(a, alpha, e)
    ]


def fit_curve(
    x: Sequence[float],
    errors: Sequence[float],
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    what: str = "fit",
) -> CurveFit:
    """Fit E = A x^-alpha + E_inf with R^2, RMSE (points) and seeded case-bootstrap intervals."""
    if not 0.0 < level < 1.0:
        raise ConfigError(f"confidence level must be in (0, 1), got {level}.")
    if n_bootstrap < 0:
        raise ConfigError(f"number of bootstrap resamples must be >= 0, got {n_bootstrap}.")
    xa, ya = _check_xy(x, errors, what)
    n = len(xa)
    law = _fit_weighted(xa, ya, np.ones((1, n)))[0]
    resid = ya - law(xa)
    sse = float(np.sum(resid**2))
    sst = float(np.sum((ya - ya.mean()) ** 2))
    r2 = 1.0 - sse / sst if sst > 0 else (1.0 if sse == 0 else float("nan"))
    rmse = math.sqrt(sse / n)

    boots: list[PowerLaw] = []
    notes: list[str] = []
    n_distinct = len(np.unique(xa))
    if n_bootstrap and n_distinct <= N_PARAMS + 1:
        # Every fittable resample then holds all the distinct points: a zero-width interval.
        notes.append(
            f"no bootstrap interval: {n_distinct} distinct points for {N_PARAMS} parameters "
            f"(need {N_PARAMS + 2})"
        )
        n_bootstrap = 0
    if n_bootstrap:
        rng = np.random.default_rng(seed)
        xs_codes = np.unique(xa, return_inverse=True)[1]
        need, tries = n_bootstrap, 0
        while need > 0 and tries < 50:
            tries += 1
            idx = rng.integers(0, n, size=(max(2 * need, 64), n))
            distinct = np.array([len(np.unique(xs_codes[row])) for row in idx])
            idx = idx[distinct >= N_PARAMS + 1][:need]
            if len(idx) == 0:
                continue
            w = np.zeros((len(idx), n))
            np.add.at(w, (np.arange(len(idx))[:, None], idx), 1.0)
            boots.extend(_fit_weighted(xa, ya, w))
            need = n_bootstrap - len(boots)
        if len(boots) < n_bootstrap:
            notes.append(f"only {len(boots)} of {n_bootstrap} bootstrap resamples were fittable")
    if N_PARAMS + 1 < n_distinct <= N_PARAMS + 2:
        notes.append(
            f"{n_distinct} distinct points for {N_PARAMS} parameters: bootstrap intervals "
            "understate the uncertainty"
        )
    tail = 50.0 * (1.0 - level)

    def ci(vals: list[float]) -> tuple[float, float]:
        if not vals:
            return (float("nan"), float("nan"))
        lo, hi = np.percentile(vals, [tail, 100.0 - tail])
        return (float(lo), float(hi))

    return CurveFit(
        law=law,
        x=tuple(float(v) for v in xa),
        errors=tuple(float(v) for v in ya),
        r2=float(r2),
        rmse=float(rmse),
        level=level,
        A_ci=ci([b.A for b in boots]),
        alpha_ci=ci([b.alpha for b in boots]),
        e_inf_ci=ci([b.e_inf for b in boots]),
        bootstrap=tuple(boots),
        n_bootstrap=len(boots),
        notes=tuple(notes),
    )


def pareto_frontier(points: Sequence[ScalingPoint]) -> tuple[ScalingPoint, ...]:
    """Points not beaten by any point of lower-or-equal compute (sorted by compute)."""
    ordered = sorted(points, key=lambda p: (p.compute, -p.value))
    out: list[ScalingPoint] = []
    best = -math.inf
    for p in ordered:
        if p.value > best:
            out.append(p)
            best = p.value
    return tuple(out)


@dataclass(frozen=True)
class ModelCurve:
    """Per-model curve E = B * D^-beta + E_inf_model vs samples seen D (within one group)."""

    model: str
    fit: CurveFit


@dataclass(frozen=True)
class GroupFit:
    """The compute fit of one group (dataset) of points, plus its per-model curves."""

    name: str
    dataset_size: float | None
    points: tuple[ScalingPoint, ...]
    fitted: tuple[ScalingPoint, ...]
    compute_fit: CurveFit
    model_curves: tuple[ModelCurve, ...]
    skipped: tuple[str, ...]

    @property
    def max_compute(self) -> float:
        """Largest training compute (FLOPs) among the fitted points."""
        return max(p.compute for p in self.fitted)


@dataclass(frozen=True)
class ScalingFit:
    """Saturating power-law fits of one metric, one GroupFit per dataset (or size, or all)."""

    metric: str
    group_by: str
    points_used: str
    groups: tuple[GroupFit, ...]

    def group(self, name: str) -> GroupFit:
        """The group called ``name`` (DataError listing the known groups otherwise)."""
        for g in self.groups:
            if g.name == name:
                return g
        known = ", ".join(g.name for g in self.groups)
        raise DataError(f"no fitted dataset '{name}'; fitted: {known}.")


def group_points(
    points: Sequence[ScalingPoint], group_by: str = "dataset"
) -> dict[str, list[ScalingPoint]]:
    """Points keyed by dataset name, by dataset size, or all under one key ('none')."""
    if group_by not in GROUP_BY:
        raise ConfigError(f"group-by must be one of {', '.join(GROUP_BY)}, got '{group_by}'.")
    groups: dict[str, list[ScalingPoint]] = {}
    for p in points:
        if group_by == "dataset":
            key = p.dataset
        elif group_by == "dataset_size":
            if p.dataset_size is None:
                raise DataError(f"{p.source}: no dataset_size, so it cannot be grouped by size.")
            key = f"{format_count(p.dataset_size)} samples"
        else:
            key = "all"
        groups.setdefault(key, []).append(p)
    return groups


def _group_size(points: Sequence[ScalingPoint]) -> float | None:
    sizes = {p.dataset_size for p in points}
    return sizes.pop() if len(sizes) == 1 else None


def fit_group(
    name: str,
    points: Sequence[ScalingPoint],
    *,
    use: str = "frontier",
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> GroupFit:
    """Fit the compute law of one group (frontier or all points) and its per-model curves."""
    if use not in POINTS:
        raise ConfigError(f"points must be one of {', '.join(POINTS)}, got '{use}'.")
    fitted = pareto_frontier(points) if use == "frontier" else tuple(points)
    fitted = tuple(sorted(fitted, key=lambda p: p.compute))
    fit = functools.partial(fit_curve, n_bootstrap=n_bootstrap, seed=seed, level=level)
    cfit = fit(
        [p.compute for p in fitted],
        [p.error for p in fitted],
        what=f"dataset '{name}' ({use} points)",
    )
    curves: list[ModelCurve] = []
    skipped: list[str] = []
    by_model: dict[str, list[ScalingPoint]] = {}
    for p in points:
        by_model.setdefault(p.model, []).append(p)
    for model, pts in sorted(by_model.items()):
        n_d = len({p.samples_seen for p in pts})
        if n_d < N_PARAMS + 1:
            skipped.append(f"{model}: {n_d} samples-seen values, need {N_PARAMS + 1}")
            continue
        curves.append(
            ModelCurve(
                model,
                fit(
                    [p.samples_seen for p in pts],
                    [p.error for p in pts],
                    what=f"model '{model}' on '{name}'",
                ),
            )
        )
    return GroupFit(
        name, _group_size(points), tuple(points), fitted, cfit, tuple(curves), tuple(skipped)
    )


def fit_scaling(
    points: Sequence[ScalingPoint],
    *,
    metric: str = "top1",
    group_by: str = "dataset",
    use: str = "frontier",
    n_bootstrap: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> ScalingFit:
    """Fit E = A C^-alpha + E_inf per group and E = B D^-beta + E_inf per model within it."""
    if not points:
        raise DataError("no results to fit.")
    groups = group_points(points, group_by)
    fits = tuple(
        fit_group(name, pts, use=use, n_bootstrap=n_bootstrap, seed=seed, level=level)
        for name, pts in sorted(groups.items(), key=lambda kv: (_group_size(kv[1]) or 0, kv[0]))
    )
    return ScalingFit(metric, group_by, use, fits)


@dataclass(frozen=True)
class LeaveOneOut:
    """Extrapolation check: fit a group without its largest-compute point, then predict it."""

    group: str
    held_out: ScalingPoint
    predicted: float
    low: float
    high: float

    @property
    def residual(self) -> float:
        """Predicted minus measured metric, in points (positive = the fit was optimistic)."""
        return self.predicted - self.held_out.value


def leave_largest_out(
    points: Sequence[ScalingPoint],
    *,
    group_by: str = "dataset",
    use: str = "frontier",
    n_bootstrap: int = 200,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[LeaveOneOut, ...]:
    """For each group, refit without the largest-compute point and predict that point's metric."""
    out = []
    for name, pts in sorted(group_points(points, group_by).items()):
        held = max(pts, key=lambda p: (p.compute, p.value))
        rest = [p for p in pts if p is not held]
        g = fit_group(name, rest, use=use, n_bootstrap=n_bootstrap, seed=seed, level=level)
        lo, hi = g.compute_fit.error_interval(held.compute)
        out.append(
            LeaveOneOut(
                name,
                held,
                100.0 - g.compute_fit.error_at(held.compute),
                100.0 - float(hi[0]),
                100.0 - float(lo[0]),
            )
        )
    return tuple(out)
