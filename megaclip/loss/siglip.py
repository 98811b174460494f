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
from torch import Tensor
from torch.autograd.function import once_differentiable

from megaclip.config.train import LOSS_CHUNK_SIZE
from megaclip.loss.common import (
    ChunkWorkspace,
    Columns,
    DPComm,
    LossModule,
    LossOptions,
    apply_loss,
    diagonal_in_chunk,
    scaled,
)
from megaclip.parallel.collectives import ProcessGroup


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
    grad_t: Tensor,
    scaled_rows: Tensor,
    cols: Tensor,
    bias: Tensor,
    offset: int,
    start: int,
) -> tuple[Tensor, Tensor]:
    """grad_t += (G @ cols).T; return (sum G * (x - beta), sum G); G = sigmoid(x) - onehot.

    x = (s * rows) . cols + beta over one chunk of columns (``scaled_rows`` = s * rows); at the
    positives G = -sigmoid(-x) is computed directly (no 1 - 1 cancellation).
    """
    b, c = scaled_rows.shape[0], cols.shape[0]
    logits = ws.matmul_t(0, scaled_rows, cols)
    g = torch.add(logits, bias, out=ws.view(1, b, c)).sigmoid_()
    diag = diagonal_in_chunk(logits, offset, start, start + c)
    if diag is not None:
        g[diag] = -torch.sigmoid(-(logits[diag] + bias))
    ws.add_matmul_t(grad_t, g, cols)
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
        opts: LossOptions,
    ) -> Tensor:
        d = image.shape[1]
        c = Columns.setup(image, text, logit_scale, opts)
        bias = logit_bias.detach().reshape(()).to(c.acc)
        ws = c.workspace(2, image.dtype, image.device)
        part = torch.zeros((), dtype=c.acc, device=image.device)
        image_s = scaled(image, c.scale)
        for start, cols, r0, r1 in c.blocks():
            part += _pair_loss_chunk(ws, image_s[r0:r1], cols[:, d:], bias, c.offset + r0, start)
        total = c.comm.gather(part.reshape(1)).sum()  # same order on every rank
        ctx.save_for_backward(image, text, logit_scale, logit_bias)
        ctx.columns, ctx.bias = c, bias
        return total / c.n

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss: Tensor):  # type: ignore[override]
        image, text, logit_scale, logit_bias = ctx.saved_tensors
        c, bias = ctx.columns, ctx.bias
        offset, n, scale = c.offset, c.n, c.scale
        d = image.shape[1]
        ws = c.workspace(2, image.dtype, image.device)
        grad_i = torch.zeros((d, image.shape[0]), dtype=ws.acc, device=image.device)  # [d, b]
        grad_t = torch.zeros((d, text.shape[0]), dtype=ws.acc, device=text.device)
        g_dot = torch.zeros((), dtype=ws.acc, device=image.device)
        g_sum = torch.zeros((), dtype=ws.acc, device=image.device)
        image_s, text_s = scaled(image, scale), scaled(text, scale)
        # dL/dx_ij = (sigmoid(x_ij) - [i == j]) / N; this rank's image rows give d_image and its
        # logit_scale / logit_bias shares; its text columns (from T_r I^T) give d_text.
        for start, cols, r0, r1 in c.blocks():
            r, at = slice(r0, r1), offset + r0
            dot, gs = _grad_chunk(ws, grad_i[:, r], image_s[r], cols[:, d:], bias, at, start)
            g_dot += dot
            g_sum += gs
            _grad_chunk(ws, grad_t[:, r], text_s[r], cols[:, :d], bias, at, start)
        g = g_loss.to(ws.acc) * c.comm.size / n  # dp x: docs/loss.md "gradient convention"
        d_image = (g * scale * grad_i.T).to(image.dtype).contiguous()
        d_text = (g * scale * grad_t.T).to(text.dtype).contiguous()
        d_scale = (g * g_dot).to(logit_scale.dtype).reshape(logit_scale.shape)
        d_bias = (g * g_sum).to(logit_bias.dtype).reshape(logit_bias.shape)
        return d_image, d_text, d_scale, d_bias, None


def siglip_loss_with_comm(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    comm: DPComm,
    chunk_size: int | None = LOSS_CHUNK_SIZE,
    mode: str = "allgather",
) -> Tensor:
    """Global-batch SigLIP loss; ``comm`` supplies this rank's index, DP size and collectives."""
    features = (image_features, text_features, logit_scale, logit_bias)
    return apply_loss(_SigLipLossFn, features, comm, chunk_size, mode)


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    *,
    dp_group: ProcessGroup | None = None,
    chunk_size: int | None = LOSS_CHUNK_SIZE,
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


class SigLipLoss(LossModule):
    """Module form of :func:`siglip_loss` with a fixed chunk size, mode and DP group."""

    def forward(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor, logit_bias: Tensor
    ) -> Tensor:
        """Global-batch SigLIP loss (see :func:`siglip_loss`)."""
        return siglip_loss(image_features, text_features, logit_scale, logit_bias, **self.options)
