"""The planner (feasibility, batch arithmetic, DeepSpeed config) and `megaclip plan` CLI."""

from __future__ import annotations

import json
import subprocess

import pytest
import yaml

from megaclip.cli.main import main
from megaclip.config.deepspeed import deepspeed_config
from megaclip.config.model import load_preset
from megaclip.config.parallel import ParallelConfig
from megaclip.errors import ConfigError
from megaclip.perf.devices import get_device
from megaclip.perf.memory import layout_memory
from megaclip.perf.planner import (
    PlanRequest,
    batch_options,
    nothing_fits_message,
    parse_batch,
    plan,
    plan_ds_config,
)
from megaclip.perf.timing import Cluster
from megaclip.train.ds_config import resolve_ds_config
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
def test_deepspeed_and_the_trainer_accept_the_config(precision, zero):
    from deepspeed.runtime.config import DeepSpeedConfig

    # outside torch.distributed DeepSpeed assumes one rank, so validate a dp = 1 layout
    p = ParallelConfig(
        dp=1, zero_stage=zero, micro_batch_size=4, grad_accum_steps=3, precision=precision
    )
    ds = plan_ds_config(p)
    assert "optimizer" not in ds and "scheduler" not in ds  # megaclip builds AdamW itself
    # The trainer takes it as written: resolving it against the same layout changes nothing.
    assert resolve_ds_config(ds, p, gradient_clipping=1.0) == ds
    cfg = DeepSpeedConfig(ds)
    assert cfg.train_batch_size == 12 and cfg.gradient_accumulation_steps == 3
    assert cfg.zero_optimization_stage == zero
    assert cfg.gradient_clipping == 1.0 and ds["gradient_clipping"] == 1.0
    assert cfg.bfloat16_config.enabled == (precision == "bf16")
    assert cfg.float16_config.enabled == (precision == "fp16")
    assert cfg.optimizer_name is None
    if zero:
        assert cfg.zero_config.overlap_comm  # what the step-time and memory models assume


def test_one_builder_for_planner_trainer_and_bench():
    """The trainer's defaults (no DeepSpeed file) and bench's config are the builder's dict;
    the planner's differs only by overlap_comm, and its memory model predicts that file."""
    from megaclip.bench.harness import ds_config_for
    from megaclip.bench.spec import BenchSpec
    from megaclip.perf.memory import ds_buckets, layout_memory

    cfg = load_preset("ViT-B-32")
    for zero in (0, 1, 2, 3):
        p = ParallelConfig(dp=4, zero_stage=zero, micro_batch_size=8, grad_accum_steps=2)
        built = deepspeed_config(p)
        assert resolve_ds_config({}, p) == built
        assert ds_config_for(BenchSpec(dp=4, zero=zero, micro_batch=8, accum=2), p) == built
        planned = plan_ds_config(p)
        if zero:
            assert planned["zero_optimization"].pop("overlap_comm") is True
        assert planned | {"gradient_clipping": 0.0} == built
        # The planner's memory (its default buckets) is that of the file it writes.
        written = {**ds_buckets(plan_ds_config(p), p.dp), "host": False}
        assert layout_memory(cfg, p, buckets=written) == layout_memory(
            cfg, p, buckets={**ds_buckets(None), "host": False}
        )


def test_run_overlay_keeps_the_train_config_and_sets_model_and_layout(tmp_path):
    from megaclip.cli.plan import run_overlay
    from megaclip.config.train import load_run_config

    train = tmp_path / "train.yaml"
    train.write_text(
        "model: ViT-B-32\nparallel: {tp: 4}\ndeepspeed: ds_configs/zero1_fp32.json\n"
        "optim: {lr: 0.002}\ntrain: {steps: 7}\n"
    )
    p = ParallelConfig(dp=2, zero_stage=2, micro_batch_size=4, schedule="keep")
    data = run_overlay(p, "tiny", load_preset("tiny"), str(train))
    assert "deepspeed" not in data and data["model"] == "tiny"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(data))
    run = load_run_config(tmp_path / "run.yaml")
    assert run.parallel == p and run.optim.lr == 0.002 and run.train.steps == 7
    assert run.model == load_preset("tiny")


def test_launch_argv():
    from megaclip.cli.plan import launch_argv

    p = ParallelConfig(tp=2, pp=4, dp=32, zero_stage=1, micro_batch_size=8, grad_accum_steps=5)
    cmd = " ".join(launch_argv(p, 8))
    assert cmd.startswith("python -m megaclip.cli.launch --launcher deepspeed --hostfile hostfile")
    assert "--num-nodes 32 --gpus-per-node 8 --config run.yaml --ds-config ds_config.json" in cmd


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
    assert ds["bf16"] == {"enabled": True} and "optimizer" not in ds
    launch = (tmp_path / "launch.sh").read_text()
    assert "--num-nodes 128\n              --gpus-per-node 8" in launch
    assert not (tmp_path / "hostfile").exists()  # several nodes: the user's hostfile
    run = yaml.safe_load((tmp_path / "run.yaml").read_text())
    assert (
        run["model"] == "ViT-G-14"
        and run["parallel"]["dp"] * run["parallel"]["tp"] * run["parallel"]["pp"] == 1024
    )
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
