"""One optimizer step per schedule: the strategies :class:`~megaclip.train.engine.ClipEngine` runs.

Every strategy computes the same exact step (see train/engine.py): features of this rank's
micro-batches, the global loss once, then each micro-batch's surrogate backward. They differ
only in what happens to the forward graphs in between:

=====  ===========  ==========================================================================
PP     schedule     strategy
=====  ===========  ==========================================================================
1      keep         :class:`KeepStep`: the graphs of the first forwards serve the backwards
1      recompute    :class:`RecomputeStep`: no-grad features, each micro-batch run again
>1     keep         :class:`PipelineGlobalLossStep`: one pass, GPipe order, a GlobalLoss step
>1     recompute    :class:`PipelineRecomputeStep`: no-grad pipelined pass, then stock 1F1B
=====  ===========  ==========================================================================

A strategy is called with the step's micro-batches and returns the metrics
[loss, log scale, i2t top-1, t2i top-1] (on the device, the same on every rank) and the time the
global loss finished (the split of the step time into features and backward).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any, Protocol

import torch

from megaclip.config.model import ClipConfig
from megaclip.config.parallel import forward_passes
from megaclip.loss.contrastive import ClipLossOutput
from megaclip.parallel import collectives
from megaclip.parallel.deepspeed_compat import training_mode_kept
from megaclip.parallel.runtime import host_to_device, rng_state, set_rng_state
from megaclip.parallel.topology import Topology
from megaclip.pipeline.stages import cached_grad_loss, split_outputs

MicroBatch = tuple[torch.Tensor, torch.Tensor]  # images [b, C, H, W], tokens [b, L]
LossAndGrads = tuple[ClipLossOutput, torch.Tensor, torch.Tensor, torch.Tensor]


class StepHost(Protocol):
    """What a strategy uses of the engine that holds it."""

    engine: Any  # the initialised DeepSpeed engine (plain or pipeline)
    cfg: ClipConfig
    topo: Topology
    device: torch.device
    logit_width: int

    def global_loss(
        self, img: torch.Tensor, txt: torch.Tensor, logit: torch.Tensor
    ) -> LossAndGrads: ...


class StepStrategy(Protocol):
    """batches -> (metrics [4] on the device, time the global loss finished)."""

    def __call__(self, batches: Sequence[MicroBatch]) -> tuple[torch.Tensor, float]: ...


class LastStageLoss:
    """The pipeline's loss_fn: collects the outputs, or runs the cached-gradient surrogate.

    With ``collected`` set, outputs are appended (graphs alive unless ``detach``) and a zero is
    returned; otherwise the label is the cached gradient and the surrogate is returned.
    """

    def __init__(self) -> None:
        self.collected: list[torch.Tensor] | None = None
        self.detach = False

    def __call__(self, outputs: torch.Tensor, cached_grad: torch.Tensor) -> torch.Tensor:
        if self.collected is not None:
            self.collected.append(outputs.detach() if self.detach else outputs)
            return outputs.new_zeros(())
        return cached_grad_loss(outputs, cached_grad)

    @contextlib.contextmanager
    def collecting(self, detach: bool):
        """Collect the last stage's outputs while inside; yields the list."""
        self.collected, self.detach = [], detach
        try:
            yield self.collected
        finally:
            self.collected = None


def metrics_vector(out: ClipLossOutput, scale: torch.Tensor, device: torch.device) -> torch.Tensor:
    """[loss, log scale, i2t top-1, t2i top-1] as one float64 vector on the device."""
    return torch.stack(
        [
            out.loss.detach().double(),
            scale.detach().double().reshape(-1)[0],
            out.i2t_top1.double().reshape(()),
            out.t2i_top1.double().reshape(()),
        ]
    ).to(device)


def _to_device(batch: MicroBatch, device: torch.device) -> MicroBatch:
    return host_to_device([batch], device)[0]  # non-blocking from pinned memory


class _PlainStep:
    """PP = 1: features, the global loss once, then each micro-batch's surrogate backward."""

    recompute = False

    def __init__(self, host: StepHost) -> None:
        self.host = host

    def __call__(self, batches: Sequence[MicroBatch]) -> tuple[torch.Tensor, float]:
        h, accum = self.host, len(batches)
        engine = h.engine
        engine.train()
        rng = rng_state() if self.recompute else None
        with torch.no_grad() if self.recompute else contextlib.nullcontext():
            outs = [engine(*_to_device(mb, h.device)) for mb in batches]
        img = torch.cat([o[0] for o in outs])  # [accum * b, E]
        txt = torch.cat([o[1] for o in outs])
        scale = outs[0][2]
        out, g_img, g_txt, g_scale = h.global_loss(img, txt, scale)
        t_feat = time.perf_counter()
        if self.recompute:
            set_rng_state(rng)  # the second forwards replay the same patch dropout
        b = batches[0][0].shape[0]
        for k, mb in enumerate(batches):
            i_k, t_k, s_k = engine(*_to_device(mb, h.device)) if self.recompute else outs[k]
            rows = slice(k * b, (k + 1) * b)
            surrogate = (i_k * g_img[rows].to(i_k.dtype)).sum()
            surrogate = surrogate + (t_k * g_txt[rows].to(t_k.dtype)).sum()
            surrogate = surrogate + (s_k * (g_scale / accum).to(s_k.dtype)).sum()
            engine.backward(surrogate * accum)  # DeepSpeed divides by accum
            engine.step()
        return metrics_vector(out, scale, h.device), t_feat


