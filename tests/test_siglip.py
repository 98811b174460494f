"""SigLIP training: config, the learnable logit_bias in exports and imports, and its errors."""

from __future__ import annotations

import math

import pytest
import torch

from megaclip.checkpoint.openclip import from_open_clip, open_clip_model, to_open_clip
from megaclip.config.train import load_run_config
from megaclip.errors import CheckpointError, ConfigError
from megaclip.model.clip import ClipModel
from megaclip.model.init import init_parameters
from tests.reference import model_for
from tests.test_train_cli import SYNTH, train_cli


def test_siglip_gets_the_paper_init_and_clip_refuses_a_bias():
    cfg = load_run_config(None, ["model=tiny", "data.kind=synthetic", "train.loss=siglip"])
    assert cfg.model.init_logit_bias == -10.0
    assert cfg.model.init_logit_scale == pytest.approx(math.log(10.0))
    custom = load_run_config(
        None,
        ["model=tiny", "data.kind=synthetic", "train.loss=siglip", "train.siglip_init_bias=-5"],
    )
    assert custom.model.init_logit_bias == -5.0
    with pytest.raises(ConfigError, match="it is a SigLIP model; set train.loss: siglip"):
        load_run_config(None, ["model={preset: tiny, init_logit_bias: -10}", "data.kind=synthetic"])


def test_siglip_model_exports_logit_bias_loading_strict_into_open_clip():
    cfg = model_for("tiny", "siglip")
    ours = ClipModel(cfg).eval()
    init_parameters(ours, cfg, seed=0)
    state = to_open_clip(ours.state_dict())
    assert state["logit_bias"].shape == () and state["logit_bias"].item() == -10.0
    theirs = open_clip_model(cfg)
    theirs.load_state_dict(state, strict=True)  # open_clip's CLIP(init_logit_bias=...)
    assert theirs.logit_bias.item() == -10.0
    back = ClipModel(cfg)
    back.load_state_dict(from_open_clip(theirs.state_dict()), strict=True)
    assert torch.equal(back.logit_bias, ours.logit_bias)


def test_siglip_model_cannot_go_to_hf(tmp_path):
    from megaclip.checkpoint.hf import hf_config

    with pytest.raises(CheckpointError, match="CLIPModel cannot hold; export it with --to open"):
        hf_config(model_for("tiny", "siglip"))


def test_unknown_schedule_is_one_clear_error():
    out = train_cli(*SYNTH, "parallel.schedule=fast")
    assert out.returncode == 2, out.stderr
    assert "parallel.schedule" in out.stderr and "recompute" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_siglip_from_a_clip_checkpoint_needs_new_logit_bias(tmp_path):
    """init_from a CLIP run: refused with the fix named; with train.new_logit_bias it trains."""
    clip_run = tmp_path / "clip"
    out = train_cli(*SYNTH, "train.steps=1", f"train.out_dir={clip_run}", "train.tensorboard=false")
    assert out.returncode == 0, out.stderr
    common = [*SYNTH, "train.loss=siglip", "train.steps=1", "train.tensorboard=false"]
    init = f"train.init_from={clip_run / 'checkpoints'}"
    out = train_cli(*common, init, f"train.out_dir={tmp_path / 'a'}")
    assert out.returncode == 2
    assert "has no logit_bias" in out.stderr and "train.new_logit_bias=true" in out.stderr
    assert "Traceback" not in out.stderr
    out = train_cli(*common, init, "train.new_logit_bias=true", f"train.out_dir={tmp_path / 'b'}")
    assert out.returncode == 0, out.stderr
    exported = torch.load(tmp_path / "b" / "final_open_clip.pt", weights_only=True)
    assert "logit_bias" in exported["state_dict"]
