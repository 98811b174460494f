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


def test_commands_that_need_no_model_start_without_torch(tmp_path):
    """Listing, planning and refusing a bad run config import neither torch nor DeepSpeed:
    an answer in well under a second instead of seconds of megatron / DeepSpeed imports."""
    import subprocess
    import sys

    from tests.mp_util import subprocess_env

    probe = """
import contextlib, io, sys
from megaclip.cli.main import main
plan = ["plan", "--model", "ViT-B-32", "--gpus", "16", "--gpu", "a100-40gb", "--top", "1"]
for argv in (["models"], ["info", "--model", "ViT-G-14"], plan, ["train", "train.stepz=1"]):
    quiet = io.StringIO()
    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
        rc = main(argv)
    heavy = sorted(m for m in ("torch", "deepspeed", "megatron") if m in sys.modules)
    print(argv[0], rc, heavy)
"""
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, env=subprocess_env(), capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["models 0 []", "info 0 []", "plan 0 []", "train 2 []"]
