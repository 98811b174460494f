"""Exact SigLIP (pairwise sigmoid) loss over the global batch of a DP group, in column chunks.

With x_ij = s * I_i . T_j + beta, s = exp(logit_scale), y_ij = +1 if i == j else -1:

    L = -1/N * sum_{i, j < N} log sigmoid(y_ij * x_ij)

which is the single-process value of open_clip's SigLipLoss over N pairs (and the DP average of
its per-rank values). Rank r computes its b image rows against the N texts in the forward (all
gathered at once, or streamed block by block: see ``mode``); the backward computes its own
features' gradients locally from I_r T^T (rows) and T_r I^T (its text columns), recomputed chunk
by chunk; no gradient is sent anywhere.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from megaclip.loss.common import (
    ChunkWorkspace,
    DPComm,
    acc_dtype,
    check_features,
    check_options,
    chunks,
    column_blocks,
    column_chunks,
    diagonal_in_chunk,
    workspace_width,
)
from megaclip.parallel.collectives import ProcessGroup

DEFAULT_CHUNK_SIZE = 4096


def _pair_loss_chunk(
    ws: ChunkWorkspace,
    scaled_rows: Tensor,
    cols: Tensor,
    bias: Tensor,
    offset: int,
    start: int,
) -> Tensor:
    """sum_{a, j} -log sigmoid(y_aj * x_aj) for this rank's rows a and the columns of one chunk.

    -log sigmoid(-x) = softplus(x) = max(x, 0) + log1p(exp(-|x|)) for every pair, then the
    positives are corrected with -log sigmoid(x) = softplus(x) - x.
    """
    b, c = scaled_rows.shape[0], cols.shape[0]
    x = ws.matmul_t(0, scaled_rows, cols).add_(bias)
    diag = diagonal_in_chunk(x, offset, start, start + c)
    total = -x[diag].sum() if diag is not None else x.new_zeros(())
    tail = torch.abs(x, out=ws.view(1, b, c)).neg_().exp_().log1p_()
    return total + x.clamp_(min=0).add_(tail).sum()


def _grad_chunk(
    ws: ChunkWorkspace,
    grad: Tensor,
    scaled_rows: Tensor,
    cols: Tensor,
    bias: Tensor,
    offset: int,
    start: int,
) -> tuple[Tensor, Tensor]:
    """grad += G @ cols; return (sum G * (x - beta), sum G); G = sigmoid(x) - onehot.

    x = (s * rows) . cols + beta over one chunk of columns (``scaled_rows`` = s * rows); at the
    positives G = -sigmoid(-x) is computed directly (no 1 - 1 cancellation).
    """
    b, c = scaled_rows.shape[0], cols.shape[0]
    logits = ws.matmul_t(0, scaled_rows, cols)
    g = torch.add(logits, bias, out=ws.view(1, b, c)).sigmoid_()
    diag = diagonal_in_chunk(logits, offset, start, start + c)
    if diag is not None:
        g[diag] = -torch.sigmoid(-(logits[diag] + bias))
    ws.add_matmul(grad, g, cols)
    return torch.dot(g.view(-1), logits.view(-1)), g.sum()


class _SigLipLossFn(torch.autograd.Function):
    """L over the global batch (see module docstring); backward: dp * dL/d(own inputs)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        image: Tensor,
        text: Tensor,
        logit_scale: Tensor,
        logit_bias: Tensor,
        comm: DPComm,
        chunk_size: int | None,
        mode: str,
    ) -> Tensor:
        b, d = image.shape
        acc = acc_dtype(image.dtype)
        offset, n = comm.rank * b, comm.size * b
        local = torch.cat([image, text], dim=1).detach()  # [b, 2d]: what the columns are made of
        gathered = comm.gather(local) if mode == "allgather" else None  # [N, 2d]
        scale = logit_scale.detach().reshape(()).to(acc).exp()
        bias = logit_bias.detach().reshape(()).to(acc)
        row_blocks = list(chunks(b, chunk_size))  # rows are blocked too: [chunk, chunk] logits
        width = workspace_width(b, comm.size, chunk_size, mode)
        ws = ChunkWorkspace(min(b, chunk_size or b), width, 2, image.dtype, image.device)
        part = torch.zeros((), dtype=acc, device=image.device)
        image_s = (image.to(acc) * scale).to(image.dtype)
        for start, cols in column_chunks(
            column_blocks(comm, local, gathered, chunk_size), chunk_size
        ):
            for r0, r1 in row_blocks:
                part += _pair_loss_chunk(ws, image_s[r0:r1], cols[:, d:], bias, offset + r0, start)
        total = comm.gather(part.reshape(1)).sum()  # same order on every rank
        ctx.save_for_backward(image, text, logit_scale, logit_bias)
        ctx.local, ctx.gathered, ctx.comm = local, gathered, comm
        ctx.scale, ctx.bias = scale, bias
        ctx.meta = (offset, chunk_size, mode)
        return total / n

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss: Tensor):  # type: ignore[override]
        image, text, logit_scale, logit_bias = ctx.saved_tensors
        offset, chunk_size, mode = ctx.meta
        comm, scale, bias = ctx.comm, ctx.scale, ctx.bias
        b, d = image.shape
        n = comm.size * b
        row_blocks = list(chunks(b, chunk_size))
        width = workspace_width(b, comm.size, chunk_size, mode)
        ws = ChunkWorkspace(min(b, chunk_size or b), width, 2, image.dtype, image.device)
        grad_i = torch.zeros(image.shape, dtype=ws.acc, device=image.device)
        grad_t = torch.zeros(text.shape, dtype=ws.acc, device=text.device)
        g_dot = torch.zeros((), dtype=ws.acc, device=image.device)
        g_sum = torch.zeros((), dtype=ws.acc, device=image.device)
        image_s = (image.to(ws.acc) * scale).to(image.dtype)
        text_s = (text.to(ws.acc) * scale).to(text.dtype)
        # dL/dx_ij = (sigmoid(x_ij) - [i == j]) / N; this rank's image rows give d_image and its
        # logit_scale / logit_bias shares; its text columns (from T_r I^T) give d_text.
        for start, cols in column_chunks(
            column_blocks(comm, ctx.local, ctx.gathered, chunk_size), chunk_size
        ):
            for r0, r1 in row_blocks:
                r, at = slice(r0, r1), offset + r0
                dot, gs = _grad_chunk(ws, grad_i[r], image_s[r], cols[:, d:], bias, at, start)
                g_dot += dot
                g_sum += gs
                _grad_chunk(ws, grad_t[r], text_s[r], cols[:, :d], bias, at, start)
        g = g_loss.to(ws.acc) * comm.size / n  # dp x: docs/loss.md "gradient convention"
        d_image = (g * scale * grad_i).to(image.dtype)
        d_text = (g * scale * grad_t).to(text.dtype)
        d_scale = (g * g_dot).to(logit_scale.dtype).reshape(logit_scale.shape)
        d_bias = (g * g_sum).to(logit_bias.dtype).reshape(logit_bias.shape)
        return d_image, d_text, d_scale, d_bias, None, None, None


