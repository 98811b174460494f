"""The run configuration of `megaclip train`: one YAML/JSON file, validated once."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from megaclip.config.model import ClipConfig, model_from_dict, resolve_model
from megaclip.config.parallel import ParallelConfig
from megaclip.config.schema import (
    apply_overrides,
    check_at_least,
    check_finite,
    from_dict,
    load_mapping,
    to_dict,
)
from megaclip.errors import ConfigError

#: Columns per chunk of the contrastive / SigLIP loss's online log-sum-exp (extra memory
#: O(rows x chunk)): the default of ``train.loss_chunk_size``, the loss modules and the engine.
LOSS_CHUNK_SIZE = 4096


@dataclass(frozen=True)
class DataConfig:
    """Training data: LAION-style webdataset shards, or synthetic batches for benchmarks."""

    kind: Literal["webdataset", "synthetic"] = "webdataset"
    train: str = ""
    mode: Literal["resampled", "epoch"] = "resampled"
    workers: int = 0
    tokenizer: Literal["clip_bpe", "sentencepiece"] = "clip_bpe"
    tokenizer_path: str | None = None
    shuffle_buffer: int = 256
    max_skip_fraction: float = 0.5

    def __post_init__(self) -> None:
        if self.kind == "webdataset" and not self.train:
            raise ConfigError(
                "data.train is empty: give a shard spec such as 'data/{000000..000099}.tar' "
                "(or data.kind: synthetic)"
            )
        check_at_least("data", 0, workers=self.workers)
        check_at_least("data", 0, " (0 turns it off)", shuffle_buffer=self.shuffle_buffer)
        check_finite("data.max_skip_fraction", self.max_skip_fraction, 0.0, 1.0)


@dataclass(frozen=True)
class OptimConfig:
    """AdamW + warmup/cosine schedule (open_clip defaults)."""

    lr: float = 5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.2
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_steps: int = 0
    grad_clip: float = 1.0
    total_steps: int = 0  # length of the cosine schedule; 0 = train.steps

    def __post_init__(self) -> None:
        check_finite("optim.lr", self.lr, 0.0, low_open=True)
        check_at_least("optim", 0, warmup_steps=self.warmup_steps)
        check_finite("optim.min_lr", self.min_lr, 0.0, self.lr)
        check_finite("optim.weight_decay", self.weight_decay, 0.0)
        check_finite("optim.beta1", self.beta1, 0.0, 1.0, high_open=True)
        check_finite("optim.beta2", self.beta2, 0.0, 1.0, high_open=True)
        check_finite("optim.eps", self.eps, 0.0)
        check_finite("optim.grad_clip", self.grad_clip, 0.0)


@dataclass(frozen=True)
class ZeroShotSection:
    """Zero-shot classification data for periodic evaluation (class names + prompt templates)."""

    data: str = ""
    classnames: str = ""
    templates: str = ""
    every: int = 0
    max_samples: int = 0

    def __post_init__(self) -> None:
        check_at_least(
            "zeroshot", 0, " (0 turns it off)", every=self.every, max_samples=self.max_samples
        )


@dataclass(frozen=True)
class TrainSection:
    """Length, seeds, regularisation, logging and checkpointing of the run."""

    steps: int = 100
    seed: int = 0
    out_dir: str = "runs/default"
    log_every: int = 10
    save_every: int = 0
    keep_last: int = 2
    resume: bool = True
    max_bad_steps: int = 5  # consecutive non-finite steps (each skipped) before stopping
    exit_after: int = 0  # stop (with a checkpoint) after this many steps of this invocation
    init_from: str = ""  # open_clip file / universal dir / megaclip checkpoint to start from
    patch_dropout: float = 0.0
    lock_image: bool = False
    lock_text: bool = False
    loss_chunk_size: int = LOSS_CHUNK_SIZE
    # "allgather": gather all features once; "stream": owners' blocks broadcast in turn, memory
    # independent of the global batch (see docs/loss.md)
    loss_mode: Literal["allgather", "stream"] = "allgather"
    # "clip": symmetric InfoNCE; "siglip": pairwise sigmoid with a learnable logit_bias, the
    # model's temperature and bias starting at siglip_init_scale / siglip_init_bias (the SigLIP
    # paper: log 10 and -10) unless the model config sets init_logit_bias itself
    loss: Literal["clip", "siglip"] = "clip"
    siglip_init_scale: float = math.log(10.0)
    siglip_init_bias: float = -10.0
    # init_from / resume from a checkpoint without logit_bias (a CLIP one) into a SigLIP run:
    # refused unless true, then the bias starts from its initial value
    new_logit_bias: bool = False
    tensorboard: bool = True
    dist_timeout_s: float = 600.0
    # refuse a layout the planner predicts will not fit this node (megaclip/train/preflight.py)
    memory_check: bool = True
    # ZeRO-Infinity: where a DeepSpeed JSON that offloads parameters to "nvme" keeps them (a
    # fast local disk; filled into its nvme_path, checked for free space)
    offload_dir: str = ""

    def __post_init__(self) -> None:
        check_at_least(
            "train", 1, steps=self.steps, log_every=self.log_every,
            loss_chunk_size=self.loss_chunk_size,
        )  # fmt: skip
        check_at_least(
            "train", 0, " (0 turns it off)", save_every=self.save_every,
            keep_last=self.keep_last, exit_after=self.exit_after,
        )  # fmt: skip
        check_finite("train.dist_timeout_s", self.dist_timeout_s, 0.0, low_open=True)
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ConfigError(f"train.patch_dropout must be in [0, 1), got {self.patch_dropout}")
        if self.lock_image and self.lock_text:
            raise ConfigError("train.lock_image and train.lock_text are both set: nothing to train")


@dataclass(frozen=True)
class RunConfig:
    """Everything `megaclip train` needs; the DeepSpeed JSON only adds engine options."""

    model: ClipConfig = field(default_factory=ClipConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=lambda: DataConfig(kind="synthetic"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    zeroshot: ZeroShotSection = field(default_factory=ZeroShotSection)
    deepspeed: str | None = None

    def __post_init__(self) -> None:
        self.parallel.check_model(self.model)


def run_config_from_dict(data: dict[str, Any], where: str = "config") -> RunConfig:
    """Validate a run mapping; ``model`` may be a preset name, a file path or a mapping."""
    data = dict(data)
    model = data.pop("model", "tiny")
    model_cfg = model_from_dict(model, f"{where}.model") if isinstance(model, dict) else None
    if model_cfg is None:
        if not isinstance(model, str):
            raise ConfigError(f"{where}.model: expected a preset name, file or mapping")
        model_cfg = resolve_model(model)
    cfg = from_dict(RunConfig, {**data, "model": model_cfg}, where)
    return with_loss_model(cfg)


def with_loss_model(cfg: RunConfig) -> RunConfig:
    """The run with a model that fits its loss: SigLIP gets a logit_bias (paper init)."""
    t, m = cfg.train, cfg.model
    if t.loss == "siglip" and m.init_logit_bias is None:
        scale = min(t.siglip_init_scale, m.max_logit_scale)
        m = replace(m, init_logit_scale=scale, init_logit_bias=t.siglip_init_bias)
        return replace(cfg, model=m)
    if t.loss == "clip" and m.init_logit_bias is not None:
        raise ConfigError(
            f"model '{m.name}' has a logit_bias (init_logit_bias={m.init_logit_bias}): it is a "
            "SigLIP model; set train.loss: siglip, or remove model.init_logit_bias"
        )
    return cfg


def load_run_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Load a run config file (or defaults) and apply ``key.sub=value`` overrides."""
    data = load_mapping(path) if path else {}
    data = apply_overrides(data, list(overrides))
    return run_config_from_dict(data, where=str(path or "config"))


def run_config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """Plain mapping (YAML-ready) of a resolved run config, as saved with each run."""
    return to_dict(cfg)
