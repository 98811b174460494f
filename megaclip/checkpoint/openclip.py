"""Conversion between megaclip (full, unsharded) state dicts and open_clip's format (pure)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from megaclip.config.model import ClipConfig
from megaclip.errors import CheckpointError
from megaclip.model.naming import from_open_clip_key, to_open_clip_key

# Buffers open_clip may store that megaclip recomputes.
_IGNORED = ("attn_mask",)


def open_clip_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """open_clip's shape of the megaclip parameter ``name`` (logit_scale is 0-dim there)."""
    return () if to_open_clip_key(name) == "logit_scale" else tuple(shape)


def open_clip_entry(name: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(open_clip key, value in open_clip's shape) of one full megaclip parameter."""
    key = to_open_clip_key(name)
    return key, value.reshape(()) if key == "logit_scale" else value


def to_open_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip state dict from a full megaclip one (logit_scale becomes 0-dim)."""
    return dict(open_clip_entry(name, value) for name, value in state.items())


def from_open_clip_key_checked(key: str) -> str | None:
    """megaclip name of open_clip ``key``; None for buffers megaclip recomputes; else an error."""
    if key in _IGNORED:
        return None
    try:
        return from_open_clip_key(key)
    except KeyError:
        raise CheckpointError(
            f"open_clip key '{key}' has no megaclip counterpart: only standard ViT CLIP "
            "models (no attentional pooler, layer scale or custom text tower) can be imported"
        ) from None


def from_open_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full megaclip state dict (ClipModel names) from an open_clip one."""
    out = {}
    for key, value in state.items():
        name = from_open_clip_key_checked(key)
        if name is not None:
            out[name] = value.reshape(1) if key == "logit_scale" else value
    return out


def open_clip_model(cfg: ClipConfig):
    """An open_clip ``CLIP`` of the same architecture (random init; needs open_clip_torch)."""
    try:
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise CheckpointError(
            "open_clip_torch is not installed: pip install open_clip_torch"
        ) from err
    v, t = cfg.vision, cfg.text
    vision = CLIPVisionCfg(
        layers=v.layers,
        width=v.width,
        head_width=v.head_dim,
        mlp_ratio=v.mlp_dim / v.width,
        patch_size=v.patch_size,
        image_size=v.image_size,
    )
    text = CLIPTextCfg(
        context_length=t.context_length,
        vocab_size=t.vocab_size,
        width=t.width,
        heads=t.heads,
        layers=t.layers,
        mlp_ratio=t.mlp_dim / t.width,
    )
    model = CLIP(cfg.embed_dim, vision, text, quick_gelu=cfg.activation == "quick_gelu")
    _check_mlp(model, cfg)
    return model


def _check_mlp(model: torch.nn.Module, cfg: ClipConfig) -> None:
    got = model.visual.transformer.resblocks[0].mlp.c_fc.weight.shape[0]
    if got != cfg.vision.mlp_dim:
        raise CheckpointError(
            f"open_clip built vision mlp_dim {got}, expected {cfg.vision.mlp_dim}"
        )
