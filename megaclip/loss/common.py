"""Shared pieces of the chunked global-batch losses: the DP view, column blocks, workspaces."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from megaclip.config.train import LOSS_CHUNK_SIZE
from megaclip.errors import ConfigError
from megaclip.parallel.collectives import (
    ProcessGroup,
    gather_rows,
    group_rank,
    group_size,
    stream_rows,
)

MODES = ("allgather", "stream")


@dataclass(frozen=True)
class DPComm:
    """How one DP rank sees its group: its index, the size, and two no-grad row collectives.

    ``gather(x)`` returns ``cat([x_0, ..., x_{size-1}], dim=0)`` (group-rank order);
    ``stream(x, k)`` yields ``(j, cat([x_j, ..., x_{j+k-1}]))`` for j = 0, k, 2k, ... Built from
    a process group by :meth:`from_group`; benchmarks pass stand-ins over pre-gathered tensors.
    """

    rank: int
    size: int
    gather: Callable[[Tensor], Tensor]
    stream: Callable[[Tensor, int], Iterator[tuple[int, Tensor]]]

    @classmethod
    def from_group(cls, group: ProcessGroup | None) -> DPComm:
        """The view of ``group`` (None = a single process holding the whole batch)."""
        return cls(
            group_rank(group),
            group_size(group),
            partial(gather_rows, group=group),
            lambda x, per_step: stream_rows(x, group, per_step),
        )


def check_options(chunk_size: int | None, mode: str) -> None:
    """Raise ConfigError unless chunk_size is None or a positive int and mode is in MODES."""
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ConfigError(
            f"loss chunk_size must be a positive integer (columns per chunk) or None, "
            f"got {chunk_size!r}; set e.g. chunk_size={LOSS_CHUNK_SIZE}"
        )
    if mode not in MODES:
        raise ConfigError(f"loss mode must be one of {MODES}, got {mode!r}")


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
    """Yield [start, stop) ranges of at most ``chunk_size`` covering range(n)."""
    step = n if chunk_size is None else chunk_size
    for start in range(0, n, step):
        yield start, min(n, start + step)


def blocks_per_step(b: int, dp: int, chunk_size: int | None) -> int:
    """Owner blocks of b rows streamed per step: enough to fill one chunk (1 when b >= chunk)."""
    return dp if chunk_size is None else max(1, min(dp, chunk_size // b))


def column_blocks(
    comm: DPComm, local: Tensor, gathered: Tensor | None, chunk_size: int | None
) -> Iterator[tuple[int, Tensor]]:
    """(first global column, block of rows) covering all N columns of the group.

    ``gathered`` (allgather mode) is one block of N rows; otherwise the owners' blocks of
    ``local.shape[0]`` rows are streamed ``blocks_per_step`` at a time (stream mode), so that
    small b still gives chunk-sized GEMMs while at most about 2 x chunk rows are held.
    """
    if gathered is not None:
        yield 0, gathered
        return
    b = local.shape[0]
    for j, block in comm.stream(local, blocks_per_step(b, comm.size, chunk_size)):
        yield j * b, block


def column_chunks(
    blocks: Iterable[tuple[int, Tensor]], chunk_size: int | None
) -> Iterator[tuple[int, Tensor]]:
    """(first global column, rows) chunks of at most ``chunk_size`` rows of every block."""
    for first, block in blocks:
        for start, stop in chunks(block.shape[0], chunk_size):
            yield first + start, block[start:stop]


def diagonal_in_chunk(
    z: Tensor, offset: int, start: int, stop: int
) -> tuple[Tensor, Tensor] | None:
    """(rows a, column indices offset + a - start) of the positives inside columns [start, stop)."""
    a0 = max(0, start - offset)
    a1 = min(z.shape[0], stop - offset)
    if a0 >= a1:
        return None
    rows = torch.arange(a0, a1, device=z.device)
    return rows, rows + (offset - start)


class ChunkWorkspace:
    """Reusable [b, chunk] buffers: the chunk loops then allocate nothing large per chunk.

    ``k`` accumulation-dtype buffers plus, for low-precision inputs, one buffer of the input dtype
    for the GEMMs (logits are computed in the input dtype, then widened).
    """

    def __init__(self, rows: int, chunk: int, k: int, dtype: torch.dtype, device) -> None:
        self.acc = acc_dtype(dtype)
        self.bufs = [torch.empty(rows * chunk, dtype=self.acc, device=device) for _ in range(k)]
        self.low = None
        if dtype != self.acc:
            self.low = torch.empty(rows * chunk, dtype=dtype, device=device)

    def view(self, k: int, rows: int, cols: int) -> Tensor:
        """Buffer ``k`` as a contiguous [rows, cols] tensor."""
        return self.bufs[k][: rows * cols].view(rows, cols)

    def matmul_t(self, k: int, a: Tensor, b: Tensor) -> Tensor:
        """a @ b.T into buffer ``k`` (accumulation dtype)."""
        out = self.view(k, a.shape[0], b.shape[0])
        if self.low is None:
            return torch.mm(a, b.T, out=out)
        low = self.low[: out.numel()].view(out.shape)
        torch.mm(a, b.T, out=low)
        return out.copy_(low)

    def add_matmul_t(self, acc_t: Tensor, g: Tensor, cols: Tensor) -> None:
        """acc_t += (g @ cols).T, as cols.T @ g.T (g cast to the dtype of ``cols`` for the GEMM).

        The accumulator is kept transposed ([d, rows]): for a small d, BLAS runs the product with
        the long chunk dimension inside about 3x faster than g @ cols into [rows, d].
        """
        if self.low is None:
            acc_t.addmm_(cols.T, g.T)
            return
        low = self.low[: g.numel()].view(g.shape).copy_(g)
        acc_t += (cols.T @ low.T).to(acc_t.dtype)


def workspace_width(b: int, dp: int, chunk_size: int | None, mode: str) -> int:
    """Columns per chunk: at most chunk_size and at most one block (N or the streamed rows)."""
    block = b * (dp if mode == "allgather" else blocks_per_step(b, dp, chunk_size))
    return block if chunk_size is None else min(block, chunk_size)


CPU_TILE = 2**18  # elements of one row block x column chunk on a CPU: 1 MiB in float32, its L2


def tile_rows(b: int, width: int, chunk_size: int | None, device_type: str) -> int:
    """Rows per block of the logits: at most chunk_size; on a CPU also at most CPU_TILE / width.

    On a CPU the loss is bound by the elementwise passes over each [rows, width] tile, which run
    several times faster while the tile stays in the core's cache; an accelerator wants large
    tiles (few kernel launches), so there the row block is the chunk.
    """
    rows = b if chunk_size is None else min(b, chunk_size)
    if device_type == "cpu":
        rows = min(rows, max(1, CPU_TILE // width))
    return rows


@dataclass(frozen=True)
class LossOptions:
    """How a loss runs over the DP group: the group's view, columns per chunk, mode."""

    comm: DPComm
    chunk_size: int | None
    mode: str


