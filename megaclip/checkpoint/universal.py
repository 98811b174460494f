"""The layout-free "universal" format, and loading full tensors into an engine of any layout.

A universal checkpoint is a directory::

    megaclip_universal.json   model config, step, Adam step, source layout, parameter list
    state.pt                  LR scheduler state, engine counters, client states (optional)
    params/<name>.pt          {"fp32": full tensor, "exp_avg": ..., "exp_avg_sq": ...}

with ClipModel parameter names and full (unsharded) fp32 tensors. One file per parameter lets
each rank read only the parameters of its own pipeline stage. Loading cuts each tensor to this
rank's TP shard (:func:`megaclip.parallel.shapes.shard`) and writes it into the module weights,
the ZeRO / bf16 fp32 master partition and the Adam state of the partition, using DeepSpeed's
fragment addresses (through :mod:`megaclip.parallel.deepspeed_compat`, the fence around
DeepSpeed's internals), so every ZeRO stage and pipeline layout works.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from megaclip.checkpoint import mmap_io
from megaclip.checkpoint.atomic import fsync_tree
from megaclip.checkpoint.engine_state import EngineState
from megaclip.checkpoint.meta import check_same_model
from megaclip.checkpoint.openclip_io import OpenClipFile
from megaclip.checkpoint.reader import (
    MASTER,
    MOMENTS,
    CheckpointReader,
    expected_shapes,
    load_file,
)
from megaclip.config.model import ClipConfig, model_from_dict
from megaclip.config.schema import to_dict
from megaclip.errors import CheckpointError, ConfigError
from megaclip.model.naming import strip_prefix
from megaclip.parallel import collectives
from megaclip.parallel import deepspeed_compat as ds_compat
from megaclip.parallel.shapes import shard
from megaclip.parallel.sharding import tp_partition

UNIVERSAL_META = "megaclip_universal.json"
UNIVERSAL_FORMAT = "megaclip-universal"
PARAM_DIR = "params"
STATE_FILE = "state.pt"

Entry = dict[str, torch.Tensor]  # "fp32" (+ moments) -> full tensor
# names -> (name, entry) for those names, in any order: where apply_full_state reads from
Source = Callable[[list[str]], Iterator[tuple[str, Entry]]]


def write_universal(
    out_dir: str | Path,
    cfg: ClipConfig,
    entries: Iterable[tuple[str, Entry]] | Mapping[str, torch.Tensor],
    *,
    with_moments: bool = False,
    step: int = 0,
    adam_step: int | None = None,
    state: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
) -> Path:
    """Write a universal checkpoint from (name, {"fp32", moments...}) entries, one at a time.

    Atomic: written to ``out_dir.tmp-<pid>`` and renamed. ``with_moments``: every entry holds
    Adam's ``exp_avg`` / ``exp_avg_sq`` too (frozen parameters: zeros). A mapping of name ->
    tensor stands for fp32 entries without moments.
    """
    if isinstance(entries, Mapping):
        entries = ((name, {"fp32": value}) for name, value in entries.items())
    out = Path(out_dir)
    if out.exists():
        raise CheckpointError(f"{out} already exists; choose another --out or remove it")
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / PARAM_DIR).mkdir(parents=True)
    shapes: dict[str, list[int]] = {}
    for name, entry in entries:
        record = {"fp32": entry["fp32"].detach().float().contiguous()}
        if with_moments:
            for key in MOMENTS:
                value = entry.get(key)
                record[key] = (
                    torch.zeros_like(record["fp32"])
                    if value is None
                    else value.detach().float().contiguous()
                )
        torch.save(record, tmp / PARAM_DIR / f"{name}.pt")
        shapes[name] = list(record["fp32"].shape)
    if state is not None:
        torch.save(state, tmp / STATE_FILE)
    meta = {
        "format": UNIVERSAL_FORMAT,
        "version": 1,
        "model": to_dict(cfg),
        "step": int(step),
        "adam_step": adam_step,
        "has_optimizer": with_moments,
        "source": source or {},
        "params": shapes,
    }
    (tmp / UNIVERSAL_META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    fsync_tree(tmp)
    os.rename(tmp, out)
    return out


def read_universal_meta(path: str | Path) -> dict[str, Any]:
    """The record of a universal checkpoint (CheckpointError if ``path`` is not one)."""
    meta_path = Path(path) / UNIVERSAL_META
    if not meta_path.is_file():
        raise CheckpointError(
            f"{path} is not a megaclip universal checkpoint (no {UNIVERSAL_META})"
        )
    try:
        record = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_path} is not valid JSON ({err})") from None
    if record.get("format") != UNIVERSAL_FORMAT:
        raise CheckpointError(f"{meta_path} is not a megaclip universal checkpoint record")
    return record


def universal_model_config(record: dict[str, Any], where: str) -> ClipConfig:
    """The model config a universal record holds."""
    try:
        return model_from_dict(dict(record["model"]), where=f"{where} model")
    except (ConfigError, KeyError) as err:
        raise CheckpointError(f"{where}: invalid model config ({err})") from None


def convert_to_universal(ckpt: str | Path, out_dir: str | Path) -> Path:
    """Offline: a DeepSpeed checkpoint of any layout -> universal (fp32 masters + Adam moments).

    Streams one parameter at a time from the memory-mapped shards.
    """
    reader = CheckpointReader(ckpt, fp32_master=True)
    extra = reader.training_state()
    return write_universal(
        out_dir,
        reader.cfg,
        reader.entries((MASTER, *MOMENTS)),
        with_moments=True,
        step=reader.meta.step,
        adam_step=reader.adam_step(),
        state={
            "lr_scheduler": extra["lr_scheduler"],
            "engine": extra["engine"],
            "client_states": extra["client_states"],
        },
        source={"parallel": reader.meta.parallel, "checkpoint": str(ckpt)},
    )


def _universal_source(path: Path, keys: tuple[str, ...]) -> Source:
    """Entries of a universal directory: one memory-mapped file per parameter, copied out."""

    def entries(names: list[str]) -> Iterator[tuple[str, Entry]]:
        for name in names:
            file = path / PARAM_DIR / f"{name}.pt"
            entry = mmap_io.load(file)
            missing = [k for k in keys if k not in entry]
            if missing:
                raise CheckpointError(f"{file} lacks '{missing[0]}'")
            yield name, {k: mmap_io.detached(entry[k]) for k in keys}

    return entries


def load_universal(
    clip_engine: EngineState,
    path: str | Path,
    *,
    weights_only: bool = False,
    new_logit_bias: bool = False,
) -> dict[str, Any]:
    """Load a universal checkpoint into a running engine of any layout; rank 0's client_state.

    Collective. Weights always; unless ``weights_only``, also the Adam moments and step, the LR
    scheduler, DeepSpeed's step counters and ``clip_engine.step_count``.
    """
    path = Path(path)
    record = read_universal_meta(path)
    check_same_model(record["model"], clip_engine.cfg, str(path), new_logit_bias=new_logit_bias)
    with_opt = not weights_only and record.get("has_optimizer", False)
    keys = ("fp32", *MOMENTS) if with_opt else ("fp32",)
    apply_full_state(
        clip_engine,
        _universal_source(path, keys),
        skip=_new_params(record["params"], new_logit_bias),
        moments=with_opt,
        adam_step=record.get("adam_step"),
    )
    if weights_only:
        return {}
    state = load_file(path / STATE_FILE) if (path / STATE_FILE).is_file() else {}
    if state.get("lr_scheduler") is not None and clip_engine.engine.lr_scheduler is not None:
        sched = clip_engine.engine.lr_scheduler
        sched.load_state_dict(state["lr_scheduler"])
        for group, lr in zip(sched.optimizer.param_groups, sched.get_last_lr()):
            group["lr"] = lr
    ds_compat.set_engine_counters(clip_engine.engine, state.get("engine") or {})
    clip_engine.step_count = int(record.get("step", 0))
    clients = state.get("client_states") or {}
    return clients.get(0, {}) if clients else {}


def _new_params(available, new_logit_bias: bool) -> frozenset[str]:
    """Parameters that keep their initial value: SigLIP's bias, when allowed and absent."""
    if new_logit_bias and "logit_bias" not in available:
        return frozenset({"logit_bias"})
    return frozenset()


