"""Disk planning: the bytes a run's checkpoints and export take, and the pre-flight that refuses
a run whose out_dir cannot hold them (the run that dies of a full disk at its first save)."""

from __future__ import annotations

import pytest
import torch

from megaclip.config.model import load_preset
from megaclip.config.parallel import ParallelConfig
from megaclip.config.train import run_config_from_dict
from megaclip.errors import ConfigError
from megaclip.model.clip import ClipModel
from megaclip.model.flops import model_cost
from megaclip.parallel.sharding import param_split
from megaclip.perf.memory import checkpoint_bytes, checkpoint_bytes_per_param, export_bytes
from megaclip.train import preflight


def test_bytes_per_parameter_of_a_checkpoint():
    # fp32: ZeRO-0 module + 2 moments; ZeRO-1/2 + the fp32 partition; ZeRO-3 partition + moments
    assert [checkpoint_bytes_per_param("fp32", z) for z in range(4)] == [12, 16, 16, 12]
    assert [checkpoint_bytes_per_param("bf16", z) for z in range(4)] == [14, 14, 14, 12]


def test_checkpoint_and_export_bytes_count_replicas_once_per_tp_rank():
    cfg = load_preset("ViT-B-32")
    n = model_cost(cfg).params_total
    assert export_bytes(cfg) == 4 * n
    one = ParallelConfig(dp=2, zero_stage=1)
    assert checkpoint_bytes(cfg, one) == 16 * n  # DP ranks share one copy of the model
    with torch.device("meta"):
        named = list(ClipModel(cfg).named_parameters())
    replicated = sum(p.numel() for k, p in named if param_split(k).dim is None)
    tp2 = ParallelConfig(tp=2, dp=1, zero_stage=1)
    assert checkpoint_bytes(cfg, tp2) == 16 * (n + replicated)  # each TP rank saves its copy


def _run(tmp_path, **train):
    return run_config_from_dict(
        {"model": "ViT-B-32", "train": {"out_dir": str(tmp_path / "run"), **train}}
    )


def test_disk_need_counts_rotation_and_resumed_checkpoints(tmp_path):
    cfg = _run(tmp_path, steps=100, save_every=10, keep_last=2)
    par = cfg.parallel
    need, new, one, export = preflight.disk_need(cfg, par)
    assert new == 3  # keep_last + 1 exist while a save is published
    assert need == pytest.approx(3 * one + export)
    assert preflight.disk_need(cfg, par, existing=2)[1] == 1  # resumed: room for one more
    assert preflight.disk_need(cfg, par, existing=5)[1] == 1
    keep_all = _run(tmp_path, steps=100, save_every=10, keep_last=0)
    assert preflight.disk_need(keep_all, par)[1] == 11  # every save, and the final one
    final_only = _run(tmp_path, steps=100, save_every=0, keep_last=2)
    assert preflight.disk_need(final_only, par)[1] == 1


def test_a_run_that_would_fill_the_disk_is_refused_in_one_line(tmp_path, monkeypatch):
    cfg = _run(tmp_path, steps=100, save_every=10, keep_last=2)
    need = preflight.disk_need(cfg, cfg.parallel)[0]

    class Usage:
        free = int(need) + 1

    monkeypatch.setattr("shutil.disk_usage", lambda path: Usage)
    preflight.check_disk(cfg, cfg.parallel)  # just fits
    Usage.free = int(need) - 1
    with pytest.raises(ConfigError) as err:
        preflight.check_disk(cfg, cfg.parallel)
    msg = str(err.value)
    assert "\n" not in msg and "GiB free, but this run writes up to" in msg
    assert "3 checkpoint(s)" in msg and "train.keep_last=2" in msg and "final export" in msg
