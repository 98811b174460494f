"""Exact symmetric InfoNCE (CLIP) loss over the global batch of a DP group, in column chunks.

Rank r of a DP group of size ``dp`` holds b image and b text features (rows r*b .. r*b+b-1 of the
global batch of N = b * dp). The loss equals the single-process CLIP loss over all N pairs:

    L = 1/(2N) * sum_i [ CE(s * I_i . T_*, i) + CE(s * T_i . I_*, i) ],   s = exp(logit_scale)

Forward: this rank's b image rows against the N texts and its b text rows against the N images,
chunk by chunk with an online log-sum-exp; then one all-gather of the per-row cross-entropies and
positive logits (3N numbers). The N columns come either from one all-gather of the features
(mode "allgather": N x 2d held until backward) or streamed one owner block at a time (mode
"stream": O(b x 2d) held, the blocks are broadcast again in backward).
Backward: the gradient of this rank's own features is computed here, from the same two b x N
matrices I_r T^T and T_r I^T (recomputed chunk by chunk): row softmaxes for its own rows plus
column softmaxes (from the gathered per-row cross-entropies of all N rows) for its own columns.
No feature gradient is sent anywhere. See docs/loss.md for the math and gradient convention.
"""

from __future__ import annotations

from typing import NamedTuple

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


class ClipLossOutput(NamedTuple):
    """Global loss (same value on every DP rank) and global top-1 retrieval accuracies (no grad)."""

    loss: Tensor
    i2t_top1: Tensor
    t2i_top1: Tensor


def _scaled_logits(
    ws: ChunkWorkspace, scaled_rows: Tensor, cols: Tensor, pos: Tensor, offset: int, start: int
) -> Tensor:
    """(s * rows) @ cols.T in workspace buffer 0, positive entries set to the canonical ``pos``.

    Both directions and both passes then see bit-identical positive logits, so softmax - onehot
    at the positives does not suffer from two GEMMs rounding I_a.T_a differently.
    """
    logits = ws.matmul_t(0, scaled_rows, cols)
    diag = diagonal_in_chunk(logits, offset, start, start + cols.shape[0])
    if diag is not None:
        logits[diag] = pos[diag[0]]
    return logits


class _OnlineCE:
    """Running max and sum of exp(logit - max) of b rows, fed one column chunk at a time."""

    def __init__(self, b: int, dtype: torch.dtype, device) -> None:
        self.max = torch.full((b,), float("-inf"), dtype=dtype, device=device)
        self.sum = torch.zeros((b,), dtype=dtype, device=device)

    def update(self, logits: Tensor, r0: int = 0) -> None:
        """Fold in one chunk of columns of rows [r0, r0 + len(logits)); overwrites logits."""
        rows = slice(r0, r0 + logits.shape[0])
        old_max = self.max[rows]
        new_max = torch.maximum(old_max, logits.amax(dim=1))
        chunk_sum = logits.sub_(new_max[:, None]).exp_().sum(dim=1)
        self.sum[rows] = self.sum[rows] * torch.exp(old_max - new_max) + chunk_sum
        self.max[rows] = new_max

    def result(self, pos: Tensor) -> tuple[Tensor, Tensor]:
        """(CE_a = logsumexp_a - pos_a as (max - pos) + log(sum), number of top-1 hits).

        A row is a top-1 hit when its positive attains the row maximum (the positives enter the
        logits as the canonical ``pos``, so the comparison is exact).
        """
        return (self.max - pos) + self.sum.log(), (self.max == pos).sum()


