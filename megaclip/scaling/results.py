"""Scaling results as data: read result tables (CSV) and megaclip run directories into points.

Conventions (used everywhere in ``megaclip.scaling``):
- a metric is an accuracy in percent (0-100, higher is better), e.g. ImageNet zero-shot top-1;
- the fitted quantity is the error ``E = 100 - metric`` in percentage points;
- training compute ``C = train_flops_per_sample x samples_seen`` (model FLOPs = 6 x forward MACs,
  see ``megaclip.model.flops``).

A CSV needs a header with the columns ``model``, ``samples_seen`` and the metric; ``dataset`` and
``dataset_size`` are optional (synonyms listed in ``COLUMN_SYNONYMS``). Lines starting with ``#``
are comments; a row whose metric cell is empty is skipped (a run not done yet).

A run directory holds ``config.yaml`` and ``metrics.jsonl`` (see docs/scaling.md): the model is
``model: NAME`` or ``model: {preset: NAME, ...}`` (or a full model mapping), the dataset is
``data: {name: NAME, size: N}`` (optional); each metrics line is a JSON object, and the lines that
hold the metric must hold ``samples_seen``. Accuracies in metrics.jsonl are *fractions* in [0, 1]
(open_clip's convention); they are converted to percent.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megaclip.config.model import ALIASES, ClipConfig, list_presets, load_preset, model_from_dict
from megaclip.config.schema import load_mapping
from megaclip.errors import ConfigError, DataError
from megaclip.model.flops import model_cost

SHIPPED_TABLE = Path(__file__).resolve().parent / "data" / "openclip_scaling.csv"

# Canonical column -> accepted header spellings (compared after normalise_header()).
COLUMN_SYNONYMS: dict[str, tuple[str, ...]] = {
    "model": ("model", "arch", "architecture", "model_name"),
    "samples_seen": (
        "samples_seen",
        "samples",
        "seen_samples",
        "num_samples_seen",
        "train_samples",
    ),
    "dataset": ("dataset", "data", "pretraining_dataset", "pretraining_data", "train_data"),
    "dataset_size": ("dataset_size", "data_size", "num_unique_samples", "unique_samples"),
}


@dataclass(frozen=True)
class ScalingPoint:
    """One trained model evaluated once: model, samples seen, dataset and metric (percent)."""

    model: str
    samples_seen: float
    dataset: str
    dataset_size: float | None
    value: float
    flops_per_sample: float
    source: str

    @property
    def compute(self) -> float:
        """Training compute in FLOPs: flops_per_sample x samples_seen."""
        return self.flops_per_sample * self.samples_seen

    @property
    def error(self) -> float:
        """Error in percentage points: 100 - value."""
        return 100.0 - self.value


@dataclass(frozen=True)
class Results:
    """Points read from tables and run directories, with the metric column(s) they came from."""

    points: tuple[ScalingPoint, ...]
    metric: str
    sources: tuple[str, ...]


def normalise_header(name: str) -> str:
    """Lower-case a column name and turn runs of non-alphanumerics into one underscore."""
    return re.sub(r"[^0-9a-z]+", "_", name.strip().lower()).strip("_")


def canonical_model_name(name: str) -> str:
    """The preset name for a model spelled e.g. 'ViT-B/32', 'ViT_B_32' or 'ViT-bigG/14'."""
    raw = str(name).strip()
    cand = re.sub(r"[/_\s]+", "-", raw)
    known = list_presets() + list(ALIASES)
    if cand in known:
        return ALIASES.get(cand, cand)
    matches = sorted({ALIASES.get(k, k) for k in known if k.lower() == cand.lower()})
    if len(matches) > 1:
        raise ConfigError(
            f"model name '{raw}' is ambiguous: it matches {' and '.join(matches)} when case is "
            "ignored; spell the model name with its exact case."
        )
    if matches:
        return matches[0]
    load_preset(cand)  # raises ConfigError naming the known presets and the closest one
    return cand  # pragma: no cover - load_preset succeeded, so cand was known


def parse_count(text: str | float | int, what: str) -> float:
    """A positive count from '34e9', '3.4e10', '34B', '400M' or '13k' (ConfigError otherwise)."""
    if isinstance(text, (int, float)):
        value = float(text)
    else:
        s = str(text).strip().replace("_", "").replace(",", "")
        scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}.get(s[-1:].lower(), 1.0)
        if scale != 1.0:
            s = s[:-1]
        try:
            value = float(s) * scale
        except ValueError:
            raise ConfigError(f"{what} '{text}' is not a number; write e.g. 34e9 or 34B.") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{what} must be a positive number, got '{text}'.")
    return value


def format_count(n: float) -> str:
    """A count in short form: 3.4e10 -> '34B', 8e7 -> '80M', 1.28e7 -> '12.8M'."""
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"


def resolve_metric(metric: str, columns: Iterable[str], where: str) -> str:
    """The one column/key matching ``metric`` exactly or as a suffix (e.g. top1 -> *_top1)."""
    cols = list(columns)
    want = normalise_header(metric)
    exact = [c for c in cols if normalise_header(c) == want]
    if len(exact) == 1:
        return exact[0]
    hits = [c for c in cols if normalise_header(c).endswith("_" + want)]
    if len(hits) == 1:
        return hits[0]
    if not hits:
        raise DataError(
            f"{where}: no column for metric '{metric}'; columns are {', '.join(cols)}. "
            "Pass --metric with one of them."
        )
    raise DataError(
        f"{where}: metric '{metric}' is ambiguous: {', '.join(hits)}. "
        "Pass --metric with the full column name."
    )


def _cell_float(cell: str, where: str, column: str) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise DataError(f"{where}: column '{column}' is not a number: '{cell}'.") from None
    if not math.isfinite(value):
        raise DataError(f"{where}: column '{column}' is not finite: '{cell}'.")
    return value


def _check_value(value: float, where: str, column: str) -> None:
    if not 0.0 <= value <= 100.0:
        raise DataError(
            f"{where}: {column} = {value} is not an accuracy in percent (0-100); "
            "tables hold percent, e.g. 63.2 for 63.2% top-1."
        )


def _size_label(size: float) -> str:
    return f"{format_count(size)} samples"


def read_table(path: str | Path, metric: str = "top1") -> Results:
    """Points from a CSV result table (see the module docstring for the columns)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"results file not found: {path}")
    with path.open(encoding="utf-8", newline="") as fh:
        numbered = [
            (i, line)
            for i, line in enumerate(fh, start=1)
            if line.strip() and not line.lstrip().startswith("#")
        ]
    if not numbered:
        raise DataError(
            f"{path}: no header line; the table needs columns model, samples_seen and "
            "a metric column."
        )
    rows = list(csv.reader(line for _, line in numbered))
    header = [h.strip() for h in rows[0]]
    norm = [normalise_header(h) for h in header]
    index: dict[str, int] = {}
    for canonical, names in COLUMN_SYNONYMS.items():
        found = [i for i, h in enumerate(norm) if h in names]
        if len(found) > 1:
            cols = ", ".join(header[i] for i in found)
            raise DataError(f"{path}: several columns mean '{canonical}': {cols}; keep one.")
        if found:
            index[canonical] = found[0]
    missing = [c for c in ("model", "samples_seen") if c not in index]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)}; the header is "
            f"'{','.join(header)}' and must name model, samples_seen and the metric."
        )
    used = set(index.values())
    metric_col = resolve_metric(
        metric, [h for i, h in enumerate(header) if i not in used], str(path)
    )
    index["value"] = header.index(metric_col)

    points = []
    for (lineno, _), row in zip(numbered[1:], rows[1:]):
        where = f"{path}:{lineno}"
        if len(row) != len(header):
            raise DataError(f"{where}: {len(row)} cells but the header has {len(header)}.")
        cell = {k: row[i].strip() for k, i in index.items()}
        if not cell["value"]:
            continue
        value = _cell_float(cell["value"], where, metric_col)
        _check_value(value, where, metric_col)
        samples = _cell_float(cell["samples_seen"], where, "samples_seen")
        if samples <= 0:
            raise DataError(f"{where}: samples_seen must be positive, got {cell['samples_seen']}.")
        size = None
        if cell.get("dataset_size"):
            size = _cell_float(cell["dataset_size"], where, "dataset_size")
            if size <= 0:
                raise DataError(
                    f"{where}: dataset_size must be positive, got {cell['dataset_size']}."
                )
        dataset = cell.get("dataset") or (_size_label(size) if size else "all")
        try:
            model = canonical_model_name(cell["model"])
        except ConfigError as err:
            raise ConfigError(f"{where}: {err}") from None
        flops = float(model_cost(load_preset(model)).train_flops)
        points.append(ScalingPoint(model, samples, dataset, size, value, flops, where))
    if not points:
        raise DataError(f"{path}: no result rows with a value for '{metric_col}'.")
    return Results(tuple(points), metric_col, (str(path),))