def initialize_from(
    clip_engine: EngineState, path: str | Path, *, new_logit_bias: bool = False
) -> None:
    """Replace the engine's initial weights (all ranks, any layout) by those of ``path``.

    ``path``: a universal directory (e.g. from ``megaclip convert --to megaclip``), a megaclip
    DeepSpeed checkpoint (root or step directory, any layout; fp32 masters), or an open_clip
    file (.pt / .bin / .safetensors, bare or wrapped). Optimizer state stays fresh. Collective.
    ``new_logit_bias``: a source without logit_bias (CLIP) may start a SigLIP model.
    """
    path = Path(path)
    cfg, allow = clip_engine.cfg, new_logit_bias
    if path.is_dir() and (path / UNIVERSAL_META).is_file():
        load_universal(clip_engine, path, weights_only=True, new_logit_bias=allow)
        return
    if path.is_dir():
        reader = CheckpointReader(path, fp32_master=True)
        check_same_model(reader.meta.model, cfg, str(path), new_logit_bias=allow)
        apply_full_state(
            clip_engine,
            lambda names: reader.entries(names=names),
            moments=False,
            skip=_new_params(reader.names, allow),
        )
        return
    with OpenClipFile(path) as src:
        if src.model_config is not None:
            check_same_model(src.model_config, cfg, str(path), new_logit_bias=allow)
        skip = _new_params(src.shapes(), allow)
        check_shapes(src.shapes(), cfg, str(path), optional=skip)
        apply_full_state(
            clip_engine,
            lambda names: ((n, {MASTER: src.get(n)}) for n in names),
            moments=False,
            skip=skip,
        )


