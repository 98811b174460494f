"""Exact SigLIP (pairwise sigmoid) loss over the global batch of a DP group, in column chunks.

With x_ij = s * I_i . T_j + beta, s = exp(logit_scale), y_ij = +1 if i == j else -1:

    L = -1/N * sum_{i, j < N} log sigmoid(y_ij * x_ij)

which is the single-process value of open_clip's SigLipLoss over N pairs (and the DP average of
its per-rank values). Rank r computes its b image rows against the N gathered texts in the forward;
the backward computes its own features' gradients locally from I_r T^T (rows) and T_r I^T (its text
columns), recomputed chunk by chunk; no communication in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from megaclip.loss.common import (
    DPComm,
    acc_dtype,
    check_chunk_size,
    check_features,
    chunks,
    diagonal_in_chunk,
)
from megaclip.parallel.collectives import ProcessGroup

DEFAULT_CHUNK_SIZE = 4096


def _pair_loss_sum(
    rows: Tensor,
    cols: Tensor,
    scale: Tensor,
    bias: Tensor,
    offset: int,
    chunk_size: int | None,
    acc: torch.dtype,
) -> Tensor:
    """sum_{a, j} -log sigmoid(y_aj * x_aj) for this rank's rows a against all columns j."""
    total = torch.zeros((), dtype=acc, device=rows.device)
    for start, stop in chunks(cols.shape[0], chunk_size):
        x = (rows @ cols[start:stop].T).to(acc).mul_(scale).add_(bias)
        diag = diagonal_in_chunk(x, offset, start, stop)
        if diag is not None:  # -log sigmoid(x) = -log sigmoid(-x) - x
            total -= diag[1].sum()
        total -= F.logsigmoid(x.neg_()).sum()
    return total


def _grad_side(
    rows: Tensor,
    cols: Tensor,
    scale: Tensor,
    bias: Tensor,
    offset: int,
    chunk_size: int | None,
    acc: torch.dtype,
) -> tuple[Tensor, Tensor, Tensor]:
    """(sum_j G_aj cols_j, sum G * (x - beta), sum G); G = sigmoid(x) - onehot, x = s r.c + beta.

    At the positives G = -sigmoid(-x), computed directly (no 1 - 1 cancellation).
    """
    grad = torch.zeros(rows.shape, dtype=acc, device=rows.device)
    g_dot = torch.zeros((), dtype=acc, device=rows.device)
    g_sum = torch.zeros((), dtype=acc, device=rows.device)
    for start, stop in chunks(cols.shape[0], chunk_size):
        cols_c = cols[start:stop]
        logits = (rows @ cols_c.T).to(acc).mul_(scale)
        g = torch.sigmoid(logits + bias)
        diag = diagonal_in_chunk(logits, offset, start, stop)
        if diag is not None:
            rng = torch.arange(diag[0].start, diag[0].stop, device=rows.device)
            g[rng, rng + (offset - start)] = -torch.sigmoid(-(diag[1] + bias))
        g_dot += torch.dot(g.view(-1), logits.view(-1))
        g_sum += g.sum()
        del logits
        if rows.dtype == acc:
            grad.addmm_(g, cols_c)
        else:
            grad += (g.to(rows.dtype) @ cols_c).to(acc)
    return grad, g_dot, g_sum


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
    ) -> Tensor:
        b, d = image.shape
        acc = acc_dtype(image.dtype)
        offset, n = comm.rank * b, comm.size * b
        feats = comm.gather(torch.cat([image, text], dim=1))  # [N, 2d], input dtype
        scale = logit_scale.detach().reshape(()).to(acc).exp()
        bias = logit_bias.detach().reshape(()).to(acc)
        part = _pair_loss_sum(image, feats[:, d:], scale, bias, offset, chunk_size, acc)
        total = comm.gather(part.reshape(1)).sum()  # same order on every rank
        ctx.save_for_backward(image, text, logit_scale, logit_bias)
        ctx.feats = feats
        ctx.scale, ctx.bias = scale, bias
        ctx.meta = (comm.size, offset, chunk_size, acc)
        return total / n

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss: Tensor):  # type: ignore[override]
        image, text, logit_scale, logit_bias = ctx.saved_tensors
        dp, offset, chunk_size, acc = ctx.meta
        b, d = image.shape
        n = dp * b
        img_all, txt_all = ctx.feats[:, :d], ctx.feats[:, d:]
        scale, bias = ctx.scale, ctx.bias
        # dL/dx_ij = (sigmoid(x_ij) - [i == j]) / N; rows of this rank give d_image and its
        # logit_scale / logit_bias shares; its text columns (from T_r I^T) give d_text.
        gi, g_dot, g_sum = _grad_side(image, txt_all, scale, bias, offset, chunk_size, acc)
        gt, _, _ = _grad_side(text, img_all, scale, bias, offset, chunk_size, acc)
        g = g_loss.to(acc) * dp / n  # dp x: see docs/loss.md, "gradient convention"
        d_image = (g * scale * gi).to(image.dtype)
        d_text = (g * scale * gt).to(text.dtype)
        d_scale = (g * g_dot).to(logit_scale.dtype).reshape(logit_scale.shape)
        d_bias = (g * g_sum).to(logit_bias.dtype).reshape(logit_bias.shape)
        return d_image, d_text, d_scale, d_bias, None, None


def siglip_loss_with_comm(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    comm: DPComm,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Global-batch SigLIP loss where ``comm`` supplies this rank's index, DP size and gather."""
    check_chunk_size(chunk_size)
    check_features(image_features, text_features, logit_scale, logit_bias)
    return _SigLipLossFn.apply(
        image_features, text_features, logit_scale, logit_bias, comm, chunk_size
    )


def siglip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    logit_bias: Tensor,
    *,
    dp_group: ProcessGroup | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """-1/N sum_{i,j} log sigmoid(y_ij (exp(logit_scale) I_i.T_j + logit_bias)) over ``dp_group``.

    ``logit_scale`` is the log of the scale (shape [1]), ``logit_bias`` the additive bias (shape
    [1]). Returns the global loss (float32, float64 for float64 inputs), identical on every DP
    rank; its backward yields dp * dL/d(this rank's inputs), so that DP-averaged gradients equal the
    single-process gradients. Extra memory: O(b * chunk_size) plus the gathered N x 2d features.
    """
    return siglip_loss_with_comm(
        image_features,
        text_features,
        logit_scale,
        logit_bias,
        DPComm.from_group(dp_group),
        chunk_size,
    )


class SigLipLoss(nn.Module):
    """Module form of :func:`siglip_loss` with a fixed chunk size and DP group."""

    def __init__(
        self, chunk_size: int | None = DEFAULT_CHUNK_SIZE, dp_group: ProcessGroup | None = None
    ) -> None:
        super().__init__()
        check_chunk_size(chunk_size)
        self.chunk_size = chunk_size
        self.dp_group = dp_group

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
        )
