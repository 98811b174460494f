"""The CLIP model: image tower, text tower and a learnable temperature."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megaclip.config.model import ClipConfig
from megaclip.model.text import TextTower
from megaclip.model.vision import VisionTower
from megaclip.parallel.shapes import check_tensor_parallel


class ClipModel(nn.Module):
    """images [B, C, H, W], tokens [B, L] -> normalised features [B, E] x 2 and log logit scale [1].

    ``logit_scale`` is the *log* of the softmax temperature's inverse (as in open_clip); it is a
    shape-[1] parameter because DeepSpeed cannot broadcast 0-dim parameters. The loss clamps it
    to ``cfg.max_logit_scale`` (ln 100) in the forward, which works the same under every ZeRO
    stage (clamping the parameter after the step would miss ZeRO's fp32 master copy).
    """

    def __init__(
        self,
        cfg: ClipConfig,
        *,
        tp_group: dist.ProcessGroup | None = None,
        patch_dropout: float = 0.0,
        recompute: bool = False,
    ) -> None:
        super().__init__()
        if tp_group is not None:
            check_tensor_parallel(cfg, dist.get_world_size(tp_group))
        self.cfg = cfg
        kw = dict(act=cfg.activation, eps=cfg.layer_norm_eps, tp_group=tp_group)
        self.visual = VisionTower(cfg.vision, cfg.embed_dim, patch_dropout=patch_dropout, **kw)
        self.text = TextTower(cfg.text, cfg.embed_dim, **kw)
        self.logit_scale = nn.Parameter(torch.full((1,), cfg.init_logit_scale))
        self.set_recompute(recompute)

    def set_recompute(self, enabled: bool) -> None:
        """Activation checkpointing per residual block (recompute the forward in backward)."""
        self.visual.recompute = self.text.recompute = enabled

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.visual(images)  # [B, E]
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.text(tokens)  # [B, E]
        return F.normalize(x, dim=-1) if normalize else x

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image_features = self.encode_image(images)  # [B, E]
        text_features = self.encode_text(tokens)  # [B, E]
        return image_features, text_features, self.logit_scale  # ..., [1]
