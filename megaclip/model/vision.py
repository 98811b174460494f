"""Image-tower parts of the ViT (open_clip's VisionTransformer): patch embedding and head."""

from __future__ import annotations

import torch
from torch import nn

from megaclip.config.model import VisionConfig


class PatchEmbed(nn.Module):
    """y = patches(x) @ W^T: a stride-p, kernel-p convolution without bias, as one matmul.

    The weight keeps the convolution's shape [D, C, p, p] (open_clip's ``conv1.weight``); a
    reshape + matmul is much faster than Conv2d's backward on CPU, and identical in math.
    """

    def __init__(self, channels: int, width: int, patch: int) -> None:
        super().__init__()
        self.patch = patch
        self.weight = nn.Parameter(torch.empty(width, channels, patch, patch))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        b, c, h, w = images.shape  # [B, C, H, W]
        p = self.patch
        x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        x = x.reshape(b, (h // p) * (w // p), c * p * p)  # [B, G*G, C*p*p]
        return x @ self.weight.reshape(self.weight.shape[0], -1).T  # [B, G*G, D]


class VisionEmbed(nn.Module):
    """Patchify (conv, no bias), prepend the class token, add positions, ln_pre; FLIP dropout."""

    def __init__(self, cfg: VisionConfig, eps: float = 1e-5, patch_dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = PatchEmbed(cfg.channels, cfg.width, cfg.patch_size)
        self.class_embedding = nn.Parameter(torch.empty(cfg.width))
        self.positional_embedding = nn.Parameter(torch.empty(cfg.seq_len, cfg.width))
        self.ln_pre = nn.LayerNorm(cfg.width, eps=eps)
        self.patch_dropout = patch_dropout

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.conv1(images.to(self.conv1.weight.dtype))  # [B, G*G, D]
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # [B, 1, D]
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # [B, S, D]
        if self.training and self.patch_dropout > 0:
            x = drop_patches(x, self.patch_dropout)  # [B, 1 + keep, D]
        return self.ln_pre(x)


def drop_patches(x: torch.Tensor, prob: float) -> torch.Tensor:
    """FLIP: keep the class token and a random ``1 - prob`` fraction of patch tokens per image."""
    b, s, d = x.shape  # [B, 1 + P, D]
    keep = max(1, int((s - 1) * (1 - prob)))
    scores = torch.rand(b, s - 1, device=x.device)
    idx = scores.topk(keep, dim=1).indices.sort(dim=1).values + 1  # [B, keep]
    patches = x.gather(1, idx.unsqueeze(-1).expand(-1, -1, d))  # [B, keep, D]
    return torch.cat([x[:, :1], patches], dim=1)


class VisionHead(nn.Module):
    """ln_post on the class token, then the projection to the shared embedding space."""

    def __init__(self, cfg: VisionConfig, embed_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.ln_post = nn.LayerNorm(cfg.width, eps=eps)
        self.proj = nn.Parameter(torch.empty(cfg.width, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, D] -> [B, E]
        return self.ln_post(x[:, 0]) @ self.proj
