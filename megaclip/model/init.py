"""Deterministic initialisation, independent of the parallel layout.

Every parameter's *full* (unsharded) value is a pure function of (seed, open_clip key, shape):
each rank draws the full tensor from a generator seeded by the key and keeps its TP shard. So a
TP x PP layout starts from exactly the weights of the single-process model with the same seed.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
from torch import nn

from megaclip.config.model import ClipConfig
from megaclip.model.naming import to_open_clip_key
from megaclip.parallel.layers import partition_of, tp_world
from megaclip.parallel.shapes import full_shape, shard


def _std(key: str, cfg: ClipConfig) -> float | None:
    """Normal std for ``key`` (open_clip-style scaled init); None for constants."""
    visual = key.startswith("visual.")
    tower = cfg.vision if visual else cfg.text
    w, n = tower.width, tower.layers
    proj_std = w**-0.5 * (2 * n) ** -0.5
    if key.endswith("bias") or ".ln_" in f".{key}" or key.startswith("ln_"):
        return None  # LayerNorm gains 1, biases 0
    if key.endswith("attn.in_proj_weight"):
        return w**-0.5
    if key.endswith(("attn.out_proj.weight", "mlp.c_proj.weight")):
        return proj_std
    if key.endswith("mlp.c_fc.weight"):
        return (2 * w) ** -0.5
    if key == "token_embedding.weight":
        return 0.02
    if key == "positional_embedding":
        return 0.01
    if key == "visual.conv1.weight":
        return (cfg.vision.channels * cfg.vision.patch_size**2) ** -0.5
    if key in ("visual.class_embedding", "visual.positional_embedding", "visual.proj"):
        return w**-0.5
    if key == "text_projection":
        return w**-0.5
    raise KeyError(f"no init rule for {key}")


def init_full(key: str, shape: tuple[int, ...], cfg: ClipConfig, seed: int) -> torch.Tensor:
    """The full fp32 initial value of the parameter with open_clip key ``key``."""
    if key == "logit_scale":
        return torch.full(shape, cfg.init_logit_scale)
    std = _std(key, cfg)
    if std is None:
        return torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(key.encode())) % 2**63)
    return torch.randn(shape, generator=gen) * std


@torch.no_grad()
def init_parameters(
    model: nn.Module, cfg: ClipConfig, seed: int, tp_group: dist.ProcessGroup | None = None
) -> None:
    """Fill every parameter of ``model`` (any TP shard / pipeline stage) from :func:`init_full`."""
    rank, size = tp_world(tp_group)
    for name, param in model.named_parameters():
        key = to_open_clip_key(name)
        dim, stride = partition_of(param)
        full = init_full(key, full_shape(param.shape, dim, size), cfg, seed)
        local = full if dim is None else shard(full, dim, stride, rank, size)
        param.copy_(local.to(param.dtype))
