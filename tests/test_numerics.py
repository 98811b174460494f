"""Non-finite losses/gradients skip the step (parameters untouched) in every ZeRO / PP layout."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.mp_util import megaclip_cli, torchrun

pytestmark = pytest.mark.multiproc


@pytest.mark.parametrize(
    "spec",
    [{"pp": 1, "zero": 0}, {"pp": 2, "zero": 0}, {"pp": 2, "zero": 1}, {"pp": 1, "zero": 3}],
    ids=["zero0", "pp2-zero0", "pp2-zero1", "zero3"],
)
def test_nan_step_is_skipped(tmp_path, spec):
    torchrun(2, "tests/workers/nan_step.py", json.dumps(spec), tmp_path, timeout=300)
    for rank in (0, 1):
        clean, poisoned, after = torch.load(tmp_path / f"rank{rank}.pt")
        assert not clean["skipped"] and clean["changed"] > 0
        assert math.isnan(poisoned["loss"]) and poisoned["skipped"]
        assert poisoned["changed"] == 0.0 and poisoned["finite"]
        assert not after["skipped"] and after["changed"] > 0 and math.isfinite(after["loss"])


def test_divergence_stops_with_a_clear_message(tmp_path):
    out = megaclip_cli(
        "train",
        "data.kind=synthetic",
        "model=tiny",
        "optim.lr=1e30",
        "train.max_bad_steps=2",
        "train.steps=20",
        "train.log_every=100",
        f"train.out_dir={tmp_path}",
        "train.tensorboard=false",
        timeout=200,
    )
    assert out.returncode == 2, out.stderr[-3000:]
    assert "non-finite for 2 steps in a row" in out.stderr
    assert "Traceback" not in out.stderr
