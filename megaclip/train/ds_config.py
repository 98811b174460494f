"""DeepSpeed JSON configs: load, check the sections megaclip reads, cross-check against megaclip's
layout, fill batch sizes."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megaclip.config.parallel import ParallelConfig
from megaclip.config.schema import is_file
from megaclip.errors import ConfigError
from megaclip.perf.memory import BUCKET_ELEMS, ZERO3_GRAD_BUFFER_ELEMS, ZERO3_LIVE_ELEMS

_PRECISION_KEYS = {"bf16": "bf16", "fp16": "fp16"}


def load_ds_config(source: str | Path | dict[str, Any] | None) -> dict[str, Any]:
    """A DeepSpeed config from a JSON file, a dict, or None (empty: everything from megaclip)."""
    if source is None:
        return {}
    if isinstance(source, dict):
        return copy.deepcopy(source)
    path = Path(source)
    if not is_file(path):
        raise ConfigError(f"DeepSpeed config not found: {path} (see ds_configs/ for examples)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{path}: not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


_DS_SECTIONS = ("bf16", "fp16", "zero_optimization", "activation_checkpointing")
_DS_BATCH_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
)


def check_deepspeed_sections(ds: Mapping[str, Any], where: str = "DeepSpeed config") -> None:
    """ConfigError unless the DeepSpeed keys megaclip reads have the shapes it expects.

    Sections (``bf16``, ``fp16``, ``zero_optimization``, ``activation_checkpointing``) must
    be objects, ``enabled`` a boolean, ``stage`` an integer, batch sizes integers or "auto".
    """
    for key in _DS_SECTIONS:
        if key in ds and not isinstance(ds[key], dict):
            raise ConfigError(
                f"{where}: '{key}' must be a JSON object such as {{\"enabled\": true}}, "
                f"got {ds[key]!r}"
            )
    for key in ("bf16", "fp16"):
        enabled = ds.get(key, {}).get("enabled", False)
        if not isinstance(enabled, bool):
            raise ConfigError(f"{where}: {key}.enabled must be true or false, got {enabled!r}")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int):
        raise ConfigError(f"{where}: zero_optimization.stage must be 0-3, got {stage!r}")
    for key in _DS_BATCH_KEYS:
        value = ds.get(key, "auto")
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f'{where}: {key} must be an integer or "auto", got {value!r}')


def ds_precision(ds: dict[str, Any]) -> str:
    """'bf16', 'fp16' or 'fp32' as enabled in a DeepSpeed config."""
    enabled = [k for k in ("bf16", "fp16") if ds.get(k, {}).get("enabled", False)]
    if len(enabled) > 1:
        raise ConfigError("DeepSpeed config enables both bf16 and fp16: enable at most one")
    return enabled[0] if enabled else "fp32"


def zero_memory_defaults(par: ParallelConfig) -> dict[str, int]:
    """``zero_optimization`` settings megaclip fills in when the JSON leaves them out.

    Bucket sizes: :data:`BUCKET_ELEMS`. ZeRO-3: DeepSpeed 0.19.8 allocates its fp32 gradient
    buffer with the *full* (unpartitioned) size of the largest optimizer sub-group, i.e. 4 bytes
    per model parameter on every rank with its default ``sub_group_size`` of 1e9; sub-groups of
    ``ZERO3_GRAD_BUFFER_ELEMS / dp`` partition elements cap it at 4 x 1e8 bytes. Its default
    ``stage3_max_live_parameters`` / ``max_reuse_distance`` of 1e9 keep up to 1e9 gathered
    parameters alive between uses (the whole of ViT-L, measured +0.9 GiB per rank from step 2):
    :data:`ZERO3_LIVE_ELEMS` bounds the gathered working set instead.
    """
    if par.zero_stage == 0:
        return {}
    out = {"reduce_bucket_size": BUCKET_ELEMS, "allgather_bucket_size": BUCKET_ELEMS}
    if par.zero_stage == 3:
        out["sub_group_size"] = max(1, ZERO3_GRAD_BUFFER_ELEMS // par.dp)
        out["stage3_prefetch_bucket_size"] = BUCKET_ELEMS
        out["stage3_max_live_parameters"] = ZERO3_LIVE_ELEMS
        out["stage3_max_reuse_distance"] = ZERO3_LIVE_ELEMS
    return out


def resolve_ds_config(
    ds: dict[str, Any], par: ParallelConfig, gradient_clipping: float | None = None
) -> dict[str, Any]:
    """Check ``ds`` against ``par`` (one clear error per conflict) and fill what it leaves out.

    Batch sizes may be omitted or "auto"; given numbers must equal megaclip's
    (train_batch_size = micro x grad-accum x dp). Precision and ZeRO stage, if set in the JSON,
    must match ``parallel.precision`` / ``parallel.zero_stage``; if absent they are filled in.
    """
    out = copy.deepcopy(ds)
    expected = {
        "train_micro_batch_size_per_gpu": par.micro_batch_size,
        "gradient_accumulation_steps": par.grad_accum_steps,
        "train_batch_size": par.global_batch_size,
    }
    for key, want in expected.items():
        got = out.get(key, "auto")
        if got != "auto" and got != want:
            raise ConfigError(
                f"DeepSpeed config sets {key}={got} but megaclip's layout gives {want} "
                f"(micro_batch_size={par.micro_batch_size} x grad_accum_steps="
                f'{par.grad_accum_steps} x dp={par.dp}); remove the key or set it to "auto"'
            )
        out[key] = want
    if any(k in out for k in _PRECISION_KEYS):
        got = ds_precision(out)
        if got != par.precision:
            raise ConfigError(
                f"DeepSpeed config trains in {got} but parallel.precision is {par.precision}; "
                "make them agree"
            )
    elif par.precision != "fp32":
        out[par.precision] = {"enabled": True}
    if par.precision == "fp16":
        out["fp16"].setdefault("loss_scale", 0)  # dynamic loss scaling
    zero = out.setdefault("zero_optimization", {})
    stage = zero.get("stage", par.zero_stage)
    if stage != par.zero_stage:
        raise ConfigError(
            f"DeepSpeed config uses ZeRO stage {stage} but parallel.zero_stage is "
            f"{par.zero_stage}; make them agree"
        )
    zero["stage"] = stage
    for key, value in zero_memory_defaults(par).items():
        zero.setdefault(key, value)
    if par.pp > 1 and stage > 1:
        raise ConfigError(
            f"ZeRO stage {stage} is incompatible with pipeline parallelism (pp={par.pp})"
        )
    if "optimizer" in out or "scheduler" in out:
        raise ConfigError(
            "DeepSpeed config defines 'optimizer'/'scheduler': megaclip builds AdamW and its "
            "schedule from the training config (train.lr, train.warmup_steps...); remove them"
        )
    if gradient_clipping is not None:
        out["gradient_clipping"] = gradient_clipping
    # DeepSpeed 0.19 silently defaults to clipping at 1.0: always make it explicit.
    out.setdefault("gradient_clipping", 0.0)
    out.setdefault("steps_per_print", 10**9)
    out.setdefault("wall_clock_breakdown", False)
    return out
