"""Exact symmetric InfoNCE (CLIP) loss over the global batch of a DP group, in column chunks.

Rank r of a DP group of size ``dp`` holds b image and b text features (rows r*b .. r*b+b-1 of the
global batch of N = b * dp). The loss equals the single-process CLIP loss over all N pairs:

    L = 1/(2N) * sum_i [ CE(s * I_i . T_*, i) + CE(s * T_i . I_*, i) ],   s = exp(logit_scale)

Forward: gather all N features (no grad), compute this rank's b rows against the N columns chunk by
chunk with an online log-sum-exp, all-gather the per-row log-sum-exps and partial sums.
Backward (no communication): the gradient for this rank's features is computed here, by this rank,
from the same two b x N matrices I_r T^T and T_r I^T (recomputed per chunk): row softmaxes for its
own rows and column softmaxes (using the gathered log-sum-exps of all N rows) for its own columns.
See docs/loss.md for the math and the gradient convention.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
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


class ClipLossOutput(NamedTuple):
    """Global loss (same value on every DP rank) and global top-1 retrieval accuracies (no grad)."""

    loss: Tensor
    i2t_top1: Tensor
    t2i_top1: Tensor


def _scaled_logits(
    rows: Tensor, cols: Tensor, scale: Tensor, pos: Tensor, offset: int, start: int, acc
) -> Tensor:
    """s * rows @ cols.T in ``acc`` dtype, positive entries replaced by the canonical ``pos``.

    Both directions and both passes then see bit-identical positive logits, so softmax - onehot
    at the positives does not suffer from two GEMMs rounding I_a.T_a differently.
    """
    logits = (rows @ cols.T).to(acc).mul_(scale)
    diag = diagonal_in_chunk(logits, offset, start, start + cols.shape[0])
    if diag is not None:
        rng = torch.arange(diag[0].start, diag[0].stop, device=rows.device)
        logits[rng, rng + (offset - start)] = pos[diag[0]]
    return logits


def _row_ce(
    rows: Tensor,
    cols: Tensor,
    scale: Tensor,
    pos: Tensor,
    offset: int,
    chunk_size: int | None,
    acc: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Per own row a: CE_a = logsumexp_j(s rows_a.cols_j) - pos_a (online, by chunks); top-1 hits.

    Returned as (max - pos) + log(sum exp(logit - max)), exact to rounding of small numbers even at
    scale 100.
    """
    b = rows.shape[0]
    run_max = torch.full((b,), float("-inf"), dtype=acc, device=rows.device)
    run_sum = torch.zeros((b,), dtype=acc, device=rows.device)  # sum_j exp(logit_j - run_max)
    arg = torch.zeros((b,), dtype=torch.long, device=rows.device)
    for start, stop in chunks(cols.shape[0], chunk_size):
        logits = _scaled_logits(rows, cols[start:stop], scale, pos, offset, start, acc)  # b x c
        m, idx = logits.max(dim=1)
        arg = torch.where(m > run_max, idx + start, arg)
        new_max = torch.maximum(run_max, m)
        chunk_sum = logits.sub_(new_max[:, None]).exp_().sum(dim=1)
        run_sum = run_sum * torch.exp(run_max - new_max) + chunk_sum
        run_max = new_max
    hits = (arg == torch.arange(offset, offset + b, device=rows.device)).sum()
    return (run_max - pos) + run_sum.log(), hits


