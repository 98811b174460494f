"""The planner (feasibility, batch arithmetic, DeepSpeed config) and `megaclip plan` CLI."""

from __future__ import annotations

import json
import subprocess

import pytest

from megaclip.cli.main import main
from megaclip.config.model import load_preset
from megaclip.config.parallel import ParallelConfig
from megaclip.errors import ConfigError
from megaclip.perf.devices import get_device
from megaclip.perf.memory import layout_memory
from megaclip.perf.planner import (
    PlanRequest,
    batch_options,
    deepspeed_config,
    launch_command,
    nothing_fits_message,
    parse_batch,
    plan,
)
from megaclip.perf.timing import Cluster
from tests.mp_util import megaclip_cli


def test_parse_batch():
    assert parse_batch("160k") == 163840
    assert parse_batch("32k") == 32768
    assert parse_batch("1e5") == 100000
    assert parse_batch("86016") == 86016
    assert parse_batch("1.5k") == 1536
    for bad in ("abc", "0", "1.5", "-3", "k"):
        with pytest.raises(ConfigError):
            parse_batch(bad)


def test_batch_options_exact_or_closest():
    pairs = batch_options(4096, 8, 0.0, 1024)
    assert (512, 1) in pairs and (1, 512) in pairs
    assert all(b * m * 8 == 4096 for b, m in pairs)
    # 1000 over 16 ranks: 62.5 per rank; within 1%: nothing, so the closest (992 or 1008)
    closest = batch_options(1000, 16, 0.01, 1024)
    assert {abs(b * m * 16 - 1000) for b, m in closest} == {8}


def _request(**kw) -> PlanRequest:
    base = dict(
        model=load_preset("ViT-B-16"),
        cluster=Cluster(get_device("a100-40gb"), 32),
        global_batch=32768,
    )
    return PlanRequest(**{**base, **kw})


def test_plan_returns_only_feasible_valid_layouts():
    req = _request(memory_margin=0.5)  # tight memory: some layouts must be rejected
    result = plan(req)
    assert result.feasible and result.tried > len(result.feasible)
    heads = (req.model.vision.heads, req.model.text.heads)
    rates = []
    for c in result.feasible:
        p = c.par
        assert p.tp * p.pp * p.dp == 32
        assert p.pp == 1 or p.zero_stage <= 1
        assert all(h % p.tp == 0 for h in heads) and p.tp <= 8
        assert abs(p.global_batch_size - 32768) <= 0.01 * 32768
        # memory recomputed independently of the planner's cached stages
        peak = max(m.peak for m in layout_memory(req.model, p, schedule=p.schedule))
        assert peak == pytest.approx(c.peak_bytes) and peak <= req.usable_bytes
        # auto schedule: recompute only where keeping the graphs would not fit (or cannot run)
        kept = max(m.peak for m in layout_memory(req.model, p, schedule="keep"))
        forced = p.zero_stage == 3 and p.pp == 1 and p.grad_accum_steps > 1
        assert p.schedule in ("keep", "recompute")
        assert (p.schedule == "recompute") == (forced or kept > req.usable_bytes), p
        rates.append(c.time.samples_per_s)
    best = max(rates)
    assert rates[0] >= best * (1 - req.tie)  # the top row is within the tie band of the fastest


def test_nothing_fits_says_what_to_change():
    # bf16 weights + fp32 master and Adam moments alone: 2.54e9 * 16 B = 40.6 GB > one A100-40GB
    req = _request(model=load_preset("ViT-G-14"), cluster=Cluster(get_device("a100-40gb"), 1))
    result = plan(req)
    assert not result.feasible and result.smallest_misfit is not None
    msg = nothing_fits_message(result)
    assert "no layout of ViT-G-14" in msg and "more GPUs" in msg and "--global-batch" in msg


def test_gpus_not_multiple_of_node():
    with pytest.raises(ConfigError, match="not a multiple of the 8 GPUs per node"):
        plan(_request(cluster=Cluster(get_device("a100-40gb"), 12)))


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_deepspeed_accepts_the_config(precision, zero):
    from deepspeed.runtime.config import DeepSpeedConfig

    # outside torch.distributed DeepSpeed assumes one rank, so validate a dp = 1 layout
    p = ParallelConfig(
        dp=1, zero_stage=zero, micro_batch_size=4, grad_accum_steps=3, precision=precision
    )
    ds = deepspeed_config(p)
    cfg = DeepSpeedConfig(ds)
    assert cfg.train_batch_size == 12 and cfg.gradient_accumulation_steps == 3
    assert cfg.zero_optimization_stage == zero
    assert cfg.gradient_clipping == 1.0 and ds["gradient_clipping"] == 1.0
    assert cfg.bfloat16_config.enabled == (precision == "bf16")
    assert cfg.float16_config.enabled == (precision == "fp16")
    assert cfg.optimizer_name == "adamw"


