"""Pipeline stages that carry both towers: megaclip.model's ClipStage plus inter-stage transport.

Between stages the two streams travel as ONE packed float tensor per micro-batch (DeepSpeed
allows only one grad-carrying tensor between stages with TP > 1) plus the int64 EOT positions:

    stage s < P-1 output: (packed [B, Sv*Dv + St*Dt], eot [B])
    last stage output:    [B, 2E + k] = [image features | text features | log scale (| bias)]

Features are L2-normalised; the logit scale (and SigLIP's bias: k = 2) travels as columns so
their gradients flow through the same backward as the features.
"""

from __future__ import annotations

from typing import Any

import torch

from megaclip.config.model import ClipConfig
from megaclip.model.clip import ClipStage
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


class PipeStage(ClipStage):
    """A :class:`ClipStage` with the pipeline's transport: packed stream in, packed stream out."""

    def __init__(self, cfg: ClipConfig, plan: StagePlan, **options: Any) -> None:
        """``options``: ClipStage's (tp_group, patch_dropout, recompute)."""
        super().__init__(cfg, plan.span, **options)
        self.plan = plan
        self.sv = vision_tokens(cfg, options.get("patch_dropout", 0.0))

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]):
        v, t = self.cfg.vision, self.cfg.text
        if self.span.first:
            xv, xt, eot = self.embed(*inputs)  # images [B, C, H, W], tokens [B, L] int
        else:
            packed, eot = inputs  # [B, Sv*Dv + St*Dt], [B]
            xv, xt = unpack(packed, self.sv, v.width, t.context_length, t.width)
        xv, xt = self.run_vision(xv), self.run_text(xt)  # [B, Sv, Dv], [B, St, Dt]
        if not self.span.last:
            return pack(xv, xt), eot
        img, txt = self.heads(xv, xt, eot)  # [B, E] x 2
        logit = self.logit_params().expand(img.shape[0], -1)  # [B, k]: log scale (, bias)
        return torch.cat([img, txt, logit], dim=1)  # [B, 2E + k]


def split_outputs(out: torch.Tensor, embed_dim: int):
    """Last-stage output [B, 2E+k] -> image [B, E], text [B, E], [log scale (, bias)] [k]."""
    return out[:, :embed_dim], out[:, embed_dim : 2 * embed_dim], out[0, 2 * embed_dim :]


def cached_grad_loss(outputs: torch.Tensor, cached: torch.Tensor) -> torch.Tensor:
    """Surrogate sum(outputs * cached): its gradient w.r.t. outputs is the cached gradient."""
    return (outputs * cached).sum()
