"""Model configuration: frozen dataclasses for the vision tower, text tower and CLIP model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from megaclip.config.schema import check_finite, from_dict, is_file, load_mapping
from megaclip.errors import ConfigError

PRESET_DIR = Path(__file__).parent / "presets"
# Where the text tower pools (open_clip's ``text_pool_type``): the largest token id (CLIP BPE's
# end-of-text), the first ``eos_id`` token, the first position or the last position.
POOL_TYPES = ("argmax", "eos", "first", "last")
ALIASES = {"ViT-bigG-14": "ViT-G-14"}


# Upper bounds of the model sizes, far above any real model (ViT-G/14: 48 layers, width 1664),
# so that a typo fails here instead of in the planner's per-layer loops or float conversions.
MAX_LAYERS = 4096
MAX_DIM = 2**20  # widths, MLP and embedding dims, image size, context length, channels
MAX_VOCAB = 2**24


def _positive(where: str, **values: int) -> None:
    """ConfigError unless every value is in [1, its bound] (layers, vocab_size, other dims)."""
    for name, v in values.items():
        high = {"layers": MAX_LAYERS, "vocab_size": MAX_VOCAB}.get(name, MAX_DIM)
        if v <= 0:
            raise ConfigError(f"{where}.{name} must be positive, got {v}")
        if v > high:
            raise ConfigError(f"{where}.{name} must be at most {high}, got {v}")


def _check_tower(where: str, tower: Any, sizes: tuple[str, ...]) -> None:
    """``sizes`` of a tower config positive, and its width split evenly over its heads."""
    _positive(where, **{name: getattr(tower, name) for name in sizes})
    if tower.width % tower.heads:
        raise ConfigError(
            f"{where}.width {tower.width} is not divisible by {where}.heads {tower.heads}"
        )


@dataclass(frozen=True)
class VisionConfig:
    """A ViT image tower: patch embedding, class token, pre-LN transformer, ln_post + projection."""

    image_size: int = 224
    patch_size: int = 32
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    channels: int = 3

    def __post_init__(self) -> None:
        sizes = ("image_size", "patch_size", "width", "layers", "heads", "mlp_dim", "channels")
        _check_tower("vision", self, sizes)
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"vision.image_size {self.image_size} is not divisible by "
                f"vision.patch_size {self.patch_size}"
            )

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def seq_len(self) -> int:
        """Tokens per image: patches plus the class token."""
        return self.grid**2 + 1

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


@dataclass(frozen=True)
class TextConfig:
    """A causal text transformer: token + position embeddings, pre-LN blocks, pooled head.

    ``pool_type`` picks the pooled position (see POOL_TYPES); ``eos_id`` is the end-of-text id
    that ``pool_type: eos`` looks for (the tokenizer's; set only with ``eos``).
    """

    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    layers: int = 12
    heads: int = 8
    mlp_dim: int = 2048
    pool_type: Literal["argmax", "eos", "first", "last"] = "argmax"
    eos_id: int | None = None

    def __post_init__(self) -> None:
        sizes = ("context_length", "vocab_size", "width", "layers", "heads", "mlp_dim")
        _check_tower("text", self, sizes)
        self._check_pooling()

    def _check_pooling(self) -> None:
        if self.pool_type not in POOL_TYPES:
            raise ConfigError(
                f"text.pool_type {self.pool_type!r} is not one of {', '.join(POOL_TYPES)}"
            )
        if self.pool_type != "eos":
            if self.eos_id is not None:
                raise ConfigError(
                    f"text.eos_id {self.eos_id} is only used with text.pool_type: eos (got "
                    f"{self.pool_type}); drop eos_id or set pool_type: eos"
                )
            return
        if self.eos_id is None:
            raise ConfigError(
                "text.pool_type eos needs text.eos_id: the tokenizer's end-of-text id "
                "(SentencePiece: its eos_id, often 1 or 2)"
            )
        if not 0 <= self.eos_id < self.vocab_size:
            raise ConfigError(
                f"text.eos_id {self.eos_id} is outside the vocabulary [0, {self.vocab_size})"
            )

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


@dataclass(frozen=True)
class ClipConfig:
    """A CLIP model: two towers projected to a shared ``embed_dim`` plus a learnable temperature."""

    name: str = "custom"
    embed_dim: int = 512
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    activation: Literal["gelu", "quick_gelu"] = "gelu"
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = math.log(100.0)
    layer_norm_eps: float = 1e-5
    # SigLIP models: the learnable additive logit bias (open_clip's init_logit_bias); None = a
    # CLIP model without one
    init_logit_bias: float | None = None

    def __post_init__(self) -> None:
        _positive("model", embed_dim=self.embed_dim)
        check_finite("model.init_logit_scale", self.init_logit_scale)
        check_finite("model.max_logit_scale", self.max_logit_scale, 0.0, low_open=True)
        check_finite("model.layer_norm_eps", self.layer_norm_eps, 0.0, low_open=True)
        if self.init_logit_bias is not None:
            check_finite("model.init_logit_bias", self.init_logit_bias)
        if self.init_logit_scale > self.max_logit_scale:
            raise ConfigError(
                f"model.init_logit_scale {self.init_logit_scale:.4f} exceeds "
                f"model.max_logit_scale {self.max_logit_scale:.4f}"
            )

    def with_overrides(self, **kwargs: Any) -> ClipConfig:
        return replace(self, **kwargs)


def list_presets() -> list[str]:
    """Names of the bundled model presets (aliases not included)."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> ClipConfig:
    """The bundled preset ``name`` (``ViT-bigG-14`` is an alias of ``ViT-G-14``)."""
    canonical = ALIASES.get(name, name)
    path = PRESET_DIR / f"{canonical}.yaml"
    if not is_file(path):
        import difflib

        names = list_presets() + list(ALIASES)
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(
            f"unknown model '{name}'.{hint} Known: {', '.join(names)} "
            "(or pass a YAML/JSON model file)."
        )
    return model_from_dict(load_mapping(path), where=f"preset {canonical}")


def model_from_dict(data: dict[str, Any], where: str = "model") -> ClipConfig:
    """Validate a model mapping; ``preset: NAME`` starts from a preset and overrides fields."""
    data = dict(data)
    base = data.pop("preset", None)
    if base is None:
        return from_dict(ClipConfig, data, where)
    from megaclip.config.schema import to_dict

    merged = to_dict(load_preset(str(base)))
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return from_dict(ClipConfig, merged, where)


def resolve_model(spec: str | dict[str, Any] | ClipConfig) -> ClipConfig:
    """A preset name, a YAML/JSON file path, a mapping or a ClipConfig -> ClipConfig."""
    if isinstance(spec, ClipConfig):
        return spec
    if isinstance(spec, dict):
        return model_from_dict(spec)
    if spec.endswith((".yaml", ".yml", ".json")):
        return model_from_dict(load_mapping(spec), where=spec)
    return load_preset(spec)
