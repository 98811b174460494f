"""Pure shape and partition math for tensor parallelism (no process groups involved)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from megaclip.errors import ConfigError


def divide(numerator: int, denominator: int, what: str) -> int:
    """numerator / denominator, or a ConfigError naming ``what`` when it does not divide."""
    if denominator <= 0 or numerator % denominator:
        raise ConfigError(f"{what}: {numerator} is not divisible by {denominator}")
    return numerator // denominator


def shard(full: torch.Tensor, dim: int, stride: int, rank: int, size: int) -> torch.Tensor:
    """Rank ``rank``'s slice of ``full`` along ``dim``: ``stride`` interleaved blocks (q;k;v -> 3).

    ``full`` is cut into ``stride * size`` equal chunks; rank r keeps chunks r, r+size, ... (the
    megatron-core convention), so a stacked [q; k; v] weight gives each rank [q_r; k_r; v_r].
    """
    if size == 1:
        return full
    n = full.shape[dim]
    chunk = divide(n, stride * size, f"dimension {dim} of a tensor of shape {tuple(full.shape)}")
    pieces = torch.split(full, chunk, dim=dim)
    return torch.cat(pieces[rank::size], dim=dim).contiguous()


def unshard(parts: Sequence[torch.Tensor], dim: int, stride: int) -> torch.Tensor:
    """Inverse of :func:`shard`: the full tensor from every rank's slice, in rank order."""
    size = len(parts)
    if size == 1:
        return parts[0]
    per_rank = [torch.chunk(p, stride, dim=dim) for p in parts]
    return torch.cat([per_rank[r][s] for s in range(stride) for r in range(size)], dim=dim)


def full_shape(local: Sequence[int], dim: int | None, size: int) -> tuple[int, ...]:
    """Shape of the unsharded tensor given a local shard's shape and its partition dim."""
    shape = list(local)
    if dim is not None and size > 1:
        shape[dim] *= size
    return tuple(shape)


def shard_row_runs(
    rows: tuple[int, int], full_rows: int, stride: int, rank: int, size: int
) -> list[tuple[int, int, int]]:
    """(local row, full row, count) runs of local rows [j0, j1) of a dim-0 :func:`shard`.

    Rank r's shard holds the full tensor's row chunks r, r + size, ... (``stride`` of them, each
    ``full_rows / (stride * size)`` rows long); this maps a range of its rows back to full rows.
    """
    j0, j1 = rows
    if size == 1:
        return [(j0, j0, j1 - j0)] if j1 > j0 else []
    chunk = divide(full_rows, stride * size, f"a dimension of {full_rows} rows")
    runs, j = [], j0
    while j < j1:
        piece, offset = divmod(j, chunk)
        n = min(chunk - offset, j1 - j)
        runs.append((j, (piece * size + rank) * chunk + offset, n))
        j += n
    return runs
