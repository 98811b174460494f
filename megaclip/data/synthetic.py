"""Synthetic CLIP batches for benchmarks: random images and random token sequences, seeded."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from megaclip.errors import ConfigError


@dataclass(frozen=True)
class SyntheticConfig:
    """Shape and token layout of synthetic batches (defaults: CLIP BPE, 77 tokens)."""

    batch_size: int
    image_size: int = 224
    context_length: int = 77
    vocab_size: int = 49408
    sot_id: int | None = 49406
    eot_id: int = 49407
    seed: int = 0

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.image_size < 1:
            raise ConfigError("synthetic data: batch_size and image_size must be >= 1")
        first = 1 if self.sot_id is not None else 0
        if self.context_length < first + 1:
            raise ConfigError(f"synthetic data: context_length={self.context_length} is too short")
        if not 0 < self.eot_id < self.vocab_size:
            raise ConfigError(f"synthetic data: eot_id={self.eot_id} not in (0, {self.vocab_size})")
        if self._max_plain_id() < 1:
            raise ConfigError("synthetic data: the vocabulary leaves no id for ordinary tokens")

    def _max_plain_id(self) -> int:
        """Largest id used for ordinary tokens: below eot_id (and sot_id), so EOT is the argmax."""
        ids = [self.eot_id] + ([self.sot_id] if self.sot_id is not None else [])
        return min(ids) - 1


def synthetic_batch(
    cfg: SyntheticConfig, generator: torch.Generator, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch: images ~ N(0, 1) float32 [B, 3, S, S] and token ids int64 [B, L].

    Row layout: [SOT] t_1 ... t_k EOT 0 ... 0 with t_i ~ U{1..min(SOT, EOT) - 1} and the EOT
    position uniform over 1..L-1 (0..L-1 without SOT), so EOT is the largest id of each row.
    """
    b, s, length = cfg.batch_size, cfg.image_size, cfg.context_length
    images = torch.randn(b, 3, s, s, generator=generator, device=device)
    first = 1 if cfg.sot_id is not None else 0
    tokens = torch.randint(
        1, cfg._max_plain_id() + 1, (b, length), generator=generator, device=device
    )
    eot_pos = torch.randint(first, length, (b, 1), generator=generator, device=device)
    cols = torch.arange(length, device=device).unsqueeze(0)
    tokens = torch.where(cols > eot_pos, torch.zeros_like(tokens), tokens)
    tokens = torch.where(cols == eot_pos, torch.full_like(tokens, cfg.eot_id), tokens)
    if cfg.sot_id is not None:
        tokens[:, 0] = cfg.sot_id
    return images, tokens


def synthetic_batches(
    cfg: SyntheticConfig, dp_rank: int = 0, device: torch.device | str | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Infinite iterator of synthetic batches, deterministic in (cfg.seed, dp_rank).

    Generated directly on ``device`` (a generator on that device), so benchmarks pay no host copy;
    a sequence is reproducible on the same device type.
    """
    gen = torch.Generator(device=device if device is not None else "cpu")
    gen.manual_seed(int(cfg.seed) * 1_000_003 + int(dp_rank))
    while True:
        yield synthetic_batch(cfg, gen, device)
