"""Measured-vs-analytic comparison tables (pure functions over the workers' JSON results).

The analytic side comes from :mod:`megaclip.perf` (comm_volume, rank_model_states).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megaclip.bench.spec import BenchSpec
from megaclip.config.model import ClipConfig
from megaclip.config.parallel import ParallelConfig
from megaclip.perf.comm import Volume
from megaclip.perf.memory import default_stages, ds_buckets, rank_model_states, stage_params

MODELLED = ("tp", "dp", "pp", "loss")


@dataclass(frozen=True)
class CommRow:
    """One (class, op) of one rank: measured and analytic payload / sent bytes per step."""

    cls: str
    op: str
    calls: float
    payload: float
    sent: float
    analytic_calls: float | None
    analytic_payload: float | None
    analytic_sent: float | None

    @property
    def ratio(self) -> float | None:
        """measured / analytic payload (None when the row is not modelled)."""
        if self.analytic_payload is None or self.analytic_payload == 0:
            return None
        return self.payload / self.analytic_payload


def compare_comm(measured: Sequence[dict[str, Any]], analytic: Sequence[Volume]) -> list[CommRow]:
    """Join a rank's measured (class, op) totals with the analytic volumes ("self" dropped)."""
    want = {(v.cls, v.op): v for v in analytic}
    rows: list[CommRow] = []
    seen = set()
    for m in measured:
        key = (m["cls"], m["op"])
        if m["cls"] == "self":
            continue
        seen.add(key)
        v = want.get(key)
        rows.append(
            CommRow(
                key[0],
                key[1],
                m["calls"],
                m["payload_bytes"],
                m["sent_bytes"],
                None if v is None else v.calls,
                None if v is None else v.payload_bytes,
                None if v is None else v.sent_bytes,
            )
        )
    for key, v in want.items():
        if key not in seen:
            rows.append(
                CommRow(key[0], key[1], 0, 0.0, 0.0, v.calls, v.payload_bytes, v.sent_bytes)
            )
    return rows


@dataclass(frozen=True)
class CommSummary:
    """Totals of one rank: modelled measured vs analytic bytes, and what is not modelled."""

    measured_payload: float
    analytic_payload: float
    measured_sent: float
    analytic_sent: float
    unmodelled_payload: float
    unmodelled_ops: tuple[str, ...]

    @property
    def ratio(self) -> float:
        """measured / analytic payload of the modelled rows (nan if none)."""
        return self.measured_payload / self.analytic_payload if self.analytic_payload else math.nan

    @property
    def sent_ratio(self) -> float:
        """measured / analytic ring bytes sent of the modelled rows."""
        return self.measured_sent / self.analytic_sent if self.analytic_sent else math.nan


def summarize_comm(rows: Sequence[CommRow]) -> CommSummary:
    """Sum the modelled rows (measured and analytic) and the unmodelled measured ones."""
    mp = ap = ms = asent = up = 0.0
    unmod = []
    for r in rows:
        if r.analytic_payload is None:
            up += r.payload
            unmod.append(f"{r.cls}:{r.op}")
            continue
        mp += r.payload
        ap += r.analytic_payload
        ms += r.sent
        asent += r.analytic_sent or 0.0
    return CommSummary(mp, ap, ms, asent, up, tuple(unmod))


def memory_row(
    cfg: ClipConfig, par: ParallelConfig, result: dict[str, Any], ds: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Counted vs predicted model-state bytes of one rank's memory-worker result.

    The prediction is :func:`megaclip.perf.memory.rank_model_states` with the bucket settings of
    the run's resolved DeepSpeed config ``ds`` (None: the planner's); ``buffers`` is its persistent
    buffer term (ZeRO-3's gradient bucket), to compare with the count's "other".
    """
    states = rank_model_states(cfg, par, result["pp"], **ds_buckets(ds))
    analytic = {
        "params": states.params,
        "grads": states.grads,
        "optimizer": states.optimizer,
        "total": states.model_states,
    }
    counted = result["counted"]
    row: dict[str, Any] = {
        "rank": result["rank"],
        "pp": result["pp"],
        "n_analytic": stage_params(cfg, par.tp, default_stages(cfg, par.pp)[result["pp"]]),
        "n_measured": result["params_local"],
        "other": counted["other"],
        "buffers": states.buffers,
    }
    for key in ("params", "grads", "optimizer", "total"):
        row[key] = counted[key]
        row[f"{key}_analytic"] = analytic[key]
        row[f"{key}_ratio"] = counted[key] / analytic[key] if analytic[key] else math.nan
    return row


# ---------------------------------------------------------------- running workers


def run_workers(kind: str, spec: BenchSpec, nproc: int, timeout: float = 600.0) -> list[dict]:
    """Spawn ``nproc`` ranks of :mod:`megaclip.cli.bench_worker`; return their JSON results."""
    from megaclip.bench.launch import spawn

    with tempfile.TemporaryDirectory(prefix=f"megaclip-{kind}-") as tmp:
        proc = spawn(
            nproc,
            ["-m", "megaclip.cli.bench_worker", kind, tmp, spec.to_json()],
            capture=True,
            timeout=timeout,
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{kind} worker failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n"
                f"{proc.stderr[-5000:]}"
            )
        results = [json.loads(p.read_text()) for p in sorted(Path(tmp).glob("rank*.json"))]
    if len(results) != nproc:
        raise RuntimeError(f"{kind} worker: expected {nproc} results, got {len(results)}")
    return sorted(results, key=lambda r: r["rank"])


#: A benchmark layout row: (tp, pp, dp, zero, micro, accum, ds_overrides).
LayoutRow = tuple[int, int, int, int, int, int, dict[str, Any]]


def layout_spec(row: LayoutRow, **fields: Any) -> BenchSpec:
    """The BenchSpec of a layout row, other fields (model, precision, steps, ...) given."""
    tp, pp, dp, zero, micro, accum, ds = row
    return BenchSpec(
        tp=tp, pp=pp, dp=dp, zero=zero, micro_batch=micro, accum=accum, ds_overrides=ds, **fields
    )


def report_all(
    names: Iterable[str],
    measure: Callable[[str], dict],
    show: Callable[[dict], None],
    json_path: str | None = None,
) -> int:
    """Measure and print each named case as it finishes; all results to ``json_path`` if set."""
    out = []
    for name in names:
        res = measure(name.strip())
        show(res)
        sys.stdout.flush()
        out.append(res)
    if json_path:
        Path(json_path).write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


def fmt_bytes(x: float | None) -> str:
    """Bytes as a short human string (B / KiB / MiB / GiB), '-' for None."""
    if x is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {unit}"
    return f"{x:.0f} B"
