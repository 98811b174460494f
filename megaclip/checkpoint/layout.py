"""Pure naming rules of megaclip checkpoints: step tags and DeepSpeed's shard file names.

How a parameter splits under TP is :mod:`megaclip.parallel.sharding`'s table (by name).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TAG = re.compile(r"^step-(\d+)(?:-(\d+))?$")


def step_tag(step: int, existing: set[str] | frozenset[str] = frozenset()) -> str:
    """Directory name of the checkpoint of ``step``: ``step-N``, or ``step-N-k`` if taken."""
    tag = f"step-{step}"
    k = 0
    while tag in existing:
        k += 1
        tag = f"step-{step}-{k}"
    return tag


def parse_tag(tag: str) -> tuple[int, int] | None:
    """(step, repeat) of a ``step-N[-k]`` directory name, None for anything else."""
    m = _TAG.match(tag)
    if m is None:
        return None
    return int(m.group(1)), int(m.group(2) or 0)


@dataclass(frozen=True)
class ShardFiles:
    """DeepSpeed 0.19 file names of one (pipeline stage, TP rank) model shard of a layout."""

    stage: int
    tp_rank: int
    tp: int
    pp: int

    @property
    def mp_rank(self) -> int:
        """DeepSpeed's model-parallel rank: stage * tp + tp_rank (TP fastest)."""
        return self.stage * self.tp + self.tp_rank

    def model_states(self, zero_stage: int, dp_rank: int = 0) -> str:
        """The engine's model-states file (holds 'module' when pp == 1 and ZeRO < 3)."""
        if zero_stage == 3:
            return f"zero_pp_rank_{dp_rank}_mp_rank_{self.mp_rank:02d}_model_states.pt"
        return f"mp_rank_{self.mp_rank:02d}_model_states.pt"

    def layer_states(self) -> str:
        """The PipelineModule layer file of this stage and TP rank (pp > 1 only)."""
        return f"layer_{self.stage:02d}-model_{self.tp_rank:02d}-model_states.pt"

    def optim_states(self, dp_rank: int, bf16_zero0: bool = False) -> str:
        """ZeRO (or bf16 optimizer) partition file of one DP rank."""
        prefix = "bf16_" if bf16_zero0 else ""
        return f"{prefix}zero_pp_rank_{dp_rank}_mp_rank_{self.mp_rank:02d}_optim_states.pt"


def zero3_partition_numel(numel: int, dp: int) -> int:
    """Elements per DP rank of a ZeRO-3 partitioned parameter: ceil(numel / dp) (last padded)."""
    return -(-numel // dp)
