"""The one sharding table: the built layers, the by-name rule and the parameter counts agree."""

from __future__ import annotations

import pytest
import torch

from megaclip.config.model import load_preset
from megaclip.model.clip import ClipModel
from megaclip.model.flops import block_params, model_cost
from megaclip.parallel.sharding import BLOCK_LINEARS, REPLICATED, Split, param_split, tp_partition
from megaclip.perf.memory import stage_param_count
from megaclip.pipeline.partition import partition
from megaclip.pipeline.stages import PipeStage


def _attrs(param: torch.Tensor) -> tuple[int | None, int]:
    """What the layers attach for megatron / DeepSpeed (megaclip reads the table by name)."""
    return getattr(param, "partition_dim", None), getattr(param, "partition_stride", 1)


def test_built_parameters_follow_the_table():
    """Every parameter of a model and of each pipeline stage splits as the table says."""
    cfg = load_preset("tiny-pp")
    model = ClipModel(cfg)
    split = 0
    for name, param in model.named_parameters():
        assert tp_partition(name) == _attrs(param), name
        assert tp_partition(f"module.3.{name}") == _attrs(param), name  # wrapper prefixes
        split += tp_partition(name)[0] is not None
    assert split == 6 * (cfg.vision.layers + cfg.text.layers)  # qkv w/b, c_fc w/b, 2 row w
    for plan in partition(cfg, 2):
        for name, param in PipeStage(cfg, plan).named_parameters():
            assert tp_partition(f"{plan.index}.{name}") == _attrs(param), name


def test_table_rules():
    assert param_split("visual.blocks.0.attn.qkv.weight") == Split(0, 3)
    assert param_split("visual.blocks.0.attn.qkv.bias") == Split(0, 3)
    assert param_split("text.blocks.1.attn.out_proj.weight") == Split(1)
    assert param_split("text.blocks.1.attn.out_proj.bias") == REPLICATED  # after the all-reduce
    assert param_split("text.blocks.1.mlp.c_proj.bias") == REPLICATED
    assert param_split("text.blocks.1.ln_1.weight") == REPLICATED
    assert param_split("visual.head.proj") == REPLICATED
    assert set(BLOCK_LINEARS) == {"attn.qkv", "attn.out_proj", "mlp.c_fc", "mlp.c_proj"}
    with pytest.raises(ValueError, match="does not divide"):
        Split(0).per_rank(10, 4)


@pytest.mark.parametrize("name", ["tiny-pp", "ViT-B-32", "ViT-G-14"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_counts_equal_the_meta_model(name, tp):
    """Per-rank counts of the memory model = the meta-device model's parameters cut per table."""
    cfg = load_preset(name)
    if cfg.vision.heads % tp or cfg.text.heads % tp:
        pytest.skip(f"tp {tp} does not divide the heads of {name}")
    with torch.device("meta"):
        model = ClipModel(cfg)
    per_rank = sum(param_split(n).per_rank(p.numel(), tp) for n, p in model.named_parameters())
    full = ((0, cfg.vision.layers), (0, cfg.text.layers))
    assert stage_param_count(cfg, tp, *full, first=True, last=True) == per_rank
    if tp == 1:
        assert per_rank == model_cost(cfg).params_total
    for tower, tc in ((model.visual, cfg.vision), (model.text, cfg.text)):
        block = tower.blocks["0"]
        n = sum(param_split(k).per_rank(p.numel(), tp) for k, p in block.named_parameters())
        assert n == block_params(tc.width, tc.mlp_dim, tp)
