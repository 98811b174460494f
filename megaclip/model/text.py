"""Text-tower parts (open_clip's layout): token + position embedding, pooled head."""

from __future__ import annotations

import torch
from torch import nn

from megaclip.config.model import TextConfig


class TextEmbed(nn.Module):
    """Token embedding plus learned positional embedding."""

    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # [B, L] int -> [B, L, D]
        return self.token_embedding(tokens) + self.positional_embedding


def pool_index(
    tokens: torch.Tensor, pool_type: str = "argmax", eos_id: int | None = None
) -> torch.Tensor:
    """Pooled position [B] of token rows [B, L], as open_clip's ``text_global_pool`` picks it."""
    if pool_type == "argmax":  # CLIP BPE: the end-of-text token has the largest id
        return tokens.argmax(dim=-1)
    if pool_type == "eos":  # the first eos_id token (position 0 when a row has none)
        return (tokens == eos_id).int().argmax(dim=-1)
    if pool_type in ("first", "last"):
        pos = 0 if pool_type == "first" else tokens.shape[-1] - 1
        return torch.full(tokens.shape[:1], pos, dtype=torch.long, device=tokens.device)
    raise ValueError(f"unknown text pool type {pool_type!r}")


class TextHead(nn.Module):
    """ln_final at the EOT position, then the text projection."""

    def __init__(self, cfg: TextConfig, embed_dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.ln_final = nn.LayerNorm(cfg.width, eps=eps)
        self.text_projection = nn.Parameter(torch.empty(cfg.width, embed_dim))

    def forward(self, x: torch.Tensor, eot: torch.Tensor) -> torch.Tensor:
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]  # [B, D]
        return self.ln_final(pooled) @ self.text_projection  # [B, E]