def check_shapes(
    params: Mapping[str, torch.Tensor | torch.Size],
    cfg: ClipConfig,
    where: str,
    optional: frozenset[str] = frozenset(),
) -> None:
    """CheckpointError unless ``params`` (tensors or shapes) match ``cfg``'s parameters."""
    want = {k: v for k, v in expected_shapes(cfg).items() if k not in optional}
    missing = sorted(set(want) - set(params))
    if missing:
        raise CheckpointError(
            f"{where} lacks parameter {missing[0]} of model '{cfg.name}' "
            f"({len(missing)} missing): is it a checkpoint of another architecture?"
        )
    for name, shape in want.items():
        value = params[name]
        got = tuple(value if isinstance(value, torch.Size) else value.shape)
        if got != tuple(shape):
            raise CheckpointError(
                f"{where}: {name} has shape {got} but model '{cfg.name}' needs {tuple(shape)}; "
                "it is a checkpoint of another architecture (pass the matching --model)"
            )


# ------------------------------------------------------------------ loading into an engine


def _ensure_state(base: torch.optim.Optimizer, flat: torch.Tensor, adam_step: int) -> dict:
    state = base.state[flat]
    for key in MOMENTS:
        if key not in state:
            state[key] = torch.zeros_like(flat, memory_format=torch.preserve_format)
    state["step"] = torch.tensor(float(adam_step), dtype=torch.float32)
    return state


def _zero3_piece(full: torch.Tensor, rank: int, part: int) -> torch.Tensor:
    """DP rank ``rank``'s ZeRO-3 partition: elements [rank*part, (rank+1)*part), zero-padded."""
    flat = full.flatten()
    piece = torch.zeros(part, dtype=flat.dtype)
    start = rank * part
    n = max(0, min(part, flat.numel() - start))
    piece[:n] = flat[start : start + n]
    return piece


