"""The training engine: DeepSpeed (plain or pipeline) around megaclip's model, one call per step.

Exact global-batch loss for every layout. The contrastive loss needs the features of *all*
micro-batches of *all* DP ranks at once, but DeepSpeed computes a loss per micro-batch. So a step
is split in two around one global loss computation:

1. features of every micro-batch of this rank;
2. the exact loss over the global batch (all micro-batches x DP ranks, gathered over the DP
   group only) and its gradient w.r.t. this rank's features and the logit scalars (log scale,
   SigLIP's bias), computed once;
3. per micro-batch, backward of the surrogate ``sum(features * cached_grad)``, scaled so that
   DeepSpeed's division by the accumulation steps and its DP averaging give exactly
   d(global loss)/d(parameters).

``parallel.schedule`` says what happens to the graphs between 1 and 3 (one strategy each, in
megaclip/train/steps.py): "keep" keeps them (PP = 1:
the forwards of step 1 are reused; PP > 1: GPipe order with a global-loss instruction, one
pipelined pass), "recompute" computes step 1 without graphs and runs every micro-batch again,
with the same random numbers, right before its backward (PP > 1: then DeepSpeed's stock 1F1B):
flat activation memory for one more forward. Both are exact; the tests compare them with a
single-process reference.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from megaclip.config.model import ClipConfig
from megaclip.config.parallel import ParallelConfig
from megaclip.config.train import LOSS_CHUNK_SIZE, OptimConfig
from megaclip.errors import ConfigError
from megaclip.loss.contrastive import ClipLossOutput, clip_loss
from megaclip.loss.siglip import siglip_loss
from megaclip.model.naming import strip_prefix
from megaclip.parallel.deepspeed_compat import wrap_optimizer_step
from megaclip.parallel.device import accelerator, device
from megaclip.parallel.runtime import (
    configure_backends,
    host_to_device,
    seed_training_rng,
)
from megaclip.parallel.topology import Topology
from megaclip.perf.memory import schedule_without_budget
from megaclip.pipeline.stages import split_outputs
from megaclip.train.build import build_module
from megaclip.train.ds_config import resolve_ds_config
from megaclip.train.optim import build_optimizer, fuse_overflow_check, lr_at, param_groups
from megaclip.train.steps import (
    LastStageLoss,
    MicroBatch,
    StepStrategy,
    placeholder_labels,
    step_strategy,
)

if TYPE_CHECKING:
    from megaclip.train.resolve import ResolvedRun


@dataclass(frozen=True)
class StepResult:
    """What one optimizer step over the global batch produced (identical on every rank)."""

    step: int
    loss: float
    logit_scale: float
    lr: float
    grad_norm: float | None
    acc_i2t: float
    acc_t2i: float
    samples: int
    step_time: float
    feature_time: float
    backward_time: float
    skipped: bool = False  # non-finite loss or gradients: the parameters were left unchanged


def lock_tower(module: torch.nn.Module, tower: str) -> int:
    """Freeze every parameter of the 'image' or 'text' tower (LiT-style); returns how many."""
    prefix = {"image": "visual.", "text": "text."}[tower]
    frozen = 0
    for name, param in module.named_parameters():
        if strip_prefix(name).startswith(prefix):  # logit_scale stays trainable
            param.requires_grad_(False)
            frozen += 1
    return frozen


#: Events of :meth:`ClipEngine.add_hook`: what a hook is entered around, and its arguments.
HOOK_EVENTS = {
    "loss": "each global loss (with its gradients); hook(img, txt, logit)",
    "optimizer_step": "each step of DeepSpeed's optimizer (every ZeRO stage and PP); hook()",
}
Hook = Callable[..., contextlib.AbstractContextManager]


class ClipEngine:
    """Builds the model for this rank's (tp, pp, dp) coordinates and trains it step by step."""

    def __init__(
        self,
        model_cfg: ClipConfig,
        par: ParallelConfig,
        topo: Topology,
        ds_config: Mapping[str, Any] | None,
        optim: OptimConfig,
        *,
        seed: int = 0,
        patch_dropout: float = 0.0,
        loss_chunk_size: int | None = LOSS_CHUNK_SIZE,
        loss_mode: str = "allgather",
        lock: str | None = None,
        loss: str = "clip",
    ) -> None:
        import deepspeed

        par.check_model(model_cfg)
        configure_backends(par.precision)  # TF32 for fp32 matmuls, SDPA's fused kernels
        seed_training_rng(seed, topo.coords.dp)  # a resumed run then restores its saved state
        self.cfg, self.par, self.topo, self.optim_cfg = model_cfg, par, topo, optim
        self.loss_chunk_size, self.loss_mode, self.loss = loss_chunk_size, loss_mode, loss
        self.logit_width = 2 if loss == "siglip" else 1  # [log scale (, bias)] columns
        if (loss == "siglip") != (model_cfg.init_logit_bias is not None):
            raise ConfigError(
                f"loss '{loss}' needs a model {'with' if loss == 'siglip' else 'without'} a "
                "logit_bias (model.init_logit_bias; train.loss: siglip sets it)"
            )
        # A given dict is final (megaclip.train.resolve made it); none: the one builder's.
        self.ds_config = (
            copy.deepcopy(dict(ds_config))
            if ds_config
            else resolve_ds_config({}, par, gradient_clipping=optim.grad_clip)
        )
        last_stage_loss = LastStageLoss() if par.pp > 1 else None
        built = build_module(
            model_cfg,
            par,
            topo,
            self.ds_config,
            seed=seed,
            patch_dropout=patch_dropout,
            loss_fn=last_stage_loss,
        )
        module, self.plans = built.module, built.plans
        if last_stage_loss is not None:
            self.last_stage_loss = last_stage_loss
        if lock is not None:
            lock_tower(module, lock)
        optimizer = build_optimizer(
            param_groups(module, optim.weight_decay),
            lr=optim.lr,
            betas=(optim.beta1, optim.beta2),
            eps=optim.eps,
            # ZeRO-0 calls the optimizer directly; ZeRO-1/2/3 and bf16 check overflow themselves.
            guard_non_finite=par.zero_stage == 0,
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        self.engine, _, _, _ = deepspeed.initialize(
            model=module,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=self.ds_config,
            mpu=topo.mpu() if par.pp == 1 and par.tp > 1 else None,
            dist_init_required=False,
        )
        # fp16/bf16 ZeRO-0: DeepSpeed's overflow scan reads one flag per tensor; make it one
        fuse_overflow_check(self.engine.optimizer)
        self.device = device()
        self.step_count = 0
        self._hooks: dict[str, list[Hook]] = {event: [] for event in HOOK_EVENTS}
        # resolved by megaclip.train.resolve (from_run); "auto" from a direct caller: the
        # planner's choice without a memory budget.
        self.schedule = schedule_without_budget(par)
        self.step_fn: StepStrategy = step_strategy(
            self, self.schedule, par.pp, par.grad_accum_steps, last_stage_loss
        )

    @classmethod
    def from_run(cls, run: ResolvedRun, topo: Topology) -> ClipEngine:
        """The engine of a resolved run: its layout, final DeepSpeed dict and schedule as they
        are (megaclip.train.resolve decided them), its optimizer and loss settings."""
        o, t = run.cfg.optim, run.cfg.train
        return cls(
            run.cfg.model,
            run.par,
            topo,
            run.ds_dict(),
            dataclasses.replace(o, total_steps=o.total_steps or t.steps),
            seed=t.seed,
            patch_dropout=t.patch_dropout,
            loss_chunk_size=t.loss_chunk_size,
            loss_mode=t.loss_mode,
            loss=t.loss,
            lock="image" if t.lock_image else "text" if t.lock_text else None,
        )

    # ---------------------------------------------------------------- hooks

    def add_hook(self, event: str, hook: Hook) -> None:
        """Measure through the engine: ``hook(...)`` is entered around every ``event``.

        ``event``: a key of :data:`HOOK_EVENTS` ("loss" or "optimizer_step"); the hook returns
        a context manager (a timer, a phase of a comm counter, a snapshot) and must not change
        what it wraps. Hooks are entered in the order they were added. For bench/ and
        benchmarks: the engine's private methods are not patched.
        """
        if event not in self._hooks:
            raise ValueError(f"unknown engine hook event '{event}' (one of {sorted(HOOK_EVENTS)})")
        if event == "optimizer_step" and not self._hooks[event]:
            wrap_optimizer_step(self.engine.optimizer, lambda: self._entered("optimizer_step"))
        self._hooks[event].append(hook)

    @contextlib.contextmanager
    def _entered(self, event: str, *args):
        with contextlib.ExitStack() as stack:
            for hook in self._hooks[event]:
                stack.enter_context(hook(*args))
            yield

    # ---------------------------------------------------------------- helpers

    def _lr_factor(self, step: int) -> float:
        o = self.optim_cfg
        if not o.total_steps:  # no schedule length: constant after the warmup
            return lr_at(step, 1.0, o.warmup_steps, 1, 1.0)
        return lr_at(step, 1.0, o.warmup_steps, o.total_steps, o.min_lr / o.lr)

    def _sync(self) -> None:
        """Timing only: wait for the device once at the start of a step (no-op on CPU)."""
        acc = accelerator()
        if acc.device_name() != "cpu":
            acc.synchronize()

    def global_loss(self, img: torch.Tensor, txt: torch.Tensor, logit: torch.Tensor):
        """Loss over the global batch and d loss / d (this rank's features, [log scale, bias]).

        ``logit``: [log scale] (CLIP) or [log scale, bias] (SigLIP). Gradients follow
        megaclip.loss's convention: dp x d L / d(local features), and scalar gradients whose DP
        average is d L / d scalar, so DeepSpeed's DP averaging is exact. Runs inside the
        "loss" hooks (:meth:`add_hook`).
        """
        if self._hooks["loss"]:
            with self._entered("loss", img, txt, logit):
                return self._global_loss_and_grads(img, txt, logit)
        return self._global_loss_and_grads(img, txt, logit)

    def _global_loss_and_grads(self, img: torch.Tensor, txt: torch.Tensor, logit: torch.Tensor):
        img = img.detach().float().requires_grad_(True)
        txt = txt.detach().float().requires_grad_(True)
        logit = logit.detach().float().reshape(-1).requires_grad_(True)
        scale = logit[:1].clamp(0.0, self.cfg.max_logit_scale)
        kw = dict(dp_group=self.topo.dp_group, chunk_size=self.loss_chunk_size, mode=self.loss_mode)
        if self.loss == "siglip":
            loss = siglip_loss(img, txt, scale, logit[1:2], **kw)
            nan = torch.full((), float("nan"), device=img.device)  # stacked with the loss
            out = ClipLossOutput(loss, nan, nan)  # no top-1 accuracies for the sigmoid loss
        else:
            out = clip_loss(img, txt, scale, **kw)
        out.loss.backward()
        return out, img.grad, txt.grad, logit.grad

    # ---------------------------------------------------------------- step

    def train_step(self, micro_batches: Sequence[MicroBatch]) -> StepResult:
        """One optimizer step over ``grad_accum_steps`` micro-batches of this DP rank."""
        if len(micro_batches) != self.par.grad_accum_steps:
            raise ValueError(
                f"train_step needs {self.par.grad_accum_steps} micro-batches, "
                f"got {len(micro_batches)}"
            )
        batches = micro_batches  # indexed per pass, moved to the device one at a time
        self._sync()
        t0 = time.perf_counter()
        skipped_before = self.engine.skipped_steps
        metrics, t_feat = self.step_fn(batches)  # the schedule's strategy (train/steps.py)
        lr = self.engine.get_lr()[0] if hasattr(self.engine, "get_lr") else float("nan")
        norm = self.engine.get_global_grad_norm()
        if isinstance(norm, torch.Tensor):  # read back with the metrics: one transfer
            metrics = torch.cat([metrics, norm.detach().reshape(1).to(metrics)])
        values = metrics.tolist()  # the step's one device-to-host read (waits for the step)
        t_end = time.perf_counter()
        loss, scale, a_i2t, a_t2i = values[:4]
        if isinstance(norm, torch.Tensor):
            norm = values[4]
        self.step_count += 1
        return StepResult(
            step=self.step_count,
            loss=loss,
            logit_scale=math.exp(scale),
            lr=lr,
            grad_norm=float(norm) if norm is not None else None,
            acc_i2t=a_i2t,
            acc_t2i=a_t2i,
            samples=self.par.global_batch_size,
            step_time=t_end - t0,
            feature_time=t_feat - t0,
            backward_time=t_end - t_feat,
            skipped=self.engine.skipped_steps > skipped_before,
        )

    # ---------------------------------------------------------------- inference

    @torch.no_grad()
    def features(self, batches: Sequence[MicroBatch]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Image and text features [b, E] x 2 (eval mode, no graphs) of each micro-batch.

        Runs the training engine itself (ZeRO-3 fetches, pipeline stages), so nothing is
        gathered. Collective over the layout; under PP > 1 at most ``grad_accum_steps``
        micro-batches per call, and the features exist on the last stage only (an empty list
        elsewhere).
        """
        engine = self.engine
        batches = host_to_device(batches, self.device)
        was_training = engine.module.training
        try:
            if self.par.pp == 1:
                engine.eval()
                return [engine(images, tokens)[:2] for images, tokens in batches]
            if len(batches) > self.par.grad_accum_steps:
                raise ValueError(f"at most {self.par.grad_accum_steps} micro-batches per call")
            dummy = placeholder_labels(self, batches[0][0].shape[0])
            with self.last_stage_loss.collecting(detach=True) as outs:
                engine.eval_batch(
                    iter([(mb, dummy) for mb in batches]),
                    reduce_output=None,
                    bcast_loss=False,
                    num_micro_batches=len(batches),
                )
            return [split_outputs(o, self.cfg.embed_dim)[:2] for o in outs]
        finally:
            engine.module.train(was_training)

    # ---------------------------------------------------------------- checkpoints

    def save(
        self, ckpt_root: str, client_state: dict | None = None, *, keep_last: int | None = None
    ):
        """Atomically save the training state as ``ckpt_root/step-<step_count>`` (collective)."""
        from megaclip.checkpoint.resume import save_checkpoint

        return save_checkpoint(self, ckpt_root, self.step_count, client_state, keep_last=keep_last)

    def load_latest(self, ckpt_root: str) -> dict | None:
        """Resume from ``ckpt_root/latest`` (any saved layout); its client_state or None."""
        from megaclip.checkpoint.resume import load_latest

        return load_latest(self, ckpt_root)

    def initialize_from(self, path: str, *, new_logit_bias: bool = False) -> None:
        """Replace the initial weights by an open_clip file / universal / megaclip checkpoint.

        ``new_logit_bias``: a source without logit_bias may start this SigLIP model.
        """
        from megaclip.checkpoint.universal import initialize_from

        initialize_from(self, path, new_logit_bias=new_logit_bias)
