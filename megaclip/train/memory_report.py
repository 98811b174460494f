"""``megaclip plan --run <out_dir>``: a run's measured memory per rank next to the prediction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from megaclip.config.train import run_config_from_dict
from megaclip.errors import ConfigError
from megaclip.perf.memory import rank_peaks
from megaclip.train.memlog import GIB, MEMORY_DIR, read_run_memory
from megaclip.train.resolve import resolve_run


def run_memory_report(out_dir: str | Path) -> dict[str, Any]:
    """Measured (memory/rank_*.json) next to predicted (the planner) for a run directory."""
    out_dir = Path(out_dir)
    config = out_dir / "config.yaml"
    records = read_run_memory(out_dir)
    if not config.is_file() or not records:
        raise ConfigError(
            f"{out_dir} is not a run directory with memory records ({config.name} and "
            f"{MEMORY_DIR}/rank_*.json are written by `megaclip train`)"
        )
    data = yaml.safe_load(config.read_text(encoding="utf-8"))
    # config.yaml is the resolved run (its schedule decided): resolved again, without a budget,
    # it gives the same layout and DeepSpeed dict the run trained with.
    run = resolve_run(run_config_from_dict(data, where=str(config)), budget=None)
    host = records[0].get("measure") == "rss"
    predicted = rank_peaks(
        run.cfg.model, run.par, host=host, ds=run.ds, loss_chunk=run.loss_chunk_size
    )
    ranks = []
    for rec in records:
        pred = predicted[rec["rank"]]
        parts = {k: v for k, v in pred.stage.as_dict().items() if k.endswith("_gib")}
        parts["runtime_gib"] = pred.runtime / GIB
        ranks.append(
            {
                "rank": rec["rank"],
                "measured_gib": rec["peak_gib"],
                "predicted_gib": pred.peak / GIB,
                "ratio": rec["peak_gib"] / (pred.peak / GIB),
                "phases": {p["phase"]: p["peak_gib"] for p in rec["phases"]},
                "predicted_parts_gib": parts,
            }
        )
    return {
        "run": str(out_dir),
        "model": run.cfg.model.name,
        "measure": records[0]["measure"],
        "ranks": ranks,
    }