@torch.no_grad()
def apply_full_state(
    clip_engine: EngineState,
    source: Source,
    *,
    moments: bool,
    adam_step: int | None = None,
    skip: frozenset[str] = frozenset(),
) -> None:
    """Write the full tensors ``source(names)`` yields into this rank's weights (+ Adam state).

    ``skip``: names left at their current (initial) value.

    Only the names of this rank's own parameters (its pipeline stage) are asked for, and one
    full tensor at a time is held.

    For each parameter: local = shard(full, dim, stride, tp_rank, tp); written to the module
    (training dtype), to the fp32 master (ZeRO-1/2, bf16: its fp32 fragment; ZeRO-3: this
    rank's partition) and, with ``moments``, to exp_avg / exp_avg_sq of the same fragment.
    """
    engine = clip_engine.engine
    tp_rank, tp = clip_engine.topo.coords.tp, clip_engine.par.tp
    base = ds_compat.base_optimizer(engine.optimizer)
    step = int(adam_step or 0)
    if moments:
        # The fp32 partitions Adam steps on (ZeRO-3 keeps them out of param_groups between steps).
        flats = ds_compat.zero3_flat_groups(engine.optimizer)
        if flats is None:
            flats = [flat for group in base.param_groups for flat in group["params"]]
        for flat in flats:
            _ensure_state(base, flat, step)
    masters = ds_compat.unfused_fp32_masters(engine.optimizer)
    mine = {
        strip_prefix(n): (n, p)
        for n, p in engine.module.named_parameters()
        if strip_prefix(n) not in skip
    }
    for canon, entry in source(list(mine)):
        name, param = mine.pop(canon)
        dim, stride = tp_partition(name)
        local = {
            k: (v if dim is None else shard(v, dim, stride, tp_rank, tp)).float()
            for k, v in entry.items()
        }
        want = tuple(getattr(param, "ds_shape", param.shape))
        if tuple(local["fp32"].shape) != want:
            raise CheckpointError(
                f"parameter {canon}: TP shard of shape {tuple(local['fp32'].shape)} does not fit "
                f"this rank's {want}"
            )
        if ds_compat.is_zero3_param(param):  # ZeRO-3: this rank's partition of weight, master
            part = ds_compat.zero3_partition_numel(param)
            rank = clip_engine.topo.coords.dp
            piece = _zero3_piece(local["fp32"], rank, part)
            ds_compat.write_zero3_param(param, piece, local["fp32"])
            if param.requires_grad:
                ds_compat.set_zero3_master(param, piece)
                if moments:
                    for key in MOMENTS:
                        piece = _zero3_piece(local[key], rank, part)
                        ds_compat.set_zero3_moment(param, piece, key)
            continue
        param.data.copy_(local["fp32"].to(param.device, param.dtype))
        frag = ds_compat.fp32_fragment(param)
        if frag is not None:  # ZeRO-1/2 or bf16 optimizer: fp32 fragment of this rank
            frag.master.data.copy_(local["fp32"].flatten().narrow(0, frag.lp_start, frag.lp_numel))
            if moments:
                flat = base.param_groups[frag.group]["params"][0]
                state = base.state[flat]
                for key in MOMENTS:
                    src = local[key].flatten().narrow(0, frag.lp_start, frag.lp_numel)
                    state[key].narrow(0, frag.hp_start, frag.hp_numel).copy_(src)
        elif id(param) in masters:  # ZeRO-0 bf16: a separate fp32 copy per parameter
            master = masters[id(param)]
            master.data.copy_(local["fp32"].to(master.device).view_as(master))
            if moments:
                for key in MOMENTS:
                    base.state[master][key].copy_(local[key].to(master.device).view_as(master))
        elif moments and not ds_compat.has_hp_mapping(param) and param in base.state:
            state = base.state[param]  # plain optimizer over the module's own parameters
            for key in MOMENTS:
                state[key].copy_(local[key].to(param.device).view_as(param))
    if mine:
        raise CheckpointError(f"the checkpoint holds no value for parameter {sorted(mine)[0]}")
    collectives.barrier()
