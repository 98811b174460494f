"""``megaclip_meta.json``: model config, layout, step and file manifest of one checkpoint."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megaclip.config.model import ClipConfig, model_from_dict
from megaclip.config.parallel import ParallelConfig
from megaclip.config.schema import to_dict
from megaclip.errors import CheckpointError, ConfigError

META_FILE = "megaclip_meta.json"
FORMAT = "megaclip-deepspeed"
VERSION = 1
# Fields that do not change the parameters' shapes or meaning.
_IGNORED_MODEL_FIELDS = ("name", "init_logit_scale")


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint holds: model, layout, step and the size of every file (a manifest)."""

    model: dict[str, Any]
    parallel: dict[str, Any]
    step: int
    files: dict[str, int] = field(default_factory=dict)
    deepspeed_version: str = ""
    format: str = FORMAT
    version: int = VERSION

    @property
    def model_config(self) -> ClipConfig:
        """The saved model configuration."""
        try:
            return model_from_dict(dict(self.model), where=f"{META_FILE} model")
        except ConfigError as err:
            raise CheckpointError(f"{META_FILE} holds an invalid model config: {err}") from None

    def to_json(self) -> str:
        """Pretty JSON text of this record."""
        return json.dumps(to_dict(self), indent=1, sort_keys=True) + "\n"


def make_meta(
    cfg: ClipConfig, par: ParallelConfig, step: int, files: dict[str, int]
) -> CheckpointMeta:
    """The meta record of a checkpoint of ``cfg`` trained on layout ``par`` at ``step``."""
    import deepspeed

    return CheckpointMeta(
        model=to_dict(cfg),
        parallel=to_dict(par),
        step=int(step),
        files=dict(sorted(files.items())),
        deepspeed_version=str(deepspeed.__version__),
    )


def read_meta(ckpt_dir: str | Path) -> CheckpointMeta:
    """Read and validate ``ckpt_dir/megaclip_meta.json`` (CheckpointError if absent or bad)."""
    path = Path(ckpt_dir) / META_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: {ckpt_dir} is not a complete megaclip checkpoint "
            "(a save may have been interrupted; load the previous one)"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); the file is damaged") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a megaclip checkpoint record (format {FORMAT})")
    try:
        return CheckpointMeta(**data)
    except TypeError as err:
        raise CheckpointError(f"{path}: unexpected fields ({err})") from None


def file_manifest(ckpt_dir: str | Path) -> dict[str, int]:
    """{relative path: size in bytes} of every regular file under ``ckpt_dir`` (meta excluded)."""
    root = Path(ckpt_dir)
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel != META_FILE:
                out[rel] = (Path(dirpath) / name).stat().st_size
    return out


def verify_files(ckpt_dir: str | Path, meta: CheckpointMeta) -> None:
    """Raise CheckpointError naming the first file of the manifest that is missing or truncated."""
    root = Path(ckpt_dir)
    for rel, size in meta.files.items():
        path = root / rel
        if not path.is_file():
            raise CheckpointError(
                f"checkpoint file {path} is missing; the checkpoint is incomplete"
            )
        got = path.stat().st_size
        if got != size:
            raise CheckpointError(
                f"checkpoint file {path} has {got} bytes, expected {size}: it is truncated or "
                "damaged; restore it or load an older checkpoint"
            )


def model_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """'field: saved -> current' for every architecture field that differs (pure)."""
    out = []

    def walk(a: Any, b: Any, path: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                if not path and key in _IGNORED_MODEL_FIELDS:
                    continue
                if not path and key == "init_logit_bias":  # its value is only an init
                    if (a.get(key) is None) != (b.get(key) is None):
                        out.append(f"logit_bias: {_has(a.get(key))} -> {_has(b.get(key))}")
                    continue
                walk(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        elif a != b and not (
            isinstance(a, float) and isinstance(b, float) and abs(a - b) <= 1e-9 * abs(b)
        ):
            out.append(f"{path}: {a} -> {b}")

    walk(saved, current, "")
    return out


def _has(value: Any) -> str:
    return "none" if value is None else "present"


NO_LOGIT_BIAS = "logit_bias: none -> present"


def check_same_model(
    saved: dict[str, Any], cfg: ClipConfig, where: str, *, new_logit_bias: bool = False
) -> None:
    """Raise CheckpointError if the saved model mapping's architecture is not ``cfg``'s.

    ``new_logit_bias``: a checkpoint without logit_bias (CLIP) may start a SigLIP model, whose
    bias then keeps its initial value.
    """
    # Fields added since the save (text.pool_type, ...) take their defaults; a saved config that
    # no longer validates is compared as stored (the differences name what is wrong).
    with contextlib.suppress(ConfigError):
        saved = to_dict(model_from_dict(saved, where=where))
    diffs = model_differences(saved, to_dict(cfg))
    if diffs == [NO_LOGIT_BIAS] and new_logit_bias:
        return
    if diffs == [NO_LOGIT_BIAS]:
        raise CheckpointError(
            f"{where} has no logit_bias (it was trained with the CLIP loss) but this SigLIP run "
            "needs one; to start SigLIP from it, set train.new_logit_bias=true (the bias then "
            "starts at train.siglip_init_bias), or resume a SigLIP checkpoint"
        )
    if diffs:
        shown = "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")
        raise CheckpointError(
            f"{where} holds a different architecture (model '{saved.get('name')}') than "
            f"this run's model '{cfg.name}': {shown}. Use the same model config to load it"
        )


def layout_key(par: dict[str, Any] | ParallelConfig) -> tuple:
    """What DeepSpeed's own loader needs unchanged: (tp, pp, dp, zero stage, precision)."""
    d = to_dict(par) if isinstance(par, ParallelConfig) else par
    return (d["tp"], d["pp"], d["dp"], d["zero_stage"], d["precision"])
