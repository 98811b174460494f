"""Parallel layout and batch configuration, validated before any process group exists."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from megaclip.config.model import ClipConfig
from megaclip.config.schema import MAX_COUNT, check_at_least
from megaclip.errors import ConfigError

Precision = Literal["fp32", "bf16", "fp16"]


def check_tensor_parallel(cfg: ClipConfig, tp: int) -> None:
    """Raise one ConfigError if ``tp`` cannot split both towers' heads and MLPs evenly."""
    if tp < 1:
        raise ConfigError(f"parallel.tp must be >= 1, got {tp}")
    problems = []
    for tower, c in (("vision", cfg.vision), ("text", cfg.text)):
        if c.heads % tp:
            problems.append(f"{tower}.heads={c.heads}")
        if c.mlp_dim % tp:
            problems.append(f"{tower}.mlp_dim={c.mlp_dim}")
    if problems:
        options = [
            d
            for d in range(1, 65)
            if all(x % d == 0 for x in (cfg.vision.heads, cfg.text.heads))
            and all(x % d == 0 for x in (cfg.vision.mlp_dim, cfg.text.mlp_dim))
        ]
        raise ConfigError(
            f"tensor parallel size {tp} does not divide {', '.join(problems)} of model "
            f"'{cfg.name}'; valid tp values for this model: {options}"
        )


def derive_dp(world: int, tp: int, pp: int) -> int:
    """Data-parallel size dp = world / (tp * pp); raise if the world does not divide.

    The one tp/pp/world rule: launch plans (megaclip.launch, no torch) derive dp with it and
    :meth:`ParallelConfig.check_world` checks a launched world with it.
    """
    model_parallel = tp * pp
    if world < 1 or world % model_parallel:
        raise ConfigError(
            f"{world} processes cannot be split into model-parallel groups of tp {tp} x pp {pp} = "
            f"{model_parallel}; launch a multiple of {model_parallel} processes (nodes x GPUs per "
            "node) or change parallel.tp / parallel.pp"
        )
    return world // model_parallel


def forward_passes(schedule: str, pp: int, accum: int) -> int:
    """Forward passes per micro-batch and step under a resolved schedule ("keep"/"recompute"):
    2 when a no-grad feature pass runs first (recompute; at PP = 1 only with accumulation)."""
    if schedule not in ("keep", "recompute"):
        raise ValueError(f"forward_passes needs a resolved schedule, got {schedule!r}")
    return 2 if schedule == "recompute" and (pp > 1 or accum > 1) else 1


@dataclass(frozen=True)
class ParallelConfig:
    """(tp, pp, dp) layout, ZeRO stage, micro-batching and precision of one training run.

    World size = tp * pp * dp (TP innermost, then DP, then PP: megatron-core's rank order).
    Global batch = micro_batch_size * grad_accum_steps * dp; every sample of it is a negative for
    every other in the contrastive loss, whatever the layout.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    zero_stage: int = 1
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    precision: Precision = "fp32"
    activation_checkpointing: bool = False
    # The exact global-loss schedule (docs/loss.md): "keep" = each micro-batch's graph is kept
    # until the loss (one forward; PP > 1: GPipe order + one global-loss step); "recompute" =
    # features of all micro-batches without graphs, the loss, then each micro-batch again with
    # its graph (flat memory in the accumulation, one more forward; PP > 1: then DeepSpeed's
    # stock 1F1B). "auto": the planner's memory model picks (megaclip.perf.memory.choose_schedule).
    schedule: Literal["auto", "keep", "recompute"] = "auto"

    def __post_init__(self) -> None:
        check_at_least(
            "parallel", 1, tp=self.tp, pp=self.pp, dp=self.dp,
            micro_batch_size=self.micro_batch_size, grad_accum_steps=self.grad_accum_steps,
        )  # fmt: skip
        if self.global_batch_size > MAX_COUNT:
            raise ConfigError(
                f"parallel: the global batch micro_batch_size x grad_accum_steps x dp = "
                f"{self.global_batch_size} exceeds {MAX_COUNT}"
            )
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"parallel.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.schedule == "keep" and self.zero_stage == 3 and self.grad_accum_steps > 1:
            raise ConfigError(
                "parallel.schedule: keep cannot run ZeRO-3 with grad_accum_steps > 1 (ZeRO-3 "
                "fetches parameters for one forward-backward pair at a time); use schedule: "
                "recompute or auto"
            )
        if self.pp > 1 and self.zero_stage > 1:
            raise ConfigError(
                f"ZeRO stage {self.zero_stage} cannot be combined with pipeline parallelism "
                f"(pp={self.pp}): DeepSpeed's pipeline engine supports ZeRO-0/1 only. "
                "Use zero_stage: 1, or pp: 1 for ZeRO-2/3."
            )

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.dp

    def check_model(self, model: ClipConfig) -> None:
        """Raise if the model cannot be split this way (TP heads, PP blocks)."""
        check_tensor_parallel(model, self.tp)
        blocks = model.vision.layers + model.text.layers
        if self.pp > blocks:
            raise ConfigError(
                f"pipeline size {self.pp} exceeds the model's {blocks} residual blocks "
                f"({model.vision.layers} vision + {model.text.layers} text)"
            )

    def check_world(self, world_size: int) -> None:
        """Raise if the launched world size differs from tp * pp * dp."""
        if world_size != self.world_size:
            dp = derive_dp(world_size, self.tp, self.pp)  # raises unless tp * pp divides it
            raise ConfigError(
                f"launched {world_size} processes but tp * pp * dp = {self.tp} * {self.pp} * "
                f"{self.dp} = {self.world_size}; set parallel.dp = {dp}"
            )
