"""A pipeline schedule with one global-loss step between all forwards and all backwards.

DeepSpeed's 1F1B schedule interleaves forwards and backwards, so the loss of micro-batch k is
needed before micro-batch k+1 exists. CLIP's loss needs all of them at once. This schedule runs
in GPipe order instead:

    m forward steps (pipelined)  ->  GlobalLoss on the last stage  ->  m backward steps

Each step's sends and receives pair up across neighbouring stages in the same step (stage s
sends micro-batch i-1 while stage s+1 receives it), as in DeepSpeed's own schedules, so blocking
point-to-point backends (gloo) cannot deadlock. Every RecvGrad is directly followed by its
BackwardPass: the engine keeps one shared buffer for received gradients.
"""

from __future__ import annotations

from deepspeed.runtime.pipe import schedule as ds


class GlobalLoss(ds.PipeInstruction):
    """Compute the loss over every micro-batch (and DP rank) and cache each output's gradient."""


class GlobalLossSchedule(ds.PipeSchedule):
    """GPipe-ordered training schedule with a :class:`GlobalLoss` step on the last stage."""

    def steps(self):
        m, last = self.micro_batches, self.stages - 1
        s = self.stage_id
        steps = m + self.stages - 1
        for t in range(steps):  # forward phase: stage s runs micro-batch t - s
            cmds: list[ds.PipeInstruction] = []
            prev, cur = t - s - 1, t - s
            if self._valid_micro_batch(prev) and s < last:
                cmds.append(ds.SendActivation(prev))
            if self._valid_micro_batch(cur):
                if s > 0:
                    cmds.append(ds.RecvActivation(cur))
                if s in (0, last):
                    cmds.append(ds.LoadMicroBatch(cur))
                cmds.append(ds.ForwardPass(cur))
            yield cmds
        if s == last:
            yield [GlobalLoss()]
        for u in range(steps):  # backward phase: stage s runs micro-batch u - (P - 1 - s)
            cmds = []
            prev, cur = u - (last - s) - 1, u - (last - s)
            if self._valid_micro_batch(prev) and s > 0:
                cmds.append(ds.SendGrad(prev))
            if self._valid_micro_batch(cur):
                if s < last:
                    cmds.append(ds.RecvGrad(cur))
                cmds.append(ds.BackwardPass(cur))
            yield cmds
        yield [ds.ReduceTiedGrads(), ds.ReduceGrads(), ds.OptimizerStep()]

    def num_pipe_buffers(self) -> int:
        """All m micro-batches are in flight at once (GPipe)."""
        return max(2, self.micro_batches)
