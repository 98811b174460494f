"""`megaclip models` / `megaclip info`: output and clear errors (exit 2, no traceback)."""

from __future__ import annotations

import json

from tests.mp_util import megaclip_cli

run_cli = megaclip_cli


def test_models_lists_presets():
    out = run_cli("models")
    assert out.returncode == 0, out.stderr
    for name in ("ViT-B-32", "ViT-G-14", "ViT-bigG-14", "tiny"):
        assert name in out.stdout


def test_info_json_big_g():
    out = run_cli("info", "--model", "ViT-bigG-14", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["model"] == "ViT-G-14"
    assert abs(info["params_total"] / 2539.57e6 - 1) < 0.01
    assert abs(info["gmacs_total"] / 532.92 - 1) < 0.01
    assert abs(info["train_gflops_per_sample"] / (6 * info["gmacs_total"]) - 1) < 1e-3


def test_unknown_model_is_one_clear_error():
    out = run_cli("info", "--model", "ViT-Q-14")
    assert out.returncode == 2
    assert "unknown model 'ViT-Q-14'" in out.stderr
    assert "Traceback" not in out.stderr
