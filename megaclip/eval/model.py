"""Load a CLIP model for evaluation from an open_clip / HF / megaclip checkpoint.

Accepted directories: an open_clip model directory (open_clip_config.json + weights), a Hugging
Face CLIPModel directory (config.json + model.safetensors) or a megaclip checkpoint (root, step
or universal directory). Accepted files (see docs/eval.md):

* a bare open_clip state dict (``.pt`` / ``.bin`` via ``torch.load``, or ``.safetensors``), possibly
  nested under ``"state_dict"`` and possibly with a ``module.`` prefix; the architecture comes from
  ``model`` (a preset name or a model YAML/JSON file);
* the wrapped single file ``{"model_config": to_dict(ClipConfig), "state_dict": <open_clip dict>}``
  (``torch.save``), or a ``.safetensors`` file whose metadata holds ``model_config`` as JSON.

Keys may also be megaclip's own ``ClipModel`` names (``visual.embed.conv1.weight``...).
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from megaclip.checkpoint.openclip import from_open_clip
from megaclip.config.model import ClipConfig, model_from_dict, resolve_model
from megaclip.config.schema import to_dict
from megaclip.errors import CheckpointError, ConfigError
from megaclip.model.clip import ClipModel
from megaclip.model.naming import from_open_clip_key, to_open_clip_key

WRAPPED_CONFIG_KEY = "model_config"
WRAPPED_STATE_KEY = "state_dict"
_MEGACLIP_PREFIXES = ("visual.embed.", "visual.head.", "visual.blocks.", "text.")
# Files that mark a megaclip checkpoint directory: root (latest), step directory, universal.
_CHECKPOINT_MARKERS = ("latest", "megaclip_meta.json", "megaclip_universal.json")


def save_eval_checkpoint(
    path: str, cfg: ClipConfig, state: Mapping[str, torch.Tensor], open_clip_keys: bool = False
) -> None:
    """Write the wrapped single-file format {"model_config": dict, "state_dict": open_clip dict}.

    ``state`` is a full ClipModel state dict (converted to open_clip keys here) or, with
    ``open_clip_keys``, already an open_clip one. ``.safetensors`` paths store the config as JSON
    in the file's metadata instead.
    """
    from megaclip.checkpoint.openclip import to_open_clip

    oc = dict(state) if open_clip_keys else to_open_clip(state)
    oc = {k: v.detach().cpu().contiguous() for k, v in oc.items()}
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(oc, path, metadata={WRAPPED_CONFIG_KEY: json.dumps(to_dict(cfg))})
        return
    torch.save({WRAPPED_CONFIG_KEY: to_dict(cfg), WRAPPED_STATE_KEY: oc}, path)


def read_checkpoint(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state dict, embedded model config or None) of a checkpoint file; CheckpointError if bad."""
    if os.path.isdir(path):
        return read_model_dir(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path!r}")
    config: Any = None
    if path.endswith(".safetensors"):
        obj, config = _read_safetensors(path)
    else:
        obj = _torch_load(path)
    if isinstance(obj, Mapping) and isinstance(obj.get(WRAPPED_STATE_KEY), Mapping):
        config = obj.get(WRAPPED_CONFIG_KEY)
        obj = obj[WRAPPED_STATE_KEY]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"{path!r} holds no state dict (got {type(obj).__name__}); expected an open_clip "
            f'state dict or {{"{WRAPPED_CONFIG_KEY}": ..., "{WRAPPED_STATE_KEY}": ...}}'
        )
    bad = next((k for k, v in obj.items() if not isinstance(v, torch.Tensor)), None)
    if bad is not None:
        keys = ", ".join(map(str, list(obj)[:5]))
        raise CheckpointError(
            f"{path!r}: entry {bad!r} is not a tensor, so this is not a state dict "
            f"(top-level keys: {keys})"
        )
    state = dict(obj)
    if all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k[len("module.") :]: v for k, v in state.items()}
    if config is not None and not isinstance(config, Mapping):
        raise CheckpointError(f"{path!r}: '{WRAPPED_CONFIG_KEY}' must be a mapping")
    return state, (dict(config) if config is not None else None)


