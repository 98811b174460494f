"""megaclip's CLIP equals open_clip's on the same weights, both conversion directions."""

from __future__ import annotations

import pytest
import torch

from megaclip.checkpoint.openclip import from_open_clip, open_clip_model, to_open_clip
from megaclip.config.model import load_preset, resolve_model
from megaclip.model.clip import ClipModel
from megaclip.model.init import init_parameters

TOL = 1e-5


def _inputs(cfg, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = cfg.vision.image_size
    images = torch.randn(batch, 3, size, size, generator=g)
    tokens = torch.randint(
        1, cfg.text.vocab_size - 1, (batch, cfg.text.context_length), generator=g
    )
    for i in range(batch):  # an EOT token (the largest id) at varied positions, zeros after it
        end = 2 + i
        tokens[i, end] = cfg.text.vocab_size - 1
        tokens[i, end + 1 :] = 0
    return images, tokens


def _features(model, images, tokens, normalize_kw):
    with torch.no_grad():
        return model.encode_image(images, **normalize_kw), model.encode_text(tokens, **normalize_kw)


@pytest.mark.parametrize(
    "spec",
    ["tiny", {"preset": "tiny", "activation": "quick_gelu"}, "ViT-B-32"],
    ids=["tiny", "tiny-quickgelu", "ViT-B-32"],
)
def test_open_clip_to_megaclip_features_equal(spec):
    cfg = resolve_model(spec)
    torch.manual_seed(0)
    reference = open_clip_model(cfg).eval()
    model = ClipModel(cfg).eval()
    model.load_state_dict(from_open_clip(reference.state_dict()), strict=True)
    images, tokens = _inputs(cfg)
    ref_img, ref_txt = _features(reference, images, tokens, {"normalize": True})
    img, txt = _features(model, images, tokens, {})
    assert (img - ref_img).abs().max() <= TOL
    assert (txt - ref_txt).abs().max() <= TOL
    assert torch.allclose(model.logit_scale, reference.logit_scale.reshape(1))


@pytest.mark.parametrize("name", ["tiny", "ViT-B-32"])
def test_megaclip_export_loads_strict_into_open_clip(name):
    cfg = load_preset(name)
    model = ClipModel(cfg).eval()
    init_parameters(model, cfg, seed=1)
    reference = open_clip_model(cfg).eval()
    reference.load_state_dict(to_open_clip(model.state_dict()), strict=True)
    images, tokens = _inputs(cfg, seed=1)
    ref_img, ref_txt = _features(reference, images, tokens, {"normalize": True})
    img, txt = _features(model, images, tokens, {})
    assert (img - ref_img).abs().max() <= TOL
    assert (txt - ref_txt).abs().max() <= TOL
    # And the round trip is the identity.
    back = from_open_clip(to_open_clip(model.state_dict()))
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_activation_checkpointing_gives_identical_gradients():
    cfg = load_preset("tiny")
    images, tokens = _inputs(cfg)
    grads = []
    for recompute in (False, True):
        model = ClipModel(cfg, recompute=recompute)
        init_parameters(model, cfg, seed=2)
        img, txt, scale = model(images, tokens)
        (scale.exp() * (img @ txt.T)).logsumexp(dim=1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in grads[0].items():
        assert torch.allclose(grad, grads[1][name], atol=1e-7), name


def test_bf16_forward_close_to_fp32():
    cfg = load_preset("tiny")
    model = ClipModel(cfg)
    init_parameters(model, cfg, seed=3)
    images, tokens = _inputs(cfg)
    ref_img, ref_txt, _ = model(images, tokens)
    img, txt, _ = model.to(torch.bfloat16)(images.bfloat16(), tokens)
    assert img.dtype == torch.bfloat16
    assert (img.float() - ref_img).abs().max() < 0.05
    assert (txt.float() - ref_txt).abs().max() < 0.05


def test_init_is_deterministic_and_seed_dependent():
    cfg = load_preset("tiny")
    a, b, c = ClipModel(cfg), ClipModel(cfg), ClipModel(cfg)
    init_parameters(a, cfg, seed=5)
    init_parameters(b, cfg, seed=5)
    init_parameters(c, cfg, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(
        sa["visual.blocks.0.attn.qkv.weight"], sc["visual.blocks.0.attn.qkv.weight"]
    )
    assert torch.equal(sa["logit_scale"], torch.full((1,), cfg.init_logit_scale))
