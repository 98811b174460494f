"""The CLIP architecture, defined once: a span of both towers, and the whole model as one span.

:class:`ClipStage` holds vision blocks [a, b) and text blocks [c, d) of the two towers (either
range may be empty); the first span also embeds patches and tokens, the last one holds both heads
and the learnable temperature. :class:`ClipModel` is the span that covers everything; a pipeline
stage (megaclip.pipeline.stages) is any other span plus its transport between stages.

Parameter names are the same whatever the span: ``visual.embed.*``, ``visual.blocks.<global
index>.*``, ``visual.head.*``, ``text.embed.*``, ``text.blocks.<i>.*``, ``text.head.*`` and
``logit_scale``, so checkpoints and the open_clip key mapping (model/naming.py) need no layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from megaclip.config.model import ClipConfig
from megaclip.config.parallel import check_tensor_parallel
from megaclip.model.blocks import ResidualBlock, run_blocks
from megaclip.model.text import TextEmbed, TextHead, pool_index
from megaclip.model.vision import VisionEmbed, VisionHead


@dataclass(frozen=True)
class Span:
    """Vision blocks [a, b) and text blocks [c, d); ``first`` embeds, ``last`` holds the heads."""

    vision: tuple[int, int]
    text: tuple[int, int]
    first: bool
    last: bool

    @staticmethod
    def whole(cfg: ClipConfig) -> Span:
        """The span of the single-device model: every block, embeddings and heads."""
        return Span((0, cfg.vision.layers), (0, cfg.text.layers), True, True)


class Tower(nn.Module):
    """One tower's part of a span: optional embed, blocks keyed by their global index, head."""

    def __init__(self, embed: nn.Module | None, blocks: dict[int, nn.Module], head) -> None:
        super().__init__()
        if embed is not None:
            self.embed = embed
        self.blocks = nn.ModuleDict({str(i): b for i, b in blocks.items()})
        if head is not None:
            self.head = head


class ClipStage(nn.Module):
    """Both towers' blocks of a :class:`Span` (+ embeddings on the first, heads on the last).

    ``logit_scale`` (last span only) is the *log* inverse temperature, a shape-[1] parameter
    because DeepSpeed cannot broadcast 0-dim parameters. It is clamped to ``cfg.max_logit_scale``
    where the loss is taken (train/engine.py), which works the same under every ZeRO stage.
    SigLIP models (``cfg.init_logit_bias`` set) also hold ``logit_bias`` [1].
    """

    def __init__(
        self,
        cfg: ClipConfig,
        span: Span,
        *,
        tp_group: dist.ProcessGroup | None = None,
        patch_dropout: float = 0.0,
        recompute: bool = False,
    ) -> None:
        super().__init__()
        if tp_group is not None:
            check_tensor_parallel(cfg, dist.get_world_size(tp_group))
        self.cfg, self.span, self.recompute = cfg, span, recompute
        v, t, eps, act = cfg.vision, cfg.text, cfg.layer_norm_eps, cfg.activation

        def blocks(c, rng: tuple[int, int], causal: bool) -> dict[int, nn.Module]:
            return {
                i: ResidualBlock(
                    c.width, c.heads, c.mlp_dim, act=act, eps=eps, causal=causal, tp_group=tp_group
                )
                for i in range(*rng)
            }

        self.visual = Tower(
            VisionEmbed(v, eps, patch_dropout) if span.first else None,
            blocks(v, span.vision, False),
            VisionHead(v, cfg.embed_dim, eps) if span.last else None,
        )
        self.text = Tower(
            TextEmbed(t) if span.first else None,
            blocks(t, span.text, True),
            TextHead(t, cfg.embed_dim, eps) if span.last else None,
        )
        if span.last:
            self.logit_scale = nn.Parameter(torch.full((1,), cfg.init_logit_scale))
            if cfg.init_logit_bias is not None:  # SigLIP
                self.logit_bias = nn.Parameter(torch.full((1,), cfg.init_logit_bias))

    def logit_params(self) -> torch.Tensor:
        """[log scale] (CLIP) or [log scale, bias] (SigLIP): what the loss takes besides features.

        A new tensor, never the parameters themselves: ZeRO-3 registers a returned parameter
        as "dangling" on whichever module is running, which breaks its fetch trace.
        """
        if hasattr(self, "logit_bias"):
            return torch.cat([self.logit_scale, self.logit_bias])  # [2]
        return self.logit_scale.view(1)  # [1]

    # The three phases of a span; a pipeline stage runs them with transport in between.
    def embed(self, images: torch.Tensor, tokens: torch.Tensor):
        """images [B, C, H, W], tokens [B, L] -> xv [B, Sv, Dv], xt [B, L, Dt], pooled pos [B]."""
        pool = pool_index(tokens, self.cfg.text.pool_type, self.cfg.text.eos_id)
        return self.visual.embed(images), self.text.embed(tokens), pool

    def run_vision(self, xv: torch.Tensor) -> torch.Tensor:  # [B, Sv, Dv] -> [B, Sv, Dv]
        return run_blocks(self.visual.blocks.values(), xv, self.recompute)

    def run_text(self, xt: torch.Tensor) -> torch.Tensor:  # [B, L, Dt] -> [B, L, Dt]
        return run_blocks(self.text.blocks.values(), xt, self.recompute)

    def heads(self, xv: torch.Tensor, xt: torch.Tensor, eot: torch.Tensor):
        """Normalised image features [B, E] and text features [B, E] (last span only)."""
        img = F.normalize(self.visual.head(xv), dim=-1)
        txt = F.normalize(self.text.head(xt, eot), dim=-1)
        return img, txt


class ClipModel(ClipStage):
    """images [B, C, H, W], tokens [B, L] -> features [B, E] x 2, [log scale (, bias)] [1 or 2].

    The single-device model: the :class:`ClipStage` whose span covers every block.
    """

    def __init__(
        self,
        cfg: ClipConfig,
        *,
        tp_group: dist.ProcessGroup | None = None,
        patch_dropout: float = 0.0,
        recompute: bool = False,
    ) -> None:
        super().__init__(
            cfg,
            Span.whole(cfg),
            tp_group=tp_group,
            patch_dropout=patch_dropout,
            recompute=recompute,
        )

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.run_vision(self.visual.embed(images))  # [B, Sv, Dv]
        x = self.visual.head(x)  # [B, E]
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.run_text(self.text.embed(tokens))  # [B, L, Dt]
        x = self.text.head(x, pool_index(tokens, self.cfg.text.pool_type, self.cfg.text.eos_id))
        return F.normalize(x, dim=-1) if normalize else x

    def forward(
        self, images: torch.Tensor, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        xv, xt, eot = self.embed(images, tokens)
        img, txt = self.heads(self.run_vision(xv), self.run_text(xt), eot)  # [B, E] x 2
        return img, txt, self.logit_params()
