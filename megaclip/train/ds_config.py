"""DeepSpeed JSON configs: load, check the sections megaclip reads, cross-check against megaclip's
layout, fill what they leave out from the one builder (megaclip.config.deepspeed)."""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megaclip.config.deepspeed import REFUSED_KEYS, deepspeed_config
from megaclip.config.parallel import ParallelConfig
from megaclip.config.schema import is_file
from megaclip.errors import ConfigError

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


def resolve_ds_config(
    ds: dict[str, Any], par: ParallelConfig, gradient_clipping: float | None = None
) -> dict[str, Any]:
    """Check ``ds`` against ``par`` (one clear error per conflict) and fill what it leaves out.

    Batch sizes may be omitted or "auto"; given numbers must equal megaclip's
    (train_batch_size = micro x grad-accum x dp). Precision and ZeRO stage, if set in the JSON,
    must match ``parallel.precision`` / ``parallel.zero_stage``. Every key the JSON leaves out
    comes from :func:`megaclip.config.deepspeed.deepspeed_config` (the one builder), so
    ``resolve_ds_config({}, par)`` is that builder's dict; ``optimizer`` / ``scheduler`` are
    refused. ``gradient_clipping`` (``optim.grad_clip``), when given, replaces the JSON's.
    """
    out = copy.deepcopy(ds)
    built = deepspeed_config(par, 0.0 if gradient_clipping is None else gradient_clipping)
    for key in _DS_BATCH_KEYS:
        got, want = out.get(key, "auto"), built[key]
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
    stage = out.get("zero_optimization", {}).get("stage", par.zero_stage)
    if stage != par.zero_stage:
        raise ConfigError(
            f"DeepSpeed config uses ZeRO stage {stage} but parallel.zero_stage is "
            f"{par.zero_stage}; make them agree"
        )
    # (ZeRO > 1 with pp > 1 is refused by ParallelConfig itself: the stages now agree.)
    if any(k in out for k in REFUSED_KEYS):
        raise ConfigError(
            "DeepSpeed config defines 'optimizer'/'scheduler': megaclip builds AdamW and its "
            "schedule from the training config (train.lr, train.warmup_steps...); remove them"
        )
    if gradient_clipping is not None:
        out["gradient_clipping"] = gradient_clipping
    for key, value in built.items():  # what the JSON leaves out, one section level deep
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict):
            for sub, v in value.items():
                out[key].setdefault(sub, v)
    return out


OFFLOAD_SECTIONS = ("offload_param", "offload_optimizer")


def nvme_offload(ds: Mapping[str, Any]) -> list[str]:
    """The ``zero_optimization`` offload sections of ``ds`` whose device is "nvme"."""
    zero = ds.get("zero_optimization") or {}
    return [k for k in OFFLOAD_SECTIONS if (zero.get(k) or {}).get("device") == "nvme"]


def fill_offload_paths(ds: dict[str, Any], offload_dir: str) -> dict[str, Any]:
    """``ds`` with the ``nvme_path`` of every NVMe offload section set from ``train.offload_dir``
    (which wins over a path in the JSON); ConfigError where a section has neither, or where the
    JSON offloads to NVMe below ZeRO-3 (DeepSpeed offloads parameters only with ZeRO-3)."""
    sections = nvme_offload(ds)
    if not sections:
        return ds
    zero = ds["zero_optimization"]
    if zero.get("stage") != 3:
        raise ConfigError(
            f"DeepSpeed config offloads {', '.join(sections)} to nvme with ZeRO stage "
            f"{zero.get('stage')}: NVMe offload (ZeRO-Infinity) needs zero_optimization.stage 3 "
            "(see ds_configs/zero3_nvme_fp32.json)"
        )
    if "offload_optimizer" in sections:
        raise ConfigError(
            "DeepSpeed config offloads the optimizer states to nvme: with DeepSpeed 0.19.8's "
            "optimizer swapper and megaclip's AdamW the token embedding's update comes out wrong "
            "(measured: its Adam moment 141% off a single-process reference), so megaclip "
            "refuses it; set offload_optimizer's device to cpu (ds_configs/zero3_nvme_fp32.json "
            "keeps the parameters on NVMe and the optimizer states in host memory)"
        )
    out = copy.deepcopy(ds)
    for key in sections:
        section = out["zero_optimization"][key]
        if offload_dir:
            section["nvme_path"] = offload_dir
        elif not section.get("nvme_path"):
            raise ConfigError(
                f"DeepSpeed config offloads {key} to nvme but names no path: set "
                "train.offload_dir=/a/local/disk (or nvme_path in the JSON)"
            )
    return out


def check_zero_section(ds: Mapping[str, Any], where: str = "DeepSpeed config") -> None:
    """ConfigError (one line per problem) unless DeepSpeed accepts ``zero_optimization``: its
    own schema (unknown keys, wrong types) read before any engine is built."""
    zero = ds.get("zero_optimization")
    if not zero:
        return
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    try:
        DeepSpeedZeroConfig(**zero)
    except ValidationError as err:
        problems = "; ".join(
            "zero_optimization." + ".".join(map(str, e["loc"])) + f": {e['msg']}"
            for e in err.errors()
        )
        raise ConfigError(f"{where}: {problems} (see DeepSpeed's ZeRO config docs)") from None
