"""Shared pieces of the chunked global-batch losses: the DP view, validation, chunk ranges."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from megaclip.errors import ConfigError
from megaclip.parallel.collectives import ProcessGroup, gather_rows, group_rank, group_size


@dataclass(frozen=True)
class DPComm:
    """How one DP rank sees its group: index ``rank``, ``size`` ranks, a no-grad row all-gather.

    ``gather(x)`` must return ``cat([x_0, ..., x_{size-1}], dim=0)`` (group-rank order). Built
    from a process group by :meth:`from_group`; benchmarks may pass pre-gathered tensors instead.
    """

    rank: int
    size: int
    gather: Callable[[Tensor], Tensor]

    @classmethod
    def from_group(cls, group: ProcessGroup | None) -> DPComm:
        """The view of ``group`` (None = a single process holding the whole batch)."""
        return cls(group_rank(group), group_size(group), partial(gather_rows, group=group))


def check_chunk_size(chunk_size: int | None) -> None:
    """Raise ConfigError unless ``chunk_size`` is None (one chunk) or a positive int."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ConfigError(
            f"loss chunk_size must be a positive integer (columns per chunk) or None, "
            f"got {chunk_size!r}; set e.g. chunk_size=4096"
        )


def check_features(image: Tensor, text: Tensor, *scalars: Tensor) -> None:
    """Raise ValueError unless image/text are equal [b, d] float tensors, scalars 1-element."""
    if image.dim() != 2 or image.shape != text.shape or image.shape[0] == 0:
        raise ValueError(
            f"image and text features must both be [b, d] with b >= 1, got "
            f"{tuple(image.shape)} and {tuple(text.shape)}"
        )
    if image.dtype != text.dtype or not image.is_floating_point():
        raise ValueError(
            f"image and text features must share one floating dtype, got {image.dtype} "
            f"and {text.dtype}"
        )
    for s in scalars:
        if s.numel() != 1 or not s.is_floating_point():
            raise ValueError(
                f"logit_scale / logit_bias must be floating tensors with one element (shape [1]), "
                f"got shape {tuple(s.shape)} dtype {s.dtype}"
            )


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for logits, log-sum-exp and gradients: float64 stays, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunks(n: int, chunk_size: int | None) -> Iterator[tuple[int, int]]:
    """Yield [start, stop) column ranges of at most ``chunk_size`` covering range(n)."""
    step = n if chunk_size is None else chunk_size
    for start in range(0, n, step):
        yield start, min(n, start + step)


def diagonal_in_chunk(z: Tensor, offset: int, start: int, stop: int) -> tuple[slice, Tensor] | None:
    """(rows a, z[a, offset + a - start]) for the rows whose column offset+a is in [start, stop)."""
    a0 = max(0, start - offset)
    a1 = min(z.shape[0], stop - offset)
    if a0 >= a1:
        return None
    rows = torch.arange(a0, a1, device=z.device)
    return slice(a0, a1), z[rows, rows + (offset - start)]
