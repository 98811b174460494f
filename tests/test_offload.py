"""ZeRO-Infinity (ZeRO-3 with parameters and optimizer states on NVMe): the path rule, the
pre-flight refusals, and a 2-rank run that trains exactly like one process (issue 21)."""

from __future__ import annotations

import pytest
import torch

from megaclip.config.model import resolve_model
from megaclip.config.parallel import ParallelConfig
from megaclip.errors import ConfigError
from megaclip.train import preflight
from megaclip.train.ds_config import fill_offload_paths, load_ds_config, nvme_offload
from tests.mp_util import REPO

NVME = REPO / "ds_configs" / "zero3_nvme_fp32.json"


def test_offload_dir_fills_every_nvme_section_and_wins():
    ds = load_ds_config(NVME)
    assert nvme_offload(ds) == ["offload_param"]  # optimizer states: host memory (see below)
    out = fill_offload_paths(ds, "/disk/a")
    zero = out["zero_optimization"]
    assert zero["offload_param"]["nvme_path"] == "/disk/a"
    assert "nvme_path" not in zero["offload_optimizer"]
    assert "nvme_path" not in ds["zero_optimization"]["offload_param"]  # the input is untouched
    written = fill_offload_paths(out, "")  # a path in the JSON is kept without offload_dir
    assert written["zero_optimization"]["offload_param"]["nvme_path"] == "/disk/a"
    assert fill_offload_paths({"zero_optimization": {"stage": 3}}, "") == {
        "zero_optimization": {"stage": 3}
    }


def test_a_zero_section_deepspeed_rejects_is_one_line():
    from megaclip.train.ds_config import check_zero_section

    ds = load_ds_config(NVME)
    ds["zero_optimization"]["offload_optimizer"]["buffer_size"] = 1  # a key of offload_param
    with pytest.raises(ConfigError, match="zero_optimization.offload_optimizer.buffer_size: Extra"):
        check_zero_section(ds)
    check_zero_section(load_ds_config(NVME))


def test_nvme_without_a_path_or_below_zero3_is_refused():
    with pytest.raises(ConfigError, match="names no path: set train.offload_dir"):
        fill_offload_paths(load_ds_config(NVME), "")
    ds = load_ds_config(NVME)
    ds["zero_optimization"]["stage"] = 2
    with pytest.raises(ConfigError, match="needs zero_optimization.stage 3"):
        fill_offload_paths(ds, "/disk")
    ds = load_ds_config(NVME)
    ds["zero_optimization"]["offload_optimizer"]["device"] = "nvme"
    with pytest.raises(ConfigError, match="optimizer states to nvme: .* set offload_optimizer"):
        fill_offload_paths(ds, "/disk")


PAR = ParallelConfig(dp=2, zero_stage=3, micro_batch_size=4)


def _nvme_run(tmp_path):
    cfg, par = resolve_model("tiny"), PAR
    return cfg, par, fill_offload_paths(load_ds_config(NVME), str(tmp_path / "offload"))


def test_preflight_refuses_a_full_disk_and_a_missing_libaio(tmp_path, monkeypatch):
    cfg, par, ds = _nvme_run(tmp_path)
    need = preflight.offload_bytes_per_rank(cfg, par)
    assert need == pytest.approx(4 * cfg_params(cfg) / 2)  # fp32 parameters, half a DP rank
    both = preflight.offload_bytes_per_rank(cfg, par, ("offload_param", "offload_optimizer"))
    assert both == pytest.approx(16 * cfg_params(cfg) / 2)  # + AdamW's master and moments
    monkeypatch.setattr(preflight, "async_io_problem", lambda: None)
    preflight.check_offload(cfg, par, ds, local=2)  # the tiny model fits anywhere

    class Usage:
        free = int(need)  # room for one rank, not two

    monkeypatch.setattr("shutil.disk_usage", lambda path: Usage)
    with pytest.raises(ConfigError, match=r"needs about .* GiB at .*offload for this node's ranks"):
        preflight.check_offload(cfg, par, ds, local=2)
    monkeypatch.setattr(preflight, "async_io_problem", lambda: "libaio is missing (...)")
    with pytest.raises(ConfigError, match="async_io op, which cannot build: libaio is missing"):
        preflight.check_offload(cfg, par, ds, local=2)
    (tmp_path / "file").write_text("x")
    ds = fill_offload_paths(load_ds_config(NVME), str(tmp_path / "file"))
    monkeypatch.setattr(preflight, "async_io_problem", lambda: None)
    with pytest.raises(ConfigError, match="is a file, not a directory"):
        preflight.check_offload(cfg, par, ds, local=2)


def cfg_params(cfg) -> int:
    from megaclip.model.clip import ClipModel

    return sum(p.numel() for p in ClipModel(cfg).parameters())


def test_async_io_op_can_build_here():
    """scripts/install.sh provides libaio (as root) so NVMe offload runs on this machine kind."""
    assert preflight.async_io_problem() is None


@pytest.mark.multiproc
def test_zero3_nvme_offload_trains_like_one_process(tmp_path):
    """dp=2 ZeRO-3 with parameters swapped through files (AdamW states in host memory) equals
    the single-process reference; the build fills NVMe partitions through DeepSpeed's gather."""
    from tests.test_engine_layouts import _compare, _run

    ds = load_ds_config(NVME)
    zero = ds["zero_optimization"]
    # The demo model (3.6M parameters): DeepSpeed keeps parameters below
    # stage3_param_persistence_threshold (1e5 elements) resident; 0 offloads every parameter.
    # Buffers of 4M elements hold its largest tensor (3.2M, the token table).
    zero["stage3_param_persistence_threshold"] = 0
    zero["offload_param"]["buffer_size"] = 4_000_000
    nvme = tmp_path / "nvme"
    got = _run(
        tmp_path,
        2,
        model="demo",
        tp=1,
        pp=1,
        zero=3,
        micro=4,
        accum=1,
        ds=ds,
        offload_dir=str(nvme),
    )
    swapped = torch.load(tmp_path / "stage0.pt")["swapped_bytes"]
    # rank 0's files hold its half of the fp32 parameters
    want = preflight.offload_bytes_per_rank(resolve_model("demo"), PAR)
    assert swapped >= 0.9 * want, (swapped, want)
    _compare(*got, 4, 1, 2, model="demo")
