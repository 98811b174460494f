"""Pipeline stages that carry both towers, and their DeepSpeed ``PipelineModule``.

Between stages the two streams travel as ONE packed float tensor per micro-batch (DeepSpeed
allows only one grad-carrying tensor between stages with TP > 1) plus the int64 EOT positions:

    stage s < P-1 output: (packed [B, Sv*Dv + St*Dt], eot [B])
    last stage output:    [B, 2E + 1] = [image features | text features | log logit scale]

Features are L2-normalised; the logit scale travels as a column so its gradient flows through
the same backward as the features.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megaclip.config.model import ClipConfig
from megaclip.model.blocks import ResidualBlock, run_blocks
from megaclip.model.text import TextEmbed, TextHead, pool_index
from megaclip.model.vision import VisionEmbed, VisionHead
from megaclip.pipeline.partition import StagePlan


def vision_tokens(cfg: ClipConfig, patch_dropout: float) -> int:
    """Vision sequence length after (optional) FLIP patch dropout."""
    patches = cfg.vision.seq_len - 1
    if patch_dropout <= 0:
        return cfg.vision.seq_len
    return 1 + max(1, int(patches * (1 - patch_dropout)))


def pack(xv: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """[B, Sv, Dv], [B, St, Dt] -> [B, Sv*Dv + St*Dt]."""
    return torch.cat([xv.flatten(1), xt.flatten(1)], dim=1)


def unpack(packed: torch.Tensor, sv: int, dv: int, st: int, dt: int):
    """Inverse of :func:`pack`."""
    xv, xt = packed.split([sv * dv, st * dt], dim=1)
    return xv.view(-1, sv, dv), xt.view(-1, st, dt)


class _Tower(nn.Module):
    """Holds one tower's part on a stage: optional embed, blocks keyed by global index, head."""

    def __init__(self, embed, blocks: dict[int, nn.Module], head) -> None:
        super().__init__()
        if embed is not None:
            self.embed = embed
        self.blocks = nn.ModuleDict({str(i): b for i, b in blocks.items()})
        if head is not None:
            self.head = head


class ClipStage(nn.Module):
    """One pipeline stage: vision blocks [a, b) and text blocks [c, d) (+ embeds / heads)."""

    def __init__(
        self,
        cfg: ClipConfig,
        plan: StagePlan,
        *,
        tp_group: dist.ProcessGroup | None = None,
        patch_dropout: float = 0.0,
        recompute: bool = False,
    ) -> None:
        super().__init__()
        self.cfg, self.plan, self.recompute = cfg, plan, recompute
        self.sv = vision_tokens(cfg, patch_dropout)
        eps, act = cfg.layer_norm_eps, cfg.activation
        v, t = cfg.vision, cfg.text

        def blocks(c, rng, causal):
            return {
                i: ResidualBlock(
                    c.width, c.heads, c.mlp_dim, act=act, eps=eps, causal=causal, tp_group=tp_group
                )
                for i in range(*rng)
            }

        self.visual = _Tower(
            VisionEmbed(v, eps, patch_dropout) if plan.first else None,
            blocks(v, plan.vision, False),
            VisionHead(v, cfg.embed_dim, eps) if plan.last else None,
        )
        self.text = _Tower(
            TextEmbed(t) if plan.first else None,
            blocks(t, plan.text, True),
            TextHead(t, cfg.embed_dim, eps) if plan.last else None,
        )
        if plan.last:
            self.logit_scale = nn.Parameter(torch.full((1,), cfg.init_logit_scale))

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]):
        v, t = self.cfg.vision, self.cfg.text
        if self.plan.first:
            images, tokens = inputs  # [B, C, H, W], [B, L] int
            xv = self.visual.embed(images)  # [B, Sv, Dv]
            xt = self.text.embed(tokens)  # [B, St, Dt]
            eot = pool_index(tokens, t.pool_type, t.eos_id)  # [B] int
        else:
            packed, eot = inputs  # [B, Sv*Dv + St*Dt], [B]
            xv, xt = unpack(packed, self.sv, v.width, t.context_length, t.width)
        xv = run_blocks(self.visual.blocks.values(), xv, self.recompute)
        xt = run_blocks(self.text.blocks.values(), xt, self.recompute)
        if not self.plan.last:
            return pack(xv, xt), eot
        img = F.normalize(self.visual.head(xv), dim=-1)  # [B, E]
        txt = F.normalize(self.text.head(xt, eot), dim=-1)  # [B, E]
        scale = self.logit_scale.expand(img.shape[0], 1)  # [B, 1]
        return torch.cat([img, txt, scale], dim=1)  # [B, 2E + 1]


def split_outputs(out: torch.Tensor, embed_dim: int):
    """Last-stage output [B, 2E+1] -> image [B, E], text [B, E], log logit scale [1]."""
    return out[:, :embed_dim], out[:, embed_dim : 2 * embed_dim], out[:1, 2 * embed_dim]


def cached_grad_loss(outputs: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """Surrogate sum(outputs * cached): its gradient w.r.t. outputs is the cached gradient."""
    return (outputs * cached).sum()
