"""Analytic parameter and FLOP counts: the published table, and torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from megaclip.config.model import load_preset
from megaclip.model.clip import ClipModel
from megaclip.model.flops import model_cost, train_flops, vision_embed_macs
from megaclip.model.init import init_parameters

# open_clip's published model table: params (M) and forward GMACs per sample (224px, 77 tokens).
PUBLISHED = {
    "ViT-B-32": (151.28, 7.40),
    "ViT-B-16": (149.62, 20.57),
    "ViT-L-14": (427.62, 87.73),
    "ViT-H-14": (986.11, 190.97),
    "ViT-g-14": (1366.68, 290.74),
    "ViT-G-14": (2539.57, 532.92),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_table_within_one_percent(name):
    params_m, gmacs = PUBLISHED[name]
    cost = model_cost(load_preset(name))
    assert abs(cost.params_total / 1e6 / params_m - 1) < 0.01
    assert abs(cost.gmacs / gmacs - 1) < 0.01
    assert cost.params_total == cost.params_vision + cost.params_text + 1
    assert cost.train_flops == 6 * cost.macs_total


@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-G-14"])
def test_param_count_equals_the_real_model(name):
    cfg = load_preset(name)
    with torch.device("meta"):
        model = ClipModel(cfg)
    assert sum(p.numel() for p in model.parameters()) == model_cost(cfg).params_total


def test_flops_match_flop_counter_on_tiny_model():
    cfg = load_preset("tiny")
    model = ClipModel(cfg)
    init_parameters(model, cfg, seed=0)
    batch = 3
    images = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = torch.randint(0, cfg.text.vocab_size, (batch, cfg.text.context_length))
    cost = model_cost(cfg)
    # The math SDPA backend runs attention as matmuls the counter can see.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fwd:
        model(images, tokens)
    assert fwd.get_total_flops() == 2 * batch * cost.macs_total
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as step:
        img, txt, _ = model(images, tokens)
        (img.sum() + txt.sum()).backward()
    # Training = 6 x MACs, except that no gradient is computed for the input pixels.
    skipped_input_grad = 2 * batch * vision_embed_macs(cfg.vision)
    assert step.get_total_flops() == batch * cost.train_flops - skipped_input_grad


@pytest.mark.parametrize("prob", [0.0, 0.5, 0.75])
def test_train_flops_count_the_tokens_patch_dropout_keeps(prob):
    """MFU's FLOPs with FLIP dropout: the forward FLOP counter sees train_flops / 3 per sample."""
    cfg = load_preset("tiny")
    model = ClipModel(cfg, patch_dropout=prob)
    init_parameters(model, cfg, seed=0)
    model.train()
    batch = 2
    images = torch.randn(batch, 3, cfg.vision.image_size, cfg.vision.image_size)
    tokens = torch.randint(0, cfg.text.vocab_size, (batch, cfg.text.context_length))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fwd:
        model(images, tokens)
    assert 3 * fwd.get_total_flops() == batch * train_flops(cfg, prob)
    assert (train_flops(cfg, prob) < model_cost(cfg).train_flops) == (prob > 0)
