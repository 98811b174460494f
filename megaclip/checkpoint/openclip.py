"""megaclip (full, unsharded) state dicts <-> open_clip format (pure), open_clip model dirs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from megaclip.config.model import ClipConfig, model_from_dict
from megaclip.config.schema import load_mapping, to_dict
from megaclip.data.transforms import CLIP_MEAN, CLIP_STD
from megaclip.errors import CheckpointError, ConfigError
from megaclip.model.naming import from_open_clip_key, to_open_clip_key

# Key of megaclip's own model config inside exported open_clip / HF config files.
MODEL_CONFIG_KEY = "megaclip_model_config"
# Buffers open_clip may store that megaclip recomputes.
_IGNORED = ("attn_mask",)
# 0-dim parameters in open_clip, shape [1] in megaclip (DeepSpeed cannot broadcast 0-dim ones).
SCALARS = ("logit_scale", "logit_bias")


def open_clip_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """open_clip's shape of the megaclip parameter ``name`` (the logit scalars are 0-dim there)."""
    return () if to_open_clip_key(name) in SCALARS else tuple(shape)


def open_clip_entry(name: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
    """(open_clip key, value in open_clip's shape) of one full megaclip parameter."""
    key = to_open_clip_key(name)
    return key, value.reshape(()) if key in SCALARS else value


def iter_open_clip(
    entries: Iterable[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    """(open_clip key, tensor) for each (megaclip name, tensor), one at a time."""
    for name, value in entries:
        yield open_clip_entry(name, value)


def to_open_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip state dict from a full megaclip one (logit_scale becomes 0-dim)."""
    return dict(iter_open_clip(state.items()))


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
            out[name] = value.reshape(1) if key in SCALARS else value
    return out


def open_clip_config(cfg: ClipConfig) -> dict[str, Any]:
    """open_clip's ``model_cfg`` (its model-config JSON) of the same architecture and pooling."""
    v, t = cfg.vision, cfg.text
    norm = {"norm_kwargs": {"eps": cfg.layer_norm_eps}} if cfg.layer_norm_eps != 1e-5 else {}
    text = {
        "context_length": t.context_length,
        "vocab_size": t.vocab_size,
        "width": t.width,
        "heads": t.heads,
        "layers": t.layers,
        "mlp_ratio": t.mlp_dim / t.width,
        "pool_type": t.pool_type,
        **({"eos_id": t.eos_id} if t.eos_id is not None else {}),
        **norm,
    }
    vision = {
        "image_size": v.image_size,
        "layers": v.layers,
        "width": v.width,
        "head_width": v.head_dim,
        "mlp_ratio": v.mlp_dim / v.width,
        "patch_size": v.patch_size,
        **norm,
    }
    return {
        "embed_dim": cfg.embed_dim,
        "quick_gelu": cfg.activation == "quick_gelu",
        "vision_cfg": vision,
        "text_cfg": text,
        **({"init_logit_bias": cfg.init_logit_bias} if cfg.init_logit_bias is not None else {}),
    }


def open_clip_preprocess(cfg: ClipConfig) -> dict[str, Any]:
    """open_clip's ``preprocess_cfg``: megaclip's eval transform (megaclip.data.transforms)."""
    return {
        "size": cfg.vision.image_size,
        "mode": "RGB",
        "mean": list(CLIP_MEAN),
        "std": list(CLIP_STD),
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    }


def open_clip_dir_config(cfg: ClipConfig) -> dict[str, Any]:
    """``open_clip_config.json`` of an open_clip model directory (``local-dir:`` / HF Hub)."""
    return {
        "model_cfg": open_clip_config(cfg),
        "preprocess_cfg": open_clip_preprocess(cfg),
        MODEL_CONFIG_KEY: to_dict(cfg),
    }


# open_clip config fields megaclip reads; any other non-default field is an unsupported variant.
_OC_VISION = {"image_size", "layers", "width", "head_width", "mlp_ratio", "patch_size"}
_OC_TEXT = {"context_length", "vocab_size", "width", "heads", "layers", "mlp_ratio"}
_OC_TEXT |= {"pool_type", "eos_id", "pad_id"}
_OC_DEFAULTS = {"patch_dropout": 0.0, "output_tokens": False, "proj_type": "linear"}
_OC_DEFAULTS |= {"ls_init_value": None, "attentional_pool": False, "embed_cls": False}
_OC_DEFAULTS |= {"no_causal_mask": False, "proj_bias": False, "final_ln_after_pool": False}
_OC_DEFAULTS |= {"pool_type": "tok", "hf_tokenizer_name": None, "tokenizer_kwargs": None}


def clip_config_from_open_clip(model_cfg: dict[str, Any], name: str, where: str) -> ClipConfig:
    """ClipConfig of an open_clip ``model_cfg``; CheckpointError naming an unsupported field."""
    vision, text = dict(model_cfg.get("vision_cfg", {})), dict(model_cfg.get("text_cfg", {}))
    eps = {1e-5}
    for tower, cfg, known in (("vision_cfg", vision, _OC_VISION), ("text_cfg", text, _OC_TEXT)):
        eps.add(float((cfg.pop("norm_kwargs", None) or {}).get("eps", 1e-5)))
        for key, value in cfg.items():
            if key not in known and _OC_DEFAULTS.get(key, object()) != value:
                raise CheckpointError(
                    f"{where}: open_clip {tower}.{key}={value!r} is a variant megaclip cannot "
                    "load (only standard ViT CLIP towers)"
                )
    if len(eps) > 1:
        raise CheckpointError(f"{where}: layer norm eps {sorted(eps)} differ; megaclip has one")
    v_width, t_width = vision.get("width", 768), text.get("width", 512)
    pool = text.get("pool_type", "argmax")
    data = {
        "name": name,
        "embed_dim": model_cfg.get("embed_dim", 512),
        "activation": "quick_gelu" if model_cfg.get("quick_gelu") else "gelu",
        "layer_norm_eps": eps.pop() if len(eps) == 1 else 1e-5,
        "vision": {
            "image_size": vision.get("image_size", 224),
            "patch_size": vision.get("patch_size", 16),
            "width": v_width,
            "layers": vision.get("layers", 12),
            "heads": v_width // vision.get("head_width", 64),
            "mlp_dim": int(round(v_width * vision.get("mlp_ratio", 4.0))),
        },
        "text": {
            "context_length": text.get("context_length", 77),
            "vocab_size": text.get("vocab_size", 49408),
            "width": t_width,
            "layers": text.get("layers", 12),
            "heads": text.get("heads", 8),
            "mlp_dim": int(round(t_width * text.get("mlp_ratio", 4.0))),
            "pool_type": pool,
            **({"eos_id": text.get("eos_id", 2)} if pool == "eos" else {}),
        },
    }
    if model_cfg.get("init_logit_bias") is not None:
        data["init_logit_bias"] = float(model_cfg["init_logit_bias"])
    try:
        return model_from_dict(data, where=where)
    except ConfigError as err:
        raise CheckpointError(str(err)) from None


def open_clip_model(cfg: ClipConfig):
    """An open_clip ``CLIP`` of the same architecture (random init; needs open_clip_torch)."""
    try:
        from open_clip.model import CLIP
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise CheckpointError(
            "open_clip_torch is not installed: pip install open_clip_torch"
        ) from err
    model = CLIP(**open_clip_config(cfg))
    _check_mlp(model, cfg)
    return model


def _check_mlp(model: torch.nn.Module, cfg: ClipConfig) -> None:
    got = model.visual.transformer.resblocks[0].mlp.c_fc.weight.shape[0]
    if got != cfg.vision.mlp_dim:
        raise CheckpointError(
            f"open_clip built vision mlp_dim {got}, expected {cfg.vision.mlp_dim}"
        )


# An open_clip model directory (what open_clip.create_model("local-dir:DIR") and the HF Hub use).
OPEN_CLIP_DIR_CONFIG = "open_clip_config.json"
OPEN_CLIP_DIR_WEIGHTS = (  # the names open_clip looks for, preferred first
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
)


def is_open_clip_dir(path: str | Path) -> bool:
    """Whether ``path`` is an open_clip model directory (holds open_clip_config.json)."""
    return (Path(path) / OPEN_CLIP_DIR_CONFIG).is_file()


def read_open_clip_dir(path: str | Path) -> tuple[ClipConfig, Path]:
    """(ClipConfig, weights file) of an open_clip model directory."""
    path = Path(path)
    where = str(path / OPEN_CLIP_DIR_CONFIG)
    try:
        config = load_mapping(path / OPEN_CLIP_DIR_CONFIG)
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    model_cfg = config.get("model_cfg")
    if not isinstance(model_cfg, dict):
        raise CheckpointError(f"{where} has no 'model_cfg' mapping: not an open_clip config")
    weights = next((path / n for n in OPEN_CLIP_DIR_WEIGHTS if (path / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{path} has none of {', '.join(OPEN_CLIP_DIR_WEIGHTS)}")
    stored = config.get(MODEL_CONFIG_KEY)
    if isinstance(stored, dict):
        try:
            return model_from_dict(stored, where=where), weights
        except ConfigError as err:
            raise CheckpointError(str(err)) from None
    return clip_config_from_open_clip(model_cfg, path.name, where), weights
