"""Transformer building blocks shared by both towers (pre-LN, as in CLIP).

Linear layers are megatron-core tensor-parallel layers; with ``tp_group=None`` they are plain
linears. Shapes in comments: B batch, S sequence, D width, H heads, T tensor-parallel size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from megaclip.parallel.layers import tp_linear, tp_world


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the activation of OpenAI's original CLIP weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


def activation(name: str) -> nn.Module:
    return QuickGELU() if name == "quick_gelu" else nn.GELU()


class Attention(nn.Module):
    """Multi-head self-attention; heads split over TP ranks (QKV column-, out-proj row-parallel)."""

    def __init__(
        self, width: int, heads: int, *, causal: bool, tp_group: dist.ProcessGroup | None
    ) -> None:
        super().__init__()
        _, tp = tp_world(tp_group)
        self.local_heads = heads // tp
        self.head_dim = width // heads
        self.causal = causal
        # Full weight is open_clip's in_proj_weight [3D, D]; TP rank r holds [q_r; k_r; v_r].
        self.qkv = tp_linear("attn.qkv", width, 3 * width, tp_group=tp_group)  # column
        self.out_proj = tp_linear("attn.out_proj", width, width, tp_group=tp_group)  # row

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape  # [B, S, D]
        qkv = self.qkv(x).view(b, s, 3, self.local_heads, self.head_dim)  # [B, S, 3, H/T, D/H]
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, H/T, S, D/H]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # [B, H/T, S, D/H]
        y = y.transpose(1, 2).reshape(b, s, self.local_heads * self.head_dim)  # [B, S, D/T]
        return self.out_proj(y)  # [B, S, D] (all-reduced over TP)


class Mlp(nn.Module):
    """fc2(act(fc1(x))); fc1 column-parallel, fc2 row-parallel: one all-reduce per MLP."""

    def __init__(
        self, width: int, mlp_dim: int, act: str, *, tp_group: dist.ProcessGroup | None
    ) -> None:
        super().__init__()
        self.c_fc = tp_linear("mlp.c_fc", width, mlp_dim, tp_group=tp_group)  # column
        self.act = activation(act)
        self.c_proj = tp_linear("mlp.c_proj", mlp_dim, width, tp_group=tp_group)  # row

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, D]
        return self.c_proj(self.act(self.c_fc(x)))  # [B, S, M/T] inside -> [B, S, D]


class ResidualBlock(nn.Module):
    """x + attn(ln_1(x)), then + mlp(ln_2(x)): one pre-LN transformer block."""

    def __init__(
        self,
        width: int,
        heads: int,
        mlp_dim: int,
        *,
        act: str = "gelu",
        eps: float = 1e-5,
        causal: bool = False,
        tp_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.attn = Attention(width, heads, causal=causal, tp_group=tp_group)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.mlp = Mlp(width, mlp_dim, act, tp_group=tp_group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, S, D] -> [B, S, D]
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, recompute: bool) -> torch.Tensor:
    """Apply ``blocks`` in order; with ``recompute`` each block's activations are recomputed."""
    for block in blocks:
        if recompute and torch.is_grad_enabled():
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x