@dataclass
class Columns:
    """What a loss's forward sets up: this rank's rows and the N columns they meet.

    ``local``: this rank's ``[image | text]`` rows, detached ([b, 2d]); ``gathered``: all N of
    them (allgather mode) or None (stream mode: the owners' blocks are streamed per pass);
    ``scale``: exp(logit_scale) in the accumulation dtype ``acc``; ``offset``: the global index
    of this rank's first row.
    """

    comm: DPComm
    local: Tensor
    gathered: Tensor | None
    scale: Tensor
    acc: torch.dtype
    offset: int
    n: int
    chunk_size: int | None
    mode: str

    @classmethod
    def setup(cls, image: Tensor, text: Tensor, logit_scale: Tensor, opts: LossOptions) -> Columns:
        """Concatenate (and in allgather mode gather) the rows; exp of the detached scale."""
        comm, chunk_size, mode = opts.comm, opts.chunk_size, opts.mode
        b = image.shape[0]
        acc = acc_dtype(image.dtype)
        local = torch.cat([image, text], dim=1).detach()  # [b, 2d]: what the columns are made of
        gathered = comm.gather(local) if mode == "allgather" else None  # [N, 2d]
        scale = logit_scale.detach().reshape(()).to(acc).exp()
        return cls(
            comm, local, gathered, scale, acc, comm.rank * b, comm.size * b, chunk_size, mode
        )

    @property
    def width(self) -> int:
        """Columns per chunk (see :func:`workspace_width`)."""
        return workspace_width(self.local.shape[0], self.comm.size, self.chunk_size, self.mode)

    @property
    def rows_per_block(self) -> int:
        """Rows per block of the logits (see :func:`tile_rows`)."""
        b = self.local.shape[0]
        return tile_rows(b, self.width, self.chunk_size, self.local.device.type)

    def blocks(self) -> Iterator[tuple[int, Tensor, int, int]]:
        """(first global column, column chunk, r0, r1) for every row block of every chunk.

        The logits are blocked in rows as well as columns, so no buffer is b x N or b x chunk
        however large b is; the columns are streamed (or sliced) once per pass.
        """
        rows = list(chunks(self.local.shape[0], self.rows_per_block))
        blocks = column_blocks(self.comm, self.local, self.gathered, self.chunk_size)
        for start, cols in column_chunks(blocks, self.chunk_size):
            for r0, r1 in rows:
                yield start, cols, r0, r1

    def workspace(self, k: int, dtype: torch.dtype, device) -> ChunkWorkspace:
        """A workspace of ``k`` buffers: one row block by one column chunk of this mode."""
        return ChunkWorkspace(self.rows_per_block, self.width, k, dtype, device)


def apply_loss(
    fn: type[torch.autograd.Function],
    features: tuple[Tensor, ...],
    comm: DPComm,
    chunk_size: int | None,
    mode: str,
) -> Any:
    """``fn.apply(*features, LossOptions(...))`` after checking the options and the features
    (image, text, then the shape-[1] scalars: logit_scale, logit_bias)."""
    check_options(chunk_size, mode)
    check_features(*features)
    return fn.apply(*features, LossOptions(comm, chunk_size, mode))


def scaled(rows: Tensor, scale: Tensor) -> Tensor:
    """s * rows, computed in the accumulation dtype and stored in the dtype of ``rows``."""
    return (rows.to(scale.dtype) * scale).to(rows.dtype)


class LossModule(nn.Module):
    """Module form of a global-batch loss: a fixed chunk size, mode and DP group."""

    def __init__(
        self,
        chunk_size: int | None = LOSS_CHUNK_SIZE,
        dp_group: ProcessGroup | None = None,
        mode: str = "allgather",
    ) -> None:
        super().__init__()
        check_options(chunk_size, mode)
        self.chunk_size = chunk_size
        self.dp_group = dp_group
        self.mode = mode

    @property
    def options(self) -> dict:
        """The keyword arguments of the functional loss: dp_group, chunk_size, mode."""
        return {"dp_group": self.dp_group, "chunk_size": self.chunk_size, "mode": self.mode}