class KeepStep(_PlainStep):
    """PP = 1, "keep": the first forwards keep their graphs for the backwards (activation
    memory grows with the micro-batches); one forward per micro-batch."""


class RecomputeStep(_PlainStep):
    """PP = 1, "recompute": the feature pass runs without graphs and each micro-batch runs again,
    with the same random numbers (patch dropout), right before its backward: activations of one
    micro-batch at a time (ZeRO-3 with accumulation needs it: its parameter fetching wants each
    backward right after its forward). The inputs stay on the host between the passes."""

    recompute = True


def cached_grads(
    host: StepHost, feats: list[torch.Tensor]
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Global loss over the last stage's outputs -> per-micro-batch cached gradients, metrics."""
    e, accum, b = host.cfg.embed_dim, len(feats), feats[0].shape[0]
    parts = [split_outputs(f.detach().float(), e) for f in feats]
    img = torch.cat([p[0] for p in parts])
    txt = torch.cat([p[1] for p in parts])
    scale = parts[0][2]
    out, g_img, g_txt, g_scale = host.global_loss(img, txt, scale)
    per_row = (g_scale / (accum * b)).view(1, -1).expand(b, -1)  # [b, k]
    rows = [slice(k * b, (k + 1) * b) for k in range(accum)]
    cached = [accum * torch.cat([g_img[r], g_txt[r], per_row], dim=1).to(host.device) for r in rows]
    return cached, metrics_vector(out, scale, host.device)


def placeholder_labels(host: StepHost, b: int) -> torch.Tensor:
    """The pipeline's label of a micro-batch where no cached gradient is passed: [b, 2E + k]
    zeros (k: the logit scalars' width)."""
    return torch.zeros(b, 2 * host.cfg.embed_dim + host.logit_width, device=host.device)


class _PipelineStep:
    def __init__(self, host: StepHost, loss_fn: LastStageLoss) -> None:
        self.host, self.loss_fn = host, loss_fn

    def _shared(self, metrics: torch.Tensor) -> torch.Tensor:
        """Every rank reports the same numbers: the last stage's, broadcast on the device."""
        pp = self.host.topo.pp_group
        collectives.broadcast(metrics, collectives.last_rank(pp), pp)
        return metrics


class PipelineGlobalLossStep(_PipelineStep):
    """PP > 1, "keep": one pipelined pass in GPipe order, m forwards, the global loss (a
    GlobalLoss instruction of megaclip.pipeline's schedule), m backwards."""

    def __init__(self, host: StepHost, loss_fn: LastStageLoss) -> None:
        super().__init__(host, loss_fn)
        from megaclip.pipeline.engine import enable_global_loss

        enable_global_loss(host.engine, self._surrogates)

    def _surrogates(self) -> list[torch.Tensor]:
        """GlobalLoss instruction: surrogate losses for the m collected outputs (last stage)."""
        feats = self.loss_fn.collected
        cached, self._metrics = cached_grads(self.host, feats)
        self._t_loss = time.perf_counter()
        return [cached_grad_loss(f, g.to(f.dtype)) for f, g in zip(feats, cached)]

    def __call__(self, batches: Sequence[MicroBatch]) -> tuple[torch.Tensor, float]:
        dummy = placeholder_labels(self.host, batches[0][0].shape[0])
        self._metrics = torch.zeros(4, dtype=torch.float64, device=self.host.device)
        self._t_loss = time.perf_counter()
        with self.loss_fn.collecting(detach=False):
            self.host.engine.train_batch(iter([(mb, dummy) for mb in batches]))
        return self._shared(self._metrics), self._t_loss


class PipelineRecomputeStep(_PipelineStep):
    """PP > 1, "recompute": a no-grad pipelined feature pass, then DeepSpeed's stock 1F1B with
    the cached gradients as labels. The feature pass runs in training mode (DeepSpeed's
    eval_batch would switch patch dropout off) and the second pass replays its random numbers."""

    def __call__(self, batches: Sequence[MicroBatch]) -> tuple[torch.Tensor, float]:
        h, accum = self.host, len(batches)
        engine = h.engine
        dummy = placeholder_labels(self.host, batches[0][0].shape[0])
        rng = rng_state()
        with self.loss_fn.collecting(detach=True) as feats, training_mode_kept(engine.module):
            engine.eval_batch(
                iter([(mb, dummy) for mb in batches]), reduce_output=None, bcast_loss=False
            )
        set_rng_state(rng)  # the second forward replays the same random patch dropout
        cached = [dummy] * accum
        metrics = torch.zeros(4, dtype=torch.float64, device=h.device)
        if h.topo.is_last_stage:
            cached, metrics = cached_grads(h, feats)
        t_feat = time.perf_counter()
        engine.train_batch(iter([(mb, g) for mb, g in zip(batches, cached)]))
        return self._shared(metrics), t_feat


def step_strategy(
    host: StepHost, schedule: str, pp: int, accum: int, loss_fn: LastStageLoss | None
) -> StepStrategy:
    """The strategy of a resolved schedule ("keep" / "recompute") for this layout.

    PP = 1 "recompute" with one micro-batch is the same computation as "keep" (one forward).
    """
    two_passes = forward_passes(schedule, pp, accum) == 2
    if pp == 1:
        return RecomputeStep(host) if two_passes else KeepStep(host)
    assert loss_fn is not None, "a pipeline strategy needs the last stage's loss_fn"
    if two_passes:
        return PipelineRecomputeStep(host, loss_fn)
    return PipelineGlobalLossStep(host, loss_fn)
