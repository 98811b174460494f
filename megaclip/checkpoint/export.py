"""Export megaclip checkpoints to open_clip files and import open_clip files to fine-tune.

Both directions stream one tensor at a time (file formats: megaclip.checkpoint.openclip_io).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megaclip.checkpoint import mmap_io
from megaclip.checkpoint.openclip import (
    OPEN_CLIP_DIR_CONFIG,
    OPEN_CLIP_DIR_WEIGHTS,
    open_clip_dir_config,
    open_clip_entry,
    open_clip_shape,
)
from megaclip.checkpoint.openclip_io import OpenClipFile, write_open_clip_stream
from megaclip.checkpoint.reader import CheckpointReader, expected_shapes
from megaclip.checkpoint.stream import Spec
from megaclip.checkpoint.universal import (
    PARAM_DIR,
    UNIVERSAL_META,
    check_shapes,
    read_universal_meta,
    universal_model_config,
    write_universal,
)
from megaclip.config.model import ClipConfig, model_from_dict, resolve_model
from megaclip.config.parallel import ParallelConfig
from megaclip.errors import CheckpointError, ConfigError
from megaclip.model.naming import to_open_clip_key


@dataclass
class ModelSource:
    """The full tensors of a DeepSpeed or universal checkpoint, readable one at a time."""

    cfg: ClipConfig
    names: list[str]  # ClipModel names, in the order :meth:`values` yields them
    shapes: dict[str, tuple[int, ...]]
    dtype: torch.dtype
    values: Callable[[], Iterator[tuple[str, torch.Tensor]]]

    def open_clip_specs(self) -> list[Spec]:
        """(open_clip key, open_clip shape, dtype) of every tensor, in order."""
        return [
            (to_open_clip_key(n), open_clip_shape(n, self.shapes[n]), self.dtype)
            for n in self.names
        ]

    def open_clip_items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(open_clip key, tensor) pairs, streamed."""
        return (open_clip_entry(name, value) for name, value in self.values())


def model_source(ckpt: str | Path, *, fp32_master: bool = False) -> ModelSource:
    """A streaming :class:`ModelSource` over a checkpoint (any layout) or universal directory.

    ``fp32_master``: ZeRO's / the bf16 optimizer's fp32 master weights instead of the module
    weights in the training dtype (ZeRO-3 always gives the masters).
    """
    src = Path(ckpt)
    if src.is_dir() and (src / UNIVERSAL_META).is_file():
        record = read_universal_meta(src)

        def universal_values() -> Iterator[tuple[str, torch.Tensor]]:
            for name in record["params"]:
                entry = mmap_io.load(src / PARAM_DIR / f"{name}.pt")
                yield name, mmap_io.detached(entry["fp32"])

        return ModelSource(
            universal_model_config(record, str(src)),
            list(record["params"]),
            {n: tuple(s) for n, s in record["params"].items()},
            torch.float32,
            universal_values,
        )
    reader = CheckpointReader(src, fp32_master=fp32_master)

    def reader_values() -> Iterator[tuple[str, torch.Tensor]]:
        for name, entry in reader.entries():
            yield name, entry["fp32"]

    return ModelSource(
        reader.cfg,
        reader.names,
        {n: tuple(s) for n, s in reader.shapes.items()},
        reader.weight_dtype,
        reader_values,
    )


def export_open_clip(ckpt: str | Path, out: str | Path, *, fp32_master: bool = False) -> Path:
    """``megaclip convert CKPT --to open_clip``: one open_clip file from any layout's checkpoint.

    Streams: each full tensor is merged from the memory-mapped shards and written before the
    next is read, so memory stays about one tensor (plus the reader's read budget).
    """
    source = model_source(ckpt, fp32_master=fp32_master)
    return write_open_clip_stream(
        out, source.cfg, source.open_clip_specs(), source.open_clip_items()
    )


def export_open_clip_dir(
    ckpt: str | Path, out_dir: str | Path, *, fp32_master: bool = False
) -> Path:
    """``megaclip convert CKPT --to open_clip --out DIR``: an open_clip model directory."""
    out = Path(out_dir)
    export_open_clip(ckpt, out / OPEN_CLIP_DIR_WEIGHTS[0], fp32_master=fp32_master)
    cfg = model_source(ckpt, fp32_master=fp32_master).cfg
    text = json.dumps(open_clip_dir_config(cfg), indent=2) + "\n"
    (out / OPEN_CLIP_DIR_CONFIG).write_text(text, encoding="utf-8")
    return out


def read_full_model(
    ckpt: str | Path, *, fp32_master: bool = False
) -> tuple[ClipConfig, dict[str, torch.Tensor]]:
    """(ClipConfig, every full ClipModel-named tensor in memory): small models, eval, tests."""
    source = model_source(ckpt, fp32_master=fp32_master)
    return source.cfg, dict(source.values())


def import_open_clip(
    file: str | Path,
    out_dir: str | Path,
    *,
    model: str | None = None,
    tp: int = 1,
    pp: int = 1,
) -> Path:
    """``megaclip convert FILE --to megaclip``: an open_clip file -> a universal init directory.

    The model config comes from the file (megaclip exports) or ``model`` (a preset name or
    YAML file); ``tp`` / ``pp`` are checked against the model so a bad layout fails here.
    """
    with OpenClipFile(file) as src:
        cfg = _file_model(src.model_config, file, model)
        check_layout(cfg, tp, pp)
        check_shapes(src.shapes(), cfg, str(file))
        entries = ((name, {"fp32": src.get(name)}) for name in expected_shapes(cfg))
        return write_universal(out_dir, cfg, entries, step=0, source={"open_clip": str(file)})


def _file_model(config: dict[str, Any] | None, file: str | Path, model: str | None) -> ClipConfig:
    """The architecture of an open_clip file: ``model`` if given, else its embedded config."""
    if model is not None:
        try:
            return resolve_model(model)
        except ConfigError as err:
            raise CheckpointError(str(err)) from None
    if config is not None:
        try:
            return model_from_dict(config, where=f"{file} model_config")
        except ConfigError as err:
            raise CheckpointError(str(err)) from None
    raise CheckpointError(
        f"{file} does not say which architecture it holds: pass --model NAME (a preset such "
        "as ViT-B-32, or a model YAML file)"
    )


def check_layout(cfg: ClipConfig, tp: int, pp: int) -> None:
    """CheckpointError if model ``cfg`` cannot be split into ``tp`` x ``pp``."""
    try:
        ParallelConfig(tp=tp, pp=pp, dp=1).check_model(cfg)
    except ConfigError as err:
        raise CheckpointError(
            f"model '{cfg.name}' cannot take layout tp={tp} pp={pp}: {err}"
        ) from None
