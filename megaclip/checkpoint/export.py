"""Export megaclip checkpoints to open_clip files and import open_clip files to fine-tune.

Both directions stream one tensor at a time (file formats: megaclip.checkpoint.openclip_io).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megaclip.checkpoint import mmap_io
from megaclip.checkpoint.openclip import open_clip_entry, open_clip_shape
from megaclip.checkpoint.openclip_io import OpenClipFile, write_open_clip_stream
from megaclip.checkpoint.reader import CheckpointReader, expected_shapes
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


def export_open_clip(ckpt: str | Path, out: str | Path, *, fp32_master: bool = False) -> Path:
    """``megaclip convert CKPT --to open_clip``: one open_clip file from any layout's checkpoint.

    Streams: each full tensor is merged from the memory-mapped shards and written before the
    next is read. ``fp32_master``: export ZeRO's / the bf16 optimizer's fp32 master weights
    instead of the module weights in the training dtype (ZeRO-3 always exports the masters).
    """
    src = Path(ckpt)
    if src.is_dir() and (src / UNIVERSAL_META).is_file():
        record = read_universal_meta(src)
        cfg = universal_model_config(record, str(src))
        names = list(record["params"])
        shapes = {n: tuple(s) for n, s in record["params"].items()}
        dtype = torch.float32

        def values():
            for name in names:
                entry = mmap_io.load(src / PARAM_DIR / f"{name}.pt")
                yield name, mmap_io.detached(entry["fp32"])

    else:
        reader = CheckpointReader(src, fp32_master=fp32_master)
        cfg, names, dtype = reader.cfg, reader.names, reader.weight_dtype
        shapes = {n: tuple(s) for n, s in reader.shapes.items()}

        def values():
            for name, entry in reader.entries():
                yield name, entry["fp32"]

    specs = [(to_open_clip_key(n), open_clip_shape(n, shapes[n]), dtype) for n in names]
    tensors = (open_clip_entry(name, value) for name, value in values())
    return write_open_clip_stream(out, cfg, specs, tensors)


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