def siglip_loss_with_comm(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    comm: DPComm,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    mode: str = "allgather",
) -> Tensor:
    """Global-batch SigLIP loss; ``comm`` supplies this rank's index, DP size and collectives."""
    check_options(chunk_size, mode)
    check_features(image_features, text_features, logit_scale, logit_bias)
    return _SigLipLossFn.apply(
        image_features, text_features, logit_scale, logit_bias, comm, chunk_size, mode
    )


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    *,
    dp_group: ProcessGroup | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
    mode: str = "allgather",
) -> Tensor:
    """-1/N sum_{i,j} log sigmoid(y_ij (exp(logit_scale) I_i.T_j + logit_bias)) over ``dp_group``.

    ``logit_scale`` is the log of the scale (shape [1]), ``logit_bias`` the additive bias (shape
    [1]). ``mode``: "allgather" or "stream", as in :func:`megaclip.loss.clip_loss`. Returns the
    global loss (float32; float64 for float64 inputs), identical on every DP rank; its backward
    yields dp * dL/d(this rank's inputs), so that DP-averaged gradients equal the single-process
    gradients. Extra memory: O(b * chunk_size) plus the features held by ``mode``.
    """
    return siglip_loss_with_comm(
        image_features,
        text_features,
        logit_scale,
        logit_bias,
        DPComm.from_group(dp_group),
        chunk_size,
        mode,
    )


class SigLipLoss(nn.Module):
    """Module form of :func:`siglip_loss` with a fixed chunk size, mode and DP group."""

    def __init__(
        self,
        chunk_size: int | None = DEFAULT_CHUNK_SIZE,
        dp_group: ProcessGroup | None = None,
        mode: str = "allgather",
    ) -> None:
        super().__init__()
        check_options(chunk_size, mode)
        self.chunk_size = chunk_size
        self.dp_group = dp_group
        self.mode = mode

    def forward(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor
    ) -> Tensor:
        """Global-batch SigLIP loss (see :func:`siglip_loss`)."""
        return siglip_loss(
            image_features,
            text_features,
            logit_scale,
            logit_bias,
            dp_group=self.dp_group,
            chunk_size=self.chunk_size,
            mode=self.mode,
        )
