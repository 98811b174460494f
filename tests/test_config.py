"""Config validation: presets load, bad configs give one clear ConfigError each."""

from __future__ import annotations

import json

import pytest

from megaclip.config.model import ClipConfig, list_presets, load_preset, resolve_model
from megaclip.config.parallel import check_tensor_parallel
from megaclip.config.schema import apply_overrides, load_mapping
from megaclip.errors import ConfigError
from megaclip.parallel.shapes import shard, unshard


def test_presets_load_and_alias():
    names = list_presets()
    for required in ("ViT-B-32", "ViT-B-16", "ViT-L-14", "ViT-H-14", "ViT-g-14", "ViT-G-14"):
        assert required in names
    assert load_preset("ViT-bigG-14") == load_preset("ViT-G-14")
    for name in names:
        cfg = load_preset(name)
        assert isinstance(cfg, ClipConfig) and cfg.name == name


def test_configs_are_frozen():
    cfg = load_preset("tiny")
    with pytest.raises(AttributeError):
        cfg.embed_dim = 3  # type: ignore[misc]


@pytest.mark.parametrize(
    "data, message",
    [
        ({"embed_dim": 8, "vison": {}}, "unknown key 'vison' (did you mean 'vision'?)"),
        (
            {"vision": {"width": 30, "heads": 4}},
            "vision.width 30 is not divisible by vision.heads 4",
        ),
        ({"vision": {"image_size": 30, "patch_size": 8}}, "not divisible by vision.patch_size 8"),
        ({"text": {"layers": 0}}, "text.layers must be positive"),
        ({"text": {"layers": "two"}}, "model.text.layers: expected an integer"),
        ({"activation": "relu"}, "'relu' is not one of 'gelu', 'quick_gelu'"),
        ({"preset": "ViT-Z-99"}, "unknown model 'ViT-Z-99'"),
    ],
)
def test_bad_model_configs(data, message):
    with pytest.raises(ConfigError) as err:
        resolve_model(data)
    assert message in str(err.value)


def test_preset_with_overrides():
    cfg = resolve_model({"preset": "ViT-B-32", "vision": {"layers": 2}})
    assert cfg.vision.layers == 2 and cfg.vision.width == 768 and cfg.text.layers == 12


def test_yaml_and_json_files(tmp_path):
    good = tmp_path / "m.json"
    good.write_text(json.dumps({"preset": "tiny", "embed_dim": 24}))
    assert resolve_model(str(good)).embed_dim == 24
    bad = tmp_path / "bad.yaml"
    bad.write_text("vision: {width: 32\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid yaml at line"):
        load_mapping(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_mapping(listy)
    with pytest.raises(ConfigError, match="config file not found"):
        load_mapping(tmp_path / "missing.yaml")


def test_overrides():
    out = apply_overrides({"a": {"b": 1}}, ["a.b=2", "a.c=true", "d=x"])
    assert out == {"a": {"b": 2, "c": True}, "d": "x"}
    with pytest.raises(ConfigError, match="must look like"):
        apply_overrides({}, ["novalue"])


def test_tensor_parallel_divisibility():
    big_g = load_preset("ViT-G-14")
    for tp in (1, 2, 4):
        check_tensor_parallel(big_g, tp)
    with pytest.raises(ConfigError) as err:
        check_tensor_parallel(big_g, 8)
    assert "text.heads=20" in str(err.value) and "[1, 2, 4]" in str(err.value)
    with pytest.raises(ConfigError, match="text.heads=20"):
        check_tensor_parallel(big_g, 3)


def test_shard_roundtrip_with_stride():
    import torch

    full = torch.arange(24.0).reshape(12, 2)  # q;k;v stacked, 4 rows each
    parts = [shard(full, 0, 3, r, 2) for r in range(2)]
    assert parts[0][:, 0].tolist() == [0, 2, 8, 10, 16, 18]  # q_0, k_0, v_0
    assert torch.equal(unshard(parts, 0, 3), full)
    with pytest.raises(ConfigError, match="not divisible"):
        shard(full, 0, 3, 0, 8)


def test_exponent_floats_without_a_dot_are_numbers(tmp_path):
    from megaclip.config.train import load_run_config

    path = tmp_path / "run.yaml"
    path.write_text("data: {kind: synthetic}\noptim: {lr: 1e-3}\n")
    assert load_run_config(path, ["optim.min_lr=1e-5"]).optim.lr == 1e-3
    with pytest.raises(ConfigError, match="optim.lr: expected a number, got 'fast'"):
        load_run_config(path, ["optim.lr=fast"])