def _run_model(spec: Any, where: str) -> ClipConfig:
    if isinstance(spec, str):
        return load_preset(canonical_model_name(spec))
    if isinstance(spec, dict):
        spec = dict(spec)
        if "preset" in spec:
            spec["preset"] = canonical_model_name(str(spec["preset"]))
        return model_from_dict(spec, where=f"{where} model")
    raise ConfigError(f"{where}: 'model' must be a preset name or a mapping, got {spec!r}.")


def _run_dataset(config: dict[str, Any], where: str) -> tuple[str, float | None]:
    data = config.get("data")
    data = data if isinstance(data, dict) else {}
    name = data.get("name")
    size = data.get("size")
    if size is not None:
        try:
            size = float(size)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: data.size must be a number, got {size!r}.") from None
        if not math.isfinite(size) or size <= 0:
            raise ConfigError(f"{where}: data.size must be positive, got {size}.")
    if name is None:
        name = _size_label(size) if size else "unnamed"
    return str(name), size


def read_run(run_dir: str | Path, metric: str = "top1", every_eval: bool = False) -> Results:
    """Points of one megaclip run directory: its last evaluation (or every one if asked)."""
    run_dir = Path(run_dir)
    cfg_path, log_path = run_dir / "config.yaml", run_dir / "metrics.jsonl"
    for p in (cfg_path, log_path):
        if not p.is_file():
            raise DataError(f"{run_dir}: not a megaclip run directory ({p.name} is missing).")
    config = load_mapping(cfg_path)
    if "model" not in config:
        raise ConfigError(
            f"{cfg_path}: no 'model' entry; write 'model: ViT-B-32' or "
            "'model: {preset: ViT-B-32}'."
        )
    cfg = _run_model(config["model"], str(cfg_path))
    flops = float(model_cost(cfg).train_flops)
    dataset, size = _run_dataset(config, str(cfg_path))

    records: list[tuple[int, dict[str, Any]]] = []
    with log_path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"{log_path}:{lineno}: not a JSON object.") from None
            if not isinstance(rec, dict):
                raise DataError(f"{log_path}:{lineno}: not a JSON object.")
            records.append((lineno, rec))
    keys = sorted({k for _, rec in records for k in rec if k not in ("step", "samples_seen")})
    if not keys:
        raise DataError(f"{log_path}: no evaluation records.")
    key = resolve_metric(metric, keys, str(log_path))
    evals = []
    for lineno, rec in records:
        if key not in rec or rec[key] is None:
            continue
        where = f"{log_path}:{lineno}"
        if "samples_seen" not in rec:
            raise DataError(f"{where}: a line with '{key}' must also hold 'samples_seen'.")
        samples = _cell_float(str(rec["samples_seen"]), where, "samples_seen")
        if samples <= 0:
            raise DataError(f"{where}: samples_seen must be positive, got {rec['samples_seen']}.")
        frac = _cell_float(str(rec[key]), where, key)
        if not 0.0 <= frac <= 1.0:
            raise DataError(
                f"{where}: {key} = {frac} is not a fraction in [0, 1]; metrics.jsonl holds "
                "accuracies as fractions (0.632 for 63.2%)."
            )
        evals.append(ScalingPoint(cfg.name, samples, dataset, size, 100.0 * frac, flops, where))
    if not evals:
        raise DataError(f"{log_path}: no line holds '{key}'.")
    if not every_eval:
        evals = [max(evals, key=lambda p: p.samples_seen)]
    return Results(tuple(evals), key, (str(run_dir),))


def _run_dirs(path: Path) -> list[Path]:
    if (path / "metrics.jsonl").is_file() or (path / "config.yaml").is_file():
        return [path]
    subs = sorted(p for p in path.iterdir() if p.is_dir() and (p / "metrics.jsonl").is_file())
    if not subs:
        raise DataError(
            f"{path}: neither a run directory (config.yaml + metrics.jsonl) nor a folder of them."
        )
    return subs


def load_results(
    paths: Sequence[str | Path] = (), metric: str = "top1", every_eval: bool = False
) -> Results:
    """Points from CSV tables and run directories (a folder of runs counts as its runs).

    With no paths, the table shipped with megaclip (openCLIP scaling study) is read.
    """
    if not paths:
        paths = (SHIPPED_TABLE,)
    parts: list[Results] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            parts.extend(read_run(d, metric, every_eval) for d in _run_dirs(path))
        elif path.exists():
            parts.append(read_table(path, metric))
        else:
            raise DataError(f"results not found: {path} (give a CSV table or a run directory).")
    points = tuple(p for part in parts for p in part.points)
    names = list(dict.fromkeys(part.metric for part in parts))
    sources = tuple(s for part in parts for s in part.sources)
    return Results(points, " / ".join(names), sources)