def read_model_dir(path: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict, model config) of an open_clip or HF CLIPModel directory or megaclip checkpoint.

    The state dict has open_clip keys (model directories) or ClipModel names (checkpoints).
    """
    from megaclip.checkpoint.hf import HF_CONFIG, read_hf
    from megaclip.checkpoint.openclip import is_open_clip_dir, read_open_clip_dir

    if is_open_clip_dir(path):
        cfg, weights = read_open_clip_dir(path)
        return read_checkpoint(str(weights))[0], to_dict(cfg)
    if os.path.isfile(os.path.join(path, HF_CONFIG)):
        cfg, state = read_hf(path)
        return state, to_dict(cfg)
    if any(os.path.isfile(os.path.join(path, name)) for name in _CHECKPOINT_MARKERS):
        from megaclip.checkpoint.export import read_full_model

        cfg, params = read_full_model(path)
        return params, to_dict(cfg)
    raise CheckpointError(
        f"checkpoint {path!r} is a directory but neither an open_clip model directory "
        "(open_clip_config.json), a Hugging Face CLIPModel directory (config.json) nor a megaclip "
        f"checkpoint ({', '.join(_CHECKPOINT_MARKERS)})"
    )


def _torch_load(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, zipfile.BadZipFile, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path!r}: not a torch.save file with only tensors and plain "
            f"containers, or truncated ({first})"
        ) from None


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], Any]:
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file
    except ImportError as err:  # pragma: no cover - safetensors comes with open_clip_torch
        raise CheckpointError("reading .safetensors needs: pip install safetensors") from err
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(path, device="cpu")
    except Exception as err:  # safetensors raises its own SafetensorError / OSError types
        raise CheckpointError(f"cannot read safetensors file {path!r}: {err}") from None
    config = None
    if WRAPPED_CONFIG_KEY in meta:
        try:
            config = json.loads(meta[WRAPPED_CONFIG_KEY])
        except ValueError:
            raise CheckpointError(
                f"{path!r}: metadata '{WRAPPED_CONFIG_KEY}' is not valid JSON"
            ) from None
    return state, config


def _architecture(cfg: ClipConfig) -> dict[str, Any]:
    d = to_dict(cfg)
    d.pop("name")
    return d


def _first_difference(a: Any, b: Any, where: str = "") -> tuple[str, Any, Any] | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in a:
            found = _first_difference(a[key], b.get(key), f"{where}.{key}" if where else key)
            if found:
                return found
        return None
    return None if a == b else (where, a, b)


def resolve_eval_config(
    path: str, embedded: dict[str, Any] | None, model: str | ClipConfig | None
) -> ClipConfig:
    """The model config: the checkpoint's embedded one, ``model``, or both when they agree."""
    from_file = None
    if embedded is not None:
        try:
            from_file = model_from_dict(embedded, where=f"{path}: {WRAPPED_CONFIG_KEY}")
        except ConfigError as err:
            raise CheckpointError(str(err)) from None
    given = resolve_model(model) if model is not None else None
    if from_file is None and given is None:
        raise CheckpointError(
            f"{path!r} is a bare state dict without a model config: pass --model NAME "
            "(a preset, see `megaclip models`, or a model YAML/JSON file)"
        )
    if from_file is not None and given is not None:
        diff = _first_difference(_architecture(from_file), _architecture(given))
        if diff is not None:
            field, ours, theirs = diff
            raise CheckpointError(
                f"--model {given.name} differs from the model_config stored in {path!r} at "
                f"{field} ({theirs!r} vs {ours!r}); drop --model to use the stored config"
            )
    return from_file or given  # type: ignore[return-value]


def _display_key(name: str) -> str:
    try:
        return to_open_clip_key(name)
    except KeyError:
        return name


def to_megaclip_state(
    state: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(ClipModel-named state dict, {megaclip name: key in the file}) from open_clip keys.

    Keys already in megaclip's ClipModel naming are passed through (logit_scale reshaped to [1]).
    """
    if any(k.startswith(_MEGACLIP_PREFIXES) for k in state):
        out = dict(state)
        if "logit_scale" in out:
            out["logit_scale"] = out["logit_scale"].reshape(1)
        return out, {k: k for k in out}
    out = from_open_clip(state)
    origin = {}
    for key in state:
        with contextlib.suppress(KeyError):  # ignored buffers (attn_mask) have no name
            origin[from_open_clip_key(key)] = key
    return out, origin


def check_state(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Size],
    model_name: str,
    origin: Mapping[str, str] | None = None,
) -> None:
    """CheckpointError naming the first missing, mis-shaped or unexpected key (open_clip names).

    ``origin`` maps megaclip names to the keys as spelled in the file (for the messages).
    """

    def shown(name: str) -> str:
        return origin[name] if origin and name in origin else _display_key(name)

    for name, shape in expected.items():
        if name not in state:
            raise CheckpointError(
                f"checkpoint has no '{shown(name)}' required by model {model_name}: it "
                "is of another architecture; pass the matching --model"
            )
        got = tuple(state[name].shape)
        if got != tuple(shape):
            raise CheckpointError(
                f"shape mismatch at '{shown(name)}': checkpoint {got} vs model "
                f"{model_name} {tuple(shape)}; the checkpoint is of another architecture, pass "
                "the matching --model"
            )
    extra = next((k for k in state if k not in expected), None)
    if extra is not None:
        raise CheckpointError(
            f"checkpoint key '{shown(extra)}' does not exist in model {model_name}: it is "
            "of another architecture (or an open_clip variant megaclip cannot import); pass the "
            "matching --model"
        )


def load_eval_model(
    path: str,
    device: torch.device | str,
    model: str | ClipConfig | None = None,
    dtype: torch.dtype = torch.float32,
) -> ClipModel:
    """A ClipModel in eval mode on ``device`` / ``dtype`` with the weights of checkpoint ``path``.

    ``model`` (preset name, model file or ClipConfig) is required for bare state dicts and must
    agree with the embedded config of wrapped files. Raises CheckpointError on a missing or
    unreadable file and on architecture mismatches (naming the first mismatching key).
    """
    state, embedded = read_checkpoint(path)
    cfg = resolve_eval_config(path, embedded, model)
    state, origin = to_megaclip_state(state)
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
        net = ClipModel(cfg)
    check_state(state, {k: v.shape for k, v in net.state_dict().items()}, cfg.name, origin)
    net.load_state_dict(state, strict=True, assign=True)
    return net.to(device=device, dtype=dtype).eval()


class NormalizedEncoder(nn.Module):
    """Wrap a model whose encode_image/encode_text return raw features (e.g. open_clip's CLIP).

    encode_image(x) = normalize(model.encode_image(x)); encode_text likewise (L2, last dim).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image features [B, E]."""
        return F.normalize(self.model.encode_image(images), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """L2-normalised text features [B, E]."""
        return F.normalize(self.model.encode_text(tokens), dim=-1)
