"""DeepSpeed's PipelineEngine with the global-loss schedule (one forward pass per step)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from deepspeed.runtime.pipe import schedule as ds
from deepspeed.runtime.pipe.engine import PipelineEngine

from megaclip.pipeline.schedule import GlobalLoss, GlobalLossSchedule

# () -> one scalar to backpropagate per micro-batch (the caller collected the m outputs)
GlobalLossFn = Callable[[], list[torch.Tensor]]


class GlobalLossPipelineEngine(PipelineEngine):
    """PipelineEngine whose train_batch runs :class:`GlobalLossSchedule`.

    The last stage's ``loss_fn`` must keep its outputs (graphs alive) where ``global_loss_fn``
    finds them; at the GlobalLoss step that function returns one surrogate loss per micro-batch.
    Instances are made from a stock engine with :func:`enable_global_loss`, so DeepSpeed's own
    initialisation path is used unchanged.
    """

    global_loss_fn: GlobalLossFn

    def _train_schedule(self) -> GlobalLossSchedule:
        return GlobalLossSchedule(self.micro_batches, self.num_stages, self.stage_id)

    def _exec_global_loss(self) -> None:
        self._surrogates = self.global_loss_fn()

    def _exec_backward_pass(self, buffer_id: int) -> None:
        if self.is_last_stage():
            self.loss = self._surrogates[buffer_id]
        super()._exec_backward_pass(buffer_id)

    # The engine dispatches through this class-level map, not through method overrides.
    _INSTRUCTION_MAP = {
        **PipelineEngine._INSTRUCTION_MAP,
        ds.BackwardPass: _exec_backward_pass,
        GlobalLoss: _exec_global_loss,
    }


def enable_global_loss(engine: PipelineEngine, fn: GlobalLossFn) -> GlobalLossPipelineEngine:
    """Switch an initialised PipelineEngine to the global-loss schedule (adds no state but fn)."""
    engine.__class__ = GlobalLossPipelineEngine
    engine.global_loss_fn = fn
    return engine
