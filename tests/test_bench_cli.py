"""`megaclip bench` smoke run on the tiny model prints one JSON line with the expected keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from megaclip.cli.main import main
from tests.mp_util import REPO

KEYS = {
    "model", "layout", "device", "steps", "warmup", "step_time_s", "step_time_mean_s",
    "samples_per_s", "samples_per_s_per_device", "model_tflops_per_device",
    "hardware_tflops_per_device", "mfu", "hfu", "macs_per_sample", "peak_tflops_per_device",
    "peak_source", "probe_tflops", "peak_memory_kind", "peak_memory_bytes_per_rank",
    "step_memory_delta_bytes_per_rank", "time_split", "bubble", "loss", "mfu_cpu_time",
    "cpu_s_per_step_per_rank",
}  # fmt: skip


def test_bench_cli_json_smoke():
    env = dict(os.environ, PYTHONPATH=str(REPO), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    env.pop("RANK", None), env.pop("LOCAL_RANK", None), env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "megaclip", "bench", "--model", "tiny", "--micro-batch", "4",
           "--warmup", "1", "--steps", "2", "--probe-size", "128", "--json"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 1 and lines[0].startswith("{"), proc.stdout  # one JSON line, nothing else
    r = json.loads(lines[0])
    assert set(r) >= KEYS, KEYS - set(r)
    assert r["model"] == "tiny" and r["device"] == "cpu" and r["steps"] == 2
    assert r["layout"] == {
        "tp": 1,
        "pp": 1,
        "dp": 1,
        "zero": 1,
        "micro_batch": 4,
        "accum": 1,
        "global_batch": 4,
        "precision": "fp32",
        "recompute": False,
        "world_size": 1,
        "schedule": "keep",
    }  # fmt: skip  (accum 1: auto resolves to keep, and the report says which ran)
    assert r["samples_per_s"] > 0 and r["samples_per_s"] == r["samples_per_s_per_device"]
    assert abs(r["samples_per_s"] * r["step_time_s"] - 4) < 1e-9
    # MFU = 6 MACs x samples/s / peak, with the peak probed in the same run.
    want = 6 * r["macs_per_sample"] * r["samples_per_s"] / (r["peak_tflops_per_device"] * 1e12)
    assert abs(r["mfu"] - want) < 1e-12 and 0 < r["mfu"] < 1 and r["hfu"] == r["mfu"]
    assert set(r["probe_tflops"]) == {"fp32", "bf16"} and r["peak_source"] == "probe:fp32:128^3"
    assert len(r["peak_memory_bytes_per_rank"]) == 1 and r["peak_memory_bytes_per_rank"][0] > 0
    assert set(r["time_split"]) == {"features_s", "loss_s", "backward_s", "optimizer_s", "comm_s"}
    assert r["time_split"]["loss_s"] > 0 and r["time_split"]["optimizer_s"] > 0
    assert r["bubble"] is None and r["loss"] > 0
    assert 0 < r["mfu_cpu_time"] < 1 and r["cpu_s_per_step_per_rank"][0] > 0


def test_bench_cli_rejects_bad_counts(capsys):
    assert main(["bench", "--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
