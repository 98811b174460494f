"""What one benchmark run is: model, layout and step counts (pure: no torch, for the CLI)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from megaclip.config.parallel import ParallelConfig
from megaclip.config.train import LOSS_CHUNK_SIZE
from megaclip.errors import ConfigError


@dataclass(frozen=True)
class BenchSpec:
    """Model, layout and step counts of one benchmark run (dp=None: whatever the world gives)."""

    model: str = "tiny"
    tp: int = 1
    pp: int = 1
    dp: int | None = None
    micro_batch: int = 8
    accum: int = 1
    precision: str = "fp32"
    zero: int = 1
    steps: int = 5
    warmup: int = 2
    recompute: bool = False
    schedule: str = "auto"  # exact-loss schedule: "keep", "recompute" or "auto" (docs/loss.md)
    seed: int = 0
    loss_chunk_size: int | None = LOSS_CHUNK_SIZE
    ds_overrides: dict[str, Any] = field(default_factory=dict)

    def world_size(self, default_dp: int = 1) -> int:
        """tp * pp * dp (dp defaulting to ``default_dp``)."""
        return self.tp * self.pp * (self.dp if self.dp is not None else default_dp)

    def parallel(self, world: int) -> ParallelConfig:
        """The ParallelConfig for a launched world of ``world`` processes."""
        mp = self.tp * self.pp
        if world % mp:
            raise ConfigError(f"world size {world} is not a multiple of tp * pp = {mp}")
        dp = self.dp if self.dp is not None else world // mp
        par = ParallelConfig(
            tp=self.tp,
            pp=self.pp,
            dp=dp,
            zero_stage=self.zero,
            micro_batch_size=self.micro_batch,
            grad_accum_steps=self.accum,
            precision=self.precision,  # type: ignore[arg-type]
            activation_checkpointing=self.recompute,
            schedule=self.schedule,  # type: ignore[arg-type]
        )
        par.check_world(world)
        return par

    def to_json(self) -> str:
        """JSON text of every field (round-trips through from_json)."""
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> BenchSpec:
        """The spec written by to_json."""
        return cls(**json.loads(text))
