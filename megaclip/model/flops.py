"""Analytic parameter counts, MACs and FLOPs per sample (pure functions of the config).

Conventions (the same as open_clip's published model table):
- one sample is one image at ``vision.image_size`` and one text of ``text.context_length`` tokens;
- MACs count matrix multiplies only (linear layers, patch embedding, Q@K^T and A@V over the full
  sequence, the projections); norms, softmax, activations and embedding look-ups are not counted;
- training FLOPs = 2 FLOPs per MAC x (1 forward + 2 backward) = 6 x MACs ("model FLOPs", used for
  MFU); activation checkpointing recomputes the forward: hardware FLOPs = 8 x MACs (used for HFU).
"""

from __future__ import annotations

from dataclasses import dataclass

from megaclip.config.model import ClipConfig, TextConfig, VisionConfig
from megaclip.parallel.sharding import BLOCK_LINEARS


def block_linear_shapes(width: int, mlp_dim: int) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear layer of one block, by its path in the sharding table."""
    return {
        "attn.qkv": (3 * width, width),
        "attn.out_proj": (width, width),
        "mlp.c_fc": (mlp_dim, width),
        "mlp.c_proj": (width, mlp_dim),
    }


def block_params(width: int, mlp_dim: int, tp: int = 1) -> int:
    """Parameters of one pre-LN block on one of ``tp`` ranks: the four linears (weights and
    biases, split as megaclip.parallel.sharding says) and two LayerNorms (replicated)."""
    n = 4 * width  # ln_1, ln_2: gain and bias
    for path, (out, inp) in block_linear_shapes(width, mlp_dim).items():
        split = BLOCK_LINEARS[path]
        n += split.weight.per_rank(out * inp, tp) + split.bias.per_rank(out, tp)
    return n


def block_macs(width: int, mlp_dim: int, seq: int) -> int:
    """Forward MACs of one block on ``seq`` tokens: S (4 W^2 + 2 W M) + 2 S^2 W (attention)."""
    return seq * (4 * width * width + 2 * width * mlp_dim) + 2 * seq * seq * width


def vision_embed_params(v: VisionConfig) -> int:
    """Patch conv (no bias), class token, positional embedding, ln_pre (replicated under TP)."""
    return v.channels * v.patch_size**2 * v.width + v.width + v.seq_len * v.width + 2 * v.width


def text_embed_params(t: TextConfig) -> int:
    """Token embedding (not vocab-parallel: replicated) and positional embedding."""
    return t.vocab_size * t.width + t.context_length * t.width


def vision_head_params(v: VisionConfig, embed_dim: int) -> int:
    """ln_post and the image projection."""
    return 2 * v.width + v.width * embed_dim


def text_head_params(t: TextConfig, embed_dim: int) -> int:
    """ln_final and the text projection."""
    return 2 * t.width + t.width * embed_dim


def vision_params(v: VisionConfig, embed_dim: int) -> int:
    """The image tower: embedding, blocks, head."""
    blocks = v.layers * block_params(v.width, v.mlp_dim)
    return vision_embed_params(v) + blocks + vision_head_params(v, embed_dim)


def text_params(t: TextConfig, embed_dim: int) -> int:
    """The text tower: embeddings, blocks, head."""
    blocks = t.layers * block_params(t.width, t.mlp_dim)
    return text_embed_params(t) + blocks + text_head_params(t, embed_dim)


def vision_embed_macs(v: VisionConfig) -> int:
    """Patch-embedding convolution: one (C p^2 -> W) matmul per patch."""
    return v.grid**2 * v.channels * v.patch_size**2 * v.width


def vision_macs(v: VisionConfig, embed_dim: int) -> int:
    """Forward MACs of the image tower for one image."""
    blocks = v.layers * block_macs(v.width, v.mlp_dim, v.seq_len)
    return vision_embed_macs(v) + blocks + v.width * embed_dim


def text_macs(t: TextConfig, embed_dim: int) -> int:
    """Forward MACs of the text tower for one context-length text (full attention counted)."""
    return t.layers * block_macs(t.width, t.mlp_dim, t.context_length) + t.width * embed_dim


@dataclass(frozen=True)
class ModelCost:
    """Parameter counts and per-sample compute of one CLIP model."""

    params_vision: int
    params_text: int
    params_total: int
    macs_vision: int
    macs_text: int
    macs_total: int

    @property
    def gmacs(self) -> float:
        return self.macs_total / 1e9

    @property
    def train_flops(self) -> int:
        """Model FLOPs per training sample (forward + backward): 6 x MACs."""
        return 6 * self.macs_total

    def hardware_flops(self, recompute: bool) -> int:
        """FLOPs actually executed per sample: one extra forward with activation checkpointing."""
        return (8 if recompute else 6) * self.macs_total

    def as_dict(self) -> dict[str, float | int]:
        return {
            "params_total": self.params_total,
            "params_vision": self.params_vision,
            "params_text": self.params_text,
            "gmacs_total": round(self.macs_total / 1e9, 3),
            "gmacs_vision": round(self.macs_vision / 1e9, 3),
            "gmacs_text": round(self.macs_text / 1e9, 3),
            "train_gflops_per_sample": round(self.train_flops / 1e9, 3),
        }


def model_cost(cfg: ClipConfig) -> ModelCost:
    """Parameters and forward MACs per sample of ``cfg`` (logit_scale and bias: 1 each)."""
    pv = vision_params(cfg.vision, cfg.embed_dim)
    pt = text_params(cfg.text, cfg.embed_dim)
    mv = vision_macs(cfg.vision, cfg.embed_dim)
    mt = text_macs(cfg.text, cfg.embed_dim)
    scalars = 1 + (cfg.init_logit_bias is not None)
    return ModelCost(pv, pt, pv + pt + scalars, mv, mt, mv + mt)


def vision_tokens(v: VisionConfig, patch_dropout: float = 0.0) -> int:
    """Tokens the vision blocks see in training: the class token + the patches FLIP keeps."""
    if patch_dropout <= 0:
        return v.seq_len
    return 1 + max(1, int((v.seq_len - 1) * (1 - patch_dropout)))


def train_flops(cfg: ClipConfig, patch_dropout: float = 0.0) -> int:
    """Model FLOPs per training sample (MFU's numerator): 6 x MACs, the vision blocks on the
    tokens patch dropout keeps (the patch embedding still sees every patch)."""
    v = cfg.vision
    dropped = block_macs(v.width, v.mlp_dim, v.seq_len) - block_macs(
        v.width, v.mlp_dim, vision_tokens(v, patch_dropout)
    )
    return model_cost(cfg).train_flops - 6 * v.layers * dropped
