"""`megaclip plot`: a PNG from metrics.jsonl; clear errors for missing or broken files."""

from __future__ import annotations

import json

import pytest

from megaclip.cli.plot import plot_run, read_metrics
from megaclip.errors import DataError


def test_plot_writes_png(tmp_path):
    rows = [
        {
            "step": s,
            "loss": 5 - s / 10,
            "logit_scale": 14 + s / 100,
            "mfu": 0.1,
            "samples_per_s_per_device": 100 + s,
        }
        for s in range(10, 60, 10)
    ]
    rows.append({"step": 50, "zeroshot_top1": 0.5, "zeroshot_top5": 0.9})
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = plot_run(tmp_path, tmp_path / "curves.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_plot_errors(tmp_path):
    with pytest.raises(DataError, match="metrics.jsonl not found"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 2}\n{"step": 2, "lo')
    with pytest.raises(DataError, match=r"metrics.jsonl:2: not a JSON object"):
        read_metrics(tmp_path)
