"""open_clip files: export megaclip checkpoints to them, import them for fine-tuning.

File formats written by ``megaclip convert --to open_clip``:

- ``.pt``: ``{"model_config": to_dict(ClipConfig), "state_dict": open_clip state dict}``;
- ``.safetensors``: the open_clip state dict, with the model config as JSON in the metadata
  key ``megaclip_model_config``.

Readers here (and ``megaclip eval``) also accept bare open_clip state dicts and open_clip's
training checkpoints (``{"state_dict": {"module.visual...": ...}, "epoch": ...}``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from megaclip.checkpoint.openclip import from_open_clip, open_clip_config, to_open_clip
from megaclip.checkpoint.reader import load_file, read_checkpoint
from megaclip.checkpoint.universal import (
    PARAM_DIR,
    UNIVERSAL_META,
    check_shapes,
    read_universal_meta,
    universal_model_config,
    write_universal,
)
from megaclip.config.model import ClipConfig, model_from_dict, resolve_model
from megaclip.config.parallel import ParallelConfig
from megaclip.config.schema import to_dict
from megaclip.errors import CheckpointError, ConfigError

SAFETENSORS_CONFIG_KEY = "megaclip_model_config"
OPEN_CLIP_CONFIG_KEY = "open_clip_config"  # open_clip's model_cfg: open_clip.model.CLIP(**it)


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError:  # pragma: no cover - safetensors ships with open_clip_torch
        raise CheckpointError(
            "writing/reading .safetensors needs the safetensors package: pip install safetensors"
        ) from None
    return st


def save_open_clip_file(path: str | Path, cfg: ClipConfig, state: dict[str, torch.Tensor]) -> Path:
    """Write an open_clip state dict (+ model config) to ``path`` (.pt or .safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items()}
    config, oc_config = to_dict(cfg), open_clip_config(cfg)  # oc_config: open_clip's model_cfg
    if path.suffix == ".safetensors":
        meta = {SAFETENSORS_CONFIG_KEY: json.dumps(config), "format": "pt"}
        meta[OPEN_CLIP_CONFIG_KEY] = json.dumps(oc_config)
        _safetensors().save_file(tensors, str(tmp), metadata=meta)
    elif path.suffix in (".pt", ".pth", ".bin"):
        torch.save(
            {"model_config": config, OPEN_CLIP_CONFIG_KEY: oc_config, "state_dict": tensors}, tmp
        )
    else:
        raise CheckpointError(f"--out {path}: use a .pt or .safetensors file name")
    os.replace(tmp, path)
    return path


def load_open_clip_file(path: str | Path) -> tuple[dict[str, Any] | None, dict[str, torch.Tensor]]:
    """(model config mapping or None, open_clip state dict) of a .pt/.bin/.safetensors file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        st = _safetensors()
        try:
            state = st.load_file(str(path))
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path} is not a readable safetensors file ({err})") from None
        text = meta.get(SAFETENSORS_CONFIG_KEY)
        return (json.loads(text) if text else None), state
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle errors, ...
        raise CheckpointError(f"{path} cannot be read as a torch checkpoint ({err})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    config = obj.get("model_config") if isinstance(obj.get("model_config"), dict) else None
    state = obj.get("state_dict", obj)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a tensor state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return config, state


def _source_model(src: Path):
    """(ClipConfig, full ClipModel-named fp32 params) of a DeepSpeed or universal checkpoint."""
    if (src / UNIVERSAL_META).is_file():
        record = read_universal_meta(src)
        cfg = universal_model_config(record, str(src))
        params = {
            name: load_file(src / PARAM_DIR / f"{name}.pt")["fp32"] for name in record["params"]
        }
        return cfg, params
    return None


def export_open_clip(ckpt: str | Path, out: str | Path, *, fp32_master: bool = False) -> Path:
    """``megaclip convert CKPT --to open_clip``: one open_clip file from any layout's checkpoint.

    ``fp32_master``: export ZeRO's / the bf16 optimizer's fp32 master weights instead of the
    module weights in the training dtype (ZeRO-3 always exports the masters).
    """
    cfg, params = read_full_model(ckpt, fp32_master=fp32_master)
    return save_open_clip_file(out, cfg, to_open_clip(params))


def read_full_model(
    ckpt: str | Path, *, fp32_master: bool = False
) -> tuple[ClipConfig, dict[str, torch.Tensor]]:
    """(ClipConfig, full ClipModel-named params) of a DeepSpeed or universal checkpoint."""
    src = Path(ckpt)
    universal = _source_model(src) if src.is_dir() else None
    if universal is not None:
        return universal
    full = read_checkpoint(src, fp32_master=fp32_master)
    return full.meta.model_config, full.params


def import_open_clip(
    file: str | Path,
    out_dir: str | Path,
    *,
    model: str | None = None,
    tp: int = 1,
    pp: int = 1,
) -> Path:
    """``megaclip convert FILE --to megaclip``: an open_clip file -> a universal init directory.

    The model config comes from the file (megaclip exports) or ``model`` (a preset name or
    YAML file); ``tp`` / ``pp`` are checked against the model so a bad layout fails here.
    """
    config, oc_state = load_open_clip_file(file)
    if model is not None:
        try:
            cfg = resolve_model(model)
        except ConfigError as err:
            raise CheckpointError(str(err)) from None
    elif config is not None:
        try:
            cfg = model_from_dict(config, where=f"{file} model_config")
        except ConfigError as err:
            raise CheckpointError(str(err)) from None
    else:
        raise CheckpointError(
            f"{file} does not say which architecture it holds: pass --model NAME (a preset such "
            "as ViT-B-32, or a model YAML file)"
        )
    check_layout(cfg, tp, pp)
    params = from_open_clip(oc_state)
    check_shapes(params, cfg, str(file))
    return write_universal(out_dir, cfg, params, step=0, source={"open_clip": str(file)})


def check_layout(cfg: ClipConfig, tp: int, pp: int) -> None:
    """CheckpointError if model ``cfg`` cannot be split into ``tp`` x ``pp``."""
    try:
        ParallelConfig(tp=tp, pp=pp, dp=1).check_model(cfg)
    except ConfigError as err:
        raise CheckpointError(
            f"model '{cfg.name}' cannot take layout tp={tp} pp={pp}: {err}"
        ) from None