def test_launch_command():
    p = ParallelConfig(tp=2, pp=4, dp=32, zero_stage=1, micro_batch_size=8, grad_accum_steps=5)
    cmd = launch_command(p, 8)
    assert cmd.startswith("deepspeed --hostfile hostfile --num_nodes 32 --num_gpus 8 --module ")
    assert "megaclip.cli.main train --config train.yaml --deepspeed ds_config.json" in cmd
    for part in ("parallel.tp=2", "parallel.pp=4", "parallel.dp=32", "parallel.zero_stage=1"):
        assert part in cmd


# ------------------------------------------------------------------ CLI (subprocess)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return megaclip_cli("plan", *args)


def test_cli_table_and_out_dir(tmp_path):
    out = run_cli(
        "--model", "ViT-G-14", "--gpus", "1024", "--gpu", "a100-40gb",
        "--global-batch", "160k", "--top", "3", "--out-dir", str(tmp_path),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "global batch 163840 (from '160k')" in out.stdout
    header = next(i for i, line in enumerate(lines) if line.split()[:3] == ["#", "tp", "pp"])
    assert [line.split()[0] for line in lines[header + 1 : header + 4]] == ["1", "2", "3"]
    ds = json.loads((tmp_path / "ds_config.json").read_text())
    assert ds["train_batch_size"] == 163840 and ds["gradient_clipping"] == 1.0
    assert ds["bf16"] == {"enabled": True} and ds["optimizer"]["type"] == "AdamW"
    launch = (tmp_path / "launch.sh").read_text()
    assert "--num_nodes 128 --num_gpus 8" in launch
    saved = json.loads((tmp_path / "plan.json").read_text())
    assert saved["plans"][0]["global_batch"] == 163840


def test_cli_unknown_gpu_is_one_line_exit_2():
    out = run_cli("--model", "ViT-G-14", "--gpus", "64", "--gpu", "v100")
    assert out.returncode == 2
    assert "unknown gpu 'v100'; valid: a100-40gb, a100-80gb, h100-80gb" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


# The remaining CLI cases run in-process through the same entry point (subprocesses cost
# several seconds each on the shared CI cores).


def test_cli_json_and_calibrate(capsys):
    rc = main(
        ["plan", "--model", "ViT-B-32", "--gpus", "8", "--gpu", "h100-80gb", "--json", "--top", "2"]
    )
    assert rc == 0
    data = json.loads(capsys.readouterr().out)
    assert len(data["plans"]) == 2 and data["gpu"] == "h100-80gb"
    assert data["deepspeed_config"]["train_batch_size"] == data["plans"][0]["global_batch"]
    assert main(["plan", "--calibrate"]) == 0
    cal = capsys.readouterr().out
    assert "ViT-L/14" in cal and "ViT-G/14" in cal and "cross-check" in cal
    assert main(["plan", "--calibrate", "--json"]) == 0
    runs = json.loads(capsys.readouterr().out)["runs"]
    assert all(abs(r["error"]) < 0.05 for r in runs)


@pytest.mark.parametrize(
    "args, text",
    [
        (["--model", "ViT-G-14", "--gpus", "1001", "--gpu", "a100-40gb"], "not a multiple"),
        (["--model", "ViT-G-14", "--gpus", "1", "--gpu", "a100-40gb"], "no layout of ViT-G-14"),
        (["--gpus", "8", "--gpu", "a100-40gb"], "plan needs --model"),
        (["--model", "ViT-B-32", "--gpus", "8", "--gpu", "cpu", "--global-batch", "x"], "cannot"),
        (["--model", "ViT-B-32", "--gpus", "8", "--gpu", "cpu", "--top", "0"], "--top"),
    ],
)
def test_cli_errors_are_one_line_exit_2(args, text, capsys):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert text in err and err.startswith("megaclip plan: error: ")
    assert len(err.strip().splitlines()) == 1