def _grad_chunk(
    ws: ChunkWorkspace,
    grad_t: Tensor,
    scaled_rows: Tensor,
    cols: Tensor,
    pos: Tensor,
    ce_rows: Tensor,
    ce_cols: Tensor,
    lse_cols: Tensor,
    offset: int,
    start: int,
) -> Tensor:
    """grad_t += (G @ cols).T with G = P + Q - 2 onehot; return sum_aj P[a, j] (logit_aj - pos_a).

    logit[a, j] = s rows_a . cols_j (columns start..start+c; ``scaled_rows`` = s * rows);
    P = exp(logit - pos_a - ce_rows[a]) is this rank's rows of one direction's softmax;
    Q = exp(logit - lse_cols[j]) is column a of the other direction's softmax (its rows j are
    the N gathered rows; lse_cols = pos + ce_cols, precomputed once per backward).
    """
    b, c = scaled_rows.shape[0], cols.shape[0]
    stop = start + c
    logits = _scaled_logits(ws, scaled_rows, cols, pos, offset, start)
    g = torch.sub(logits, lse_cols[None, start:stop], out=ws.view(1, b, c)).exp_()  # Q
    logits.sub_(pos[:, None])
    p = torch.sub(logits, ce_rows[:, None], out=ws.view(2, b, c)).exp_()
    p_dot = torch.dot(p.view(-1), logits.view(-1))
    g.add_(p)
    diag = diagonal_in_chunk(g, offset, start, stop)
    if diag is not None:  # P_aa + Q_aa - 2 without cancellation: expm1 of -CE
        own = diag[0] + offset
        g[diag] = torch.expm1(-ce_rows[diag[0]]) + torch.expm1(-ce_cols[own])
    ws.add_matmul_t(grad_t, g, cols)
    return p_dot


class _ClipLossFn(torch.autograd.Function):
    """L over the global batch (see module docstring); backward: dp * dL/d(own inputs)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        image: Tensor,
        text: Tensor,
        logit_scale: Tensor,
        opts: LossOptions,
    ) -> tuple[Tensor, Tensor, Tensor]:
        b, d = image.shape
        c = Columns.setup(image, text, logit_scale, opts)
        acc, offset, n, scale = c.acc, c.offset, c.n, c.scale
        pos = (image.to(acc) * text.to(acc)).sum(dim=1).mul_(scale)  # canonical positive logits
        image_s, text_s = scaled(image, scale), scaled(text, scale)
        ws = c.workspace(1, image.dtype, image.device)
        i2t = _OnlineCE(b, acc, image.device)
        t2i = _OnlineCE(b, acc, image.device)
        for start, cols, r0, r1 in c.blocks():
            at = offset + r0
            i2t.update(_scaled_logits(ws, image_s[r0:r1], cols[:, d:], pos[r0:r1], at, start), r0)
            t2i.update(_scaled_logits(ws, text_s[r0:r1], cols[:, :d], pos[r0:r1], at, start), r0)
        ce_i2t, hit_i2t = i2t.result(pos)
        ce_t2i, hit_t2i = t2i.result(pos)
        part = ce_i2t.sum() + ce_t2i.sum()
        sums = torch.stack([part, hit_i2t.to(acc), hit_t2i.to(acc)])
        stats = c.comm.gather(torch.cat([pos, ce_i2t, ce_t2i, sums])).view(c.comm.size, 3 * b + 3)
        totals = stats[:, 3 * b :].sum(dim=0)  # same order on every rank: bit-identical result
        ctx.save_for_backward(image, text, logit_scale)
        ctx.columns = c
        ctx.per_row = [stats[:, k * b : (k + 1) * b].reshape(n) for k in range(3)]
        loss, i2t_top1, t2i_top1 = totals[0] / (2 * n), totals[1] / n, totals[2] / n
        ctx.mark_non_differentiable(i2t_top1, t2i_top1)
        return loss, i2t_top1, t2i_top1

    @staticmethod
    @once_differentiable
    def backward(ctx, g_loss: Tensor, _g_i2t: Tensor, _g_t2i: Tensor):  # type: ignore[override]
        image, text, logit_scale = ctx.saved_tensors
        c = ctx.columns
        offset, n, scale = c.offset, c.n, c.scale
        b, d = image.shape
        pos_all, ce_i2t, ce_t2i = ctx.per_row
        own = slice(offset, offset + b)
        ws = c.workspace(3, image.dtype, image.device)
        grad_i = torch.zeros((d, b), dtype=ws.acc, device=image.device)  # transposed: [d, b]
        grad_t = torch.zeros((d, b), dtype=ws.acc, device=text.device)
        p_dot = torch.zeros((), dtype=ws.acc, device=image.device)
        image_s, text_s = scaled(image, scale), scaled(text, scale)
        lse_i2t, lse_t2i = pos_all + ce_i2t, pos_all + ce_t2i  # [N] each
        pos, ce_i2t_own, ce_t2i_own = pos_all[own], ce_i2t[own], ce_t2i[own]
        for start, cols, r0, r1 in c.blocks():
            r, at = slice(r0, r1), offset + r0
            # I_r T^T: rows = this rank's i2t rows; column a = the t2i softmax's column of image a.
            p_dot += _grad_chunk(
                ws, grad_i[:, r], image_s[r], cols[:, d:], pos[r], ce_i2t_own[r], ce_t2i, lse_t2i,
                at, start,
            )  # fmt: skip
            # T_r I^T: rows = this rank's t2i rows; column a = the i2t softmax's column of text a.
            p_dot += _grad_chunk(
                ws, grad_t[:, r], text_s[r], cols[:, :d], pos[r], ce_t2i_own[r], ce_i2t, lse_i2t,
                at, start,
            )  # fmt: skip
        g = g_loss.to(ws.acc) * c.comm.size / (2 * n)  # dp x: docs/loss.md "gradient convention"
        d_image = (g * scale * grad_i.T).to(image.dtype).contiguous()
        d_text = (g * scale * grad_t.T).to(text.dtype).contiguous()
        d_scale = (g * p_dot).to(logit_scale.dtype).reshape(logit_scale.shape)
        return d_image, d_text, d_scale, None


def clip_loss_with_comm(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    comm: DPComm,
    chunk_size: int | None = LOSS_CHUNK_SIZE,
    mode: str = "allgather",
) -> ClipLossOutput:
    """Global-batch CLIP loss; ``comm`` supplies this rank's index, the DP size and collectives."""
    features = (image_features, text_features, logit_scale)
    loss, i2t, t2i = apply_loss(_ClipLossFn, features, comm, chunk_size, mode)
    return ClipLossOutput(loss, i2t.detach(), t2i.detach())


