"""`megaclip train`: invalid settings fail before any process group; a short real run learns."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.mp_util import megaclip_cli, torchrun


def train_cli(*args: str, env=None) -> subprocess.CompletedProcess:
    return megaclip_cli("train", *args, env=env, timeout=120)


SYNTH = ["data.kind=synthetic", "model=tiny", "parallel.dp=1", "deepspeed=null"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["parallel.pp=2", "parallel.zero_stage=2"], "ZeRO stage 2 cannot be combined"),
        (["parallel.tp=3"], "tensor parallel size 3 does not divide"),
        (["parallel.dp=2"], "launched 1 processes but tp * pp * dp = 1 * 1 * 2 = 2"),
        (["parallel.micro_batch_size=0"], "parallel.micro_batch_size must be >= 1"),
        (["train.stepz=3"], "unknown key 'stepz' (did you mean 'steps'?)"),
        (["model=ViT-Q-14"], "unknown model 'ViT-Q-14'"),
        (["model=demo", "data.kind=webdataset", "data.train=/nope/{0..3}.tar"], "/nope/0.tar"),
    ],
)
def test_invalid_settings_fail_before_process_groups(overrides, message):
    out = train_cli(*SYNTH, *overrides)
    assert out.returncode == 2, out.stderr[-2000:]
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert "resolved config" not in out.stdout  # printed only after the process groups exist


def test_deepspeed_json_conflicts_are_reported(tmp_path):
    bad_batch = tmp_path / "batch.json"
    bad_batch.write_text(json.dumps({"train_batch_size": 7}))
    out = train_cli(*SYNTH, "--deepspeed", str(bad_batch))
    assert out.returncode == 2 and "train_batch_size=7" in out.stderr
    bad_json = tmp_path / "broken.json"
    bad_json.write_text("{ not json")
    out = train_cli(*SYNTH, "--deepspeed", str(bad_json))
    assert out.returncode == 2 and "not valid JSON at line 1" in out.stderr
    zero3_pp = tmp_path / "z3.json"
    zero3_pp.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    out = train_cli(*SYNTH, "--deepspeed", str(zero3_pp))
    assert out.returncode == 2 and "ZeRO stage 3 but parallel.zero_stage is 1" in out.stderr


@pytest.mark.multiproc
def test_short_two_process_run_learns_and_evaluates(tmp_path):
    from megaclip.data.demo import DemoConfig, make_demo

    data = tmp_path / "data"
    make_demo(str(data), DemoConfig(image_size=32, shards=2))
    run = tmp_path / "run"
    torchrun(
        2,
        "-m",
        "megaclip",
        "train",
        "--config",
        "configs/demo.yaml",
        f"data.train={data}/train-{{000000..000001}}.tar",
        f"zeroshot.data={data}/val-000000.tar",
        f"zeroshot.classnames={data}/classnames.txt",
        f"zeroshot.templates={data}/templates.txt",
        "zeroshot.every=40",
        # 80 steps (20 of warmup): after 60 of a 60-step run the loss ratio was 0.81 (seed 0), after
        # 80 of an 80-step run it is 0.67-0.72 (seeds 0-2), clear of the 0.8 bound below.
        "train.steps=80",
        "train.log_every=5",
        f"train.out_dir={run}",
        "parallel.micro_batch_size=32",
        timeout=300,
    )
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 16
    assert losses[-1] < 0.8 * losses[0], losses
    zeroshot = [r for r in records if "zeroshot_top1" in r]
    assert [r["step"] for r in zeroshot] == [40, 80]
    assert zeroshot[-1]["zeroshot_top1"] > 0.2  # chance is 0.1
    summary = json.loads((run / "summary.json").read_text())
    assert (run / "final_open_clip.pt").is_file() and summary["steps"] == 80
    for key in ("samples_per_s", "tflops_per_device", "mfu", "peak_memory_gib", "lr"):
        assert key in records[0]


@pytest.mark.multiproc
def test_cli_resume_continues_exactly(tmp_path):
    """A run stopped after 2 of 4 steps and started again logs the uninterrupted run's losses."""
    common = [
        "--config",
        "configs/demo.yaml",
        "data.kind=synthetic",
        "model=tiny",
        "zeroshot.data=",
        "parallel.micro_batch_size=4",
        "train.steps=4",
        "train.log_every=1",
        "train.save_every=0",
        "train.tensorboard=false",
    ]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    torchrun(2, "-m", "megaclip", "train", *common, f"train.out_dir={whole}", timeout=300)
    torchrun(
        2,
        "-m",
        "megaclip",
        "train",
        *common,
        f"train.out_dir={parts}",
        "train.exit_after=2",
        timeout=300,
    )
    assert (parts / "checkpoints" / "latest").is_file()
    torchrun(2, "-m", "megaclip", "train", *common, f"train.out_dir={parts}", timeout=300)

    def losses(run):
        rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if "loss" in r}

    a, b = losses(whole), losses(parts)
    assert sorted(b) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (a, b)
