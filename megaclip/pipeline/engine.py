"""DeepSpeed's PipelineEngine with the global-loss schedule (one forward pass per step)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from megaclip.parallel.deepspeed_compat import pipeline_engine_class, swap_engine_class
from megaclip.pipeline.schedule import GlobalLoss, GlobalLossSchedule

# () -> one scalar to backpropagate per micro-batch (the caller collected the m outputs)
GlobalLossFn = Callable[[], list[torch.Tensor]]


def _schedule(engine) -> GlobalLossSchedule:
    return GlobalLossSchedule(engine.micro_batches, engine.num_stages, engine.stage_id)


def _exec_global_loss(engine) -> None:
    engine.global_loss_surrogates = engine.global_loss_fn()


def _backward_loss(engine, buffer_id: int) -> torch.Tensor | None:
    return engine.global_loss_surrogates[buffer_id] if engine.is_last_stage() else None


GlobalLossPipelineEngine = pipeline_engine_class(
    "GlobalLossPipelineEngine",
    schedule=_schedule,
    instructions={GlobalLoss: _exec_global_loss},
    backward_loss=_backward_loss,
    module=__name__,
    doc="""PipelineEngine whose train_batch runs :class:`GlobalLossSchedule`.

    The last stage's ``loss_fn`` must keep its outputs (graphs alive) where ``global_loss_fn``
    finds them; at the GlobalLoss step that function returns one surrogate loss per micro-batch,
    which the backward pass of each buffer then backpropagates. Instances are made from a stock
    engine with :func:`enable_global_loss`, so DeepSpeed's own initialisation path is used
    unchanged (the subclass is built by megaclip.parallel.deepspeed_compat, the DeepSpeed fence).
    """,
)


def enable_global_loss(engine, fn: GlobalLossFn):
    """Switch an initialised PipelineEngine to the global-loss schedule (adds no state but fn)."""
    swap_engine_class(engine, GlobalLossPipelineEngine)
    engine.global_loss_fn = fn
    return engine