def clip_loss(
    image_features: Tensor,
    text_features: Tensor,
    logit_scale: Tensor,
    *,
    dp_group: ProcessGroup | None = None,
    chunk_size: int | None = LOSS_CHUNK_SIZE,
    mode: str = "allgather",
) -> ClipLossOutput:
    """Symmetric InfoNCE over the N = b * dp pairs of ``dp_group``, scale exp(logit_scale).

    ``image_features``/``text_features``: this rank's [b, d] L2-normalised features (every rank the
    same b). ``logit_scale``: the model's shape-[1] parameter holding log(scale) (open_clip's
    ``model.logit_scale``, not its exp). ``dp_group``: the data-parallel group only (never WORLD
    under TP/PP); None = single process. ``mode``: "allgather" (one all-gather, N x 2d features
    held until backward) or "stream" (owner blocks broadcast one at a time in forward and again in
    backward; O(b x 2d) held). Returns the global mean loss (float32; float64 for float64 inputs),
    identical on every rank; its backward yields dp * dL/d(this rank's inputs), so that averaging
    gradients over the DP ranks (DDP/DeepSpeed) gives exactly the single-process gradient.
    Extra memory: O(b * chunk_size) plus the features held by ``mode``.
    """
    return clip_loss_with_comm(
        image_features, text_features, logit_scale, DPComm.from_group(dp_group), chunk_size, mode
    )


class ContrastiveLoss(LossModule):
    """Module form of :func:`clip_loss` with a fixed chunk size, mode and DP group."""

    def forward(
        self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor
    ) -> ClipLossOutput:
        """Global-batch CLIP loss and top-1 accuracies (see :func:`clip_loss`)."""
        return clip_loss(image_features, text_features, logit_scale, **self.options)
