"""open_clip files: read lazily (memory-mapped, tensor by tensor) and write streamed.

File formats written by ``megaclip convert --to open_clip``:

- ``.pt``: ``{"model_config": to_dict(ClipConfig), "state_dict": open_clip state dict}``;
- ``.safetensors``: the open_clip state dict, with the model config as JSON in the metadata
  key ``megaclip_model_config``.

Readers also accept bare open_clip state dicts and open_clip's training checkpoints
(``{"state_dict": {"module.visual...": ...}, "epoch": ...}``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from megaclip.checkpoint import mmap_io
from megaclip.checkpoint.openclip import from_open_clip_key_checked, open_clip_config
from megaclip.checkpoint.stream import Spec, write_stream
from megaclip.config.model import ClipConfig
from megaclip.config.schema import to_dict
from megaclip.errors import CheckpointError

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
    specs = [(k, tuple(v.shape), v.dtype) for k, v in state.items()]
    return write_open_clip_stream(path, cfg, specs, state.items())


def write_open_clip_stream(
    path: str | Path,
    cfg: ClipConfig,
    specs: list[Spec],
    tensors: Iterable[tuple[str, torch.Tensor]],
) -> Path:
    """Stream open_clip-keyed ``tensors`` (in ``specs`` order) + the model config to ``path``.

    Both configs are stored: megaclip's, and open_clip's ``model_cfg`` (open_clip_config).
    """
    config, oc_config = to_dict(cfg), open_clip_config(cfg)
    meta = {SAFETENSORS_CONFIG_KEY: json.dumps(config), "format": "pt"}
    meta[OPEN_CLIP_CONFIG_KEY] = json.dumps(oc_config)
    return write_stream(
        path,
        specs,
        tensors,
        safetensors_metadata=meta,
        torch_wrapper={"model_config": config, OPEN_CLIP_CONFIG_KEY: oc_config},
        torch_root_key="state_dict",
    )


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
    obj = _load_torch(path)
    config = obj.get("model_config") if isinstance(obj.get("model_config"), dict) else None
    state = obj.get("state_dict", obj)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a tensor state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    return config, state


class OpenClipFile:
    """An open_clip file opened lazily: its config, shapes, and one full tensor at a time.

    ``.safetensors`` files are read through safetensors' own lazy reader, torch files memory-
    mapped; :meth:`get` returns an ordinary-memory copy and gives the mapped pages back.
    Use as a context manager.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise CheckpointError(f"checkpoint file {self.path} does not exist")
        self._st = None
        self.model_config: dict[str, Any] | None = None
        if self.path.suffix == ".safetensors":
            from safetensors import safe_open

            try:
                self._st = safe_open(str(self.path), framework="pt")
                meta = self._st.metadata() or {}
                keys = list(self._st.keys())
            except Exception as err:  # safetensors raises its own error types
                raise CheckpointError(
                    f"{self.path} is not a readable safetensors file ({err})"
                ) from None
            text = meta.get(SAFETENSORS_CONFIG_KEY)
            self.model_config = json.loads(text) if text else None
            self._state = None
        else:
            obj = _load_torch(self.path)
            if isinstance(obj.get("model_config"), dict):
                self.model_config = obj["model_config"]
            state = obj.get("state_dict", obj)
            if not isinstance(state, dict) or not all(
                isinstance(v, torch.Tensor) for v in state.values()
            ):
                raise CheckpointError(f"{self.path} does not hold a tensor state dict")
            self._state = {k.removeprefix("module."): v for k, v in state.items()}
            keys = list(self._state)
        self._keys: dict[str, str] = {}  # megaclip name -> key in the file
        for key in keys:
            name = from_open_clip_key_checked(key.removeprefix("module."))
            if name is not None:
                self._keys[name] = key

    def __enter__(self) -> OpenClipFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._state is not None:
            mmap_io.release_all(self._state)
        self._st = self._state = None

    def shapes(self) -> dict[str, torch.Size]:
        """{megaclip name: megaclip shape} of every parameter in the file."""
        out = {}
        for name, key in self._keys.items():
            if self._st is not None:
                shape = torch.Size(self._st.get_slice(key).get_shape())
            else:
                shape = self._state[key].shape
            out[name] = torch.Size([1]) if name == "logit_scale" else shape
        return out

    def get(self, name: str) -> torch.Tensor:
        """The full tensor of megaclip parameter ``name`` (megaclip shape), in ordinary memory."""
        key = self._keys[name]
        if self._st is not None:
            value = self._st.get_tensor(key)
        else:
            value = mmap_io.detached(self._state[key])
        return value.reshape(1) if name == "logit_scale" else value

    def state(self) -> dict[str, torch.Tensor]:
        """Every tensor (megaclip names), in memory: for small files and tests."""
        return {name: self.get(name) for name in self._keys}


def _load_torch(path: Path) -> dict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):
            raise CheckpointError(f"{path} cannot be read as a torch checkpoint ({err})") from None
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle errors, ...
        raise CheckpointError(f"{path} cannot be read as a torch checkpoint ({err})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    return obj
