"""Pure stage partitioning: both towers on every stage, balanced by forward FLOPs.

Every pipeline stage runs a contiguous range of vision blocks *and* a contiguous range of text
blocks (either may be empty), so both streams flow through all stages. Stage 0 also embeds
patches and tokens; the last stage holds ln_post/proj, ln_final/text_projection and logit_scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megaclip.config.model import ClipConfig
from megaclip.errors import ConfigError
from megaclip.model.flops import block_macs, vision_embed_macs

if TYPE_CHECKING:
    from megaclip.model.clip import Span


@dataclass(frozen=True)
class StageRanges:
    """Vision blocks [a, b) and text blocks [c, d) of stage ``index`` out of ``num_stages``."""

    index: int
    num_stages: int
    vision: tuple[int, int]
    text: tuple[int, int]

    @property
    def first(self) -> bool:
        """Stage 0 (holds the embeddings)."""
        return self.index == 0

    @property
    def last(self) -> bool:
        """The last stage (holds the heads, logit_scale and the loss)."""
        return self.index == self.num_stages - 1


@dataclass(frozen=True)
class StagePlan(StageRanges):
    """Block ranges [start, stop) of one pipeline stage and its forward MACs per sample."""

    macs: int

    @property
    def span(self) -> Span:
        """The model span (megaclip.model.clip.Span) this stage builds."""
        from megaclip.model.clip import Span  # torch and megatron: not at the planner's import

        return Span(self.vision, self.text, self.first, self.last)


def _block_costs(cfg: ClipConfig) -> tuple[int, int, int, int]:
    v, t = cfg.vision, cfg.text
    vision_block = block_macs(v.width, v.mlp_dim, v.seq_len)
    text_block = block_macs(t.width, t.mlp_dim, t.context_length)
    first_extra = vision_embed_macs(v)
    last_extra = (v.width + t.width) * cfg.embed_dim
    return vision_block, text_block, first_extra, last_extra


def partition(cfg: ClipConfig, num_stages: int) -> list[StagePlan]:
    """Assign blocks to ``num_stages`` stages minimising the most loaded stage's MACs.

    Blocks of one tower cost the same, so only the per-stage counts matter: blocks are placed
    greedily (costliest kind first) on the least loaded stage, then counts become contiguous
    ranges in stage order. Greedy placement of equal-cost items is within one block of optimal.
    """
    nv, nt = cfg.vision.layers, cfg.text.layers
    if num_stages < 1 or num_stages > nv + nt:
        raise ConfigError(
            f"cannot split {nv} vision + {nt} text blocks into {num_stages} pipeline stages"
        )
    cv, ct, first_extra, last_extra = _block_costs(cfg)
    load = [0] * num_stages
    load[0] += first_extra
    load[-1] += last_extra
    counts = {"v": [0] * num_stages, "t": [0] * num_stages}
    kinds = sorted([("v", cv, nv), ("t", ct, nt)], key=lambda k: -k[1])
    for kind, cost, n in kinds:
        for _ in range(n):
            s = min(range(num_stages), key=lambda i: (load[i], i))
            load[s] += cost
            counts[kind][s] += 1
    plans, v0, t0 = [], 0, 0
    for s in range(num_stages):
        v1, t1 = v0 + counts["v"][s], t0 + counts["t"][s]
        plans.append(StagePlan(s, num_stages, (v0, v1), (t0, t1), load[s]))
        v0, t0 = v1, t1
    return plans


def bubble_fraction(num_stages: int, micro_batches: int) -> float:
    """Idle fraction of a synchronous pipeline schedule: (P - 1) / (m + P - 1)."""
    return (num_stages - 1) / (micro_batches + num_stages - 1)