def _grad_rows_and_cols(
    rows: Tensor,
    cols: Tensor,
    scale: Tensor,
    pos_all: Tensor,
    ce_rows: Tensor,
    ce_cols: Tensor,
    offset: int,
    chunk_size: int | None,
    acc: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """(sum_j G[a, j] cols_j, sum_aj P[a, j] (logit_aj - pos_a)) with G = P + Q - 2 onehot.

    logit[a, j] = s rows_a . cols_j; P = exp(logit - pos_a - ce_rows[a]) is this rank's rows of one
    direction's softmax; Q = exp(logit - pos_j - ce_cols[j]) is column a of the other direction's
    softmax (its rows j are the N gathered rows, ce_cols their gathered cross-entropies).
    """
    b = rows.shape[0]
    pos = pos_all[offset : offset + b]
    grad = torch.zeros(rows.shape, dtype=acc, device=rows.device)
    p_dot = torch.zeros((), dtype=acc, device=rows.device)
    for start, stop in chunks(cols.shape[0], chunk_size):
        cols_c = cols[start:stop]
        logits = _scaled_logits(rows, cols_c, scale, pos, offset, start, acc)
        g = (logits - pos_all[None, start:stop]).sub_(ce_cols[None, start:stop]).exp_()  # Q
        logits.sub_(pos[:, None])
        p = (logits - ce_rows[:, None]).exp_()
        p_dot += torch.dot(p.view(-1), logits.view(-1))
        del logits
        g.add_(p)
        del p
        diag = diagonal_in_chunk(g, offset, start, stop)
        if diag is not None:  # P_aa + Q_aa - 2 without cancellation: expm1 of -CE
            rng = torch.arange(diag[0].start, diag[0].stop, device=rows.device)
            own = rng + offset
            g[rng, own - start] = torch.expm1(-ce_rows[rng]) + torch.expm1(-ce_cols[own])
        if rows.dtype == acc:
            grad.addmm_(g, cols_c)
        else:
            grad += (g.to(rows.dtype) @ cols_c).to(acc)
    return grad, p_dot


class _ClipLossFn(torch.autograd.Function):
    """L over the global batch (see module docstring); backward: dp * dL/d(own inputs)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        image: Tensor,
        text: Tensor,
        logit_scale: Tensor,
        comm: DPComm,
        chunk_size: int | None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        b, d = image.shape
        acc = acc_dtype(image.dtype)
        offset, n = comm.rank * b, comm.size * b
        feats = comm.gather(torch.cat([image, text], dim=1))  # [N, 2d], input dtype
        img_all, txt_all = feats[:, :d], feats[:, d:]
        scale = logit_scale.detach().reshape(()).to(acc).exp()
        pos = (image.to(acc) * text.to(acc)).sum(dim=1).mul_(scale)  # canonical positive logits
        ce_i2t, hit_i2t = _row_ce(image, txt_all, scale, pos, offset, chunk_size, acc)
        ce_t2i, hit_t2i = _row_ce(text, img_all, scale, pos, offset, chunk_size, acc)
        part = ce_i2t.sum() + ce_t2i.sum()
        packed = torch.cat(
            [pos, ce_i2t, ce_t2i, torch.stack([part, hit_i2t.to(acc), hit_t2i.to(acc)])]
        )
        stats = comm.gather(packed).view(comm.size, 3 * b + 3)
        totals = stats[:, 3 * b :].sum(dim=0)  # same order on every rank: bit-identical result
        ctx.save_for_backward(image, text, logit_scale)
        ctx.feats = feats
        ctx.scale = scale
        ctx.per_row = [stats[:, k * b : (k + 1) * b].reshape(n) for k in range(3)]
        ctx.meta = (comm.size, offset, chunk_size, acc)
        loss, i2t, t2i = totals[0] / (2 * n), totals[1] / n, totals[2] / n
        ctx.mark_non_differentiable(i2t, t2i)
        return loss, i2t, t2i

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss: Tensor, _g_i2t: Tensor, _g_t2i: Tensor):  # type: ignore[override]
        image, text, logit_scale = ctx.saved_tensors
        dp, offset, chunk_size, acc = ctx.meta
        b, d = image.shape
        n = dp * b
        img_all, txt_all = ctx.feats[:, :d], ctx.feats[:, d:]
        pos_all, ce_i2t, ce_t2i = ctx.per_row
        own = slice(offset, offset + b)
        # I_r T^T: rows = this rank's i2t rows; column a = the t2i softmax's column of image a.
        gi, dot_i = _grad_rows_and_cols(
            image, txt_all, ctx.scale, pos_all, ce_i2t[own], ce_t2i, offset, chunk_size, acc
        )
        # T_r I^T: rows = this rank's t2i rows; column a = the i2t softmax's column of text a.
        gt, dot_t = _grad_rows_and_cols(
            text, img_all, ctx.scale, pos_all, ce_t2i[own], ce_i2t, offset, chunk_size, acc
        )
        g = g_loss.to(acc) * dp / (2 * n)  # dp x: see docs/loss.md, "gradient convention"
        d_image = (g * ctx.scale * gi).to(image.dtype)
        d_text = (g * ctx.scale * gt).to(text.dtype)
        d_scale = (g * (dot_i + dot_t)).to(logit_scale.dtype).reshape(logit_scale.shape)
        return d_image, d_text, d_scale, None, None


def clip_loss_with_comm(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    comm: DPComm,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> ClipLossOutput:
    """Global-batch CLIP loss; ``comm`` supplies this rank's index, the DP size and the gather."""
    check_chunk_size(chunk_size)
    check_features(image_features, text_features, logit_scale)
    loss, i2t, t2i = _ClipLossFn.apply(image_features, text_features, logit_scale, comm, chunk_size)
    return ClipLossOutput(loss, i2t.detach(), t2i.detach())


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    *,
    dp_group: ProcessGroup | None = None,
    chunk_size: int | None = DEFAULT_CHUNK_SIZE,
) -> ClipLossOutput:
    """Symmetric InfoNCE over the N = b * dp pairs of ``dp_group``, scale exp(logit_scale).

    ``image_features``/``text_features``: this rank's [b, d] L2-normalised features (every rank the
    same b). ``logit_scale``: the model's shape-[1] parameter holding log(scale) (open_clip's
    ``model.logit_scale``, not its exp). ``dp_group``: the data-parallel group only (never WORLD
    under TP/PP); None = single process. Returns the global mean loss (float32, float64 for float64
    inputs), identical on every rank; its backward yields dp * dL/d(this rank's inputs), so that
    averaging gradients over the DP ranks (DDP/DeepSpeed) gives exactly the single-process gradient.
    Extra memory: O(b * chunk_size) plus the gathered N x 2d features.
    """
    return clip_loss_with_comm(
        image_features, text_features, logit_scale, DPComm.from_group(dp_group), chunk_size
    )


class ContrastiveLoss(nn.Module):
    """Module form of :func:`clip_loss` with a fixed chunk size and DP group."""

    def __init__(
        self, chunk_size: int | None = DEFAULT_CHUNK_SIZE, dp_group: ProcessGroup | None = None
    ) -> None:
        super().__init__()
        check_chunk_size(chunk_size)
        self.chunk_size = chunk_size
        self.dp_group = dp_group

    def forward(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor
    ) -> ClipLossOutput:
        """Global-batch CLIP loss and top-1 accuracies (see :func:`clip_loss`)."""
        return clip_loss(
            image_features,
            text_features,
            logit_scale,
            dp_group=self.dp_group,
            chunk_size=self.chunk_size,
        )
