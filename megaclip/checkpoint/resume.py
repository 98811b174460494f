"""Save and resume training through DeepSpeed, atomically, for every (tp, pp, dp, ZeRO) layout.

``save_checkpoint`` writes DeepSpeed's files (module, ZeRO/optimizer partitions, LR scheduler,
step counters) plus, per rank, the RNG states and the caller's ``client_state``, into
``ckpt_root/tmp-step-N``; then rank 0 writes ``megaclip_meta.json`` (model, layout, step, the
size of every file), fsyncs, renames the directory to ``step-N``, replaces ``latest`` and
rotates old checkpoints. Every rank calls both functions (they contain collectives).
:func:`check_checkpoint_inputs` checks, before any process group exists, the checkpoint a run
would resume from or start from (``train.init_from``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megaclip.checkpoint import mmap_io
from megaclip.checkpoint.atomic import (
    TMP_PREFIX,
    commit,
    complete_tags,
    fault_point,
    fsync_path,
    fsync_tree,
    read_latest,
    remove_stale,
    rotate,
    write_atomic,
)
from megaclip.checkpoint.engine_state import EngineState
from megaclip.checkpoint.layout import step_tag
from megaclip.checkpoint.meta import (
    META_FILE,
    check_same_model,
    file_manifest,
    layout_key,
    make_meta,
    read_meta,
    verify_files,
)
from megaclip.checkpoint.reader import load_file, rank_state_file, resolve_checkpoint_dir
from megaclip.config.train import RunConfig
from megaclip.errors import CheckpointError
from megaclip.parallel import collectives
from megaclip.parallel import deepspeed_compat as ds_compat
from megaclip.parallel.runtime import rng_state, set_rng_state

UNIVERSAL_SUBDIR = "universal"


def optimizer_param_names(clip_engine: EngineState) -> list[list[str]] | None:
    """Module parameter names per optimizer group, in the optimizer's index order.

    Needed for ZeRO-0, whose saved torch state dict knows indices only (fp32: the optimizer's
    own params; bf16: its ``fp16_groups``, whose fp32 copies it steps). ZeRO and the bf16
    optimizer record names themselves (``param_slice_mappings``). None if not resolvable.
    """
    opt = clip_engine.engine.optimizer
    names = {id(p): n for n, p in clip_engine.engine.module.named_parameters()}
    groups = ds_compat.lp_param_groups(opt)
    if groups is None:
        groups = [g["params"] for g in getattr(opt, "param_groups", None) or []]
    out = []
    for group in groups:
        ids = [id(p) for p in group]
        if not all(i in names for i in ids):
            return None
        out.append([names[i] for i in ids])
    return out


def _rank0() -> bool:
    return dist.get_rank() == 0


def _local_leader() -> bool:
    return int(os.environ.get("LOCAL_RANK", "0")) == 0


def _on_rank0(fn: Callable[[], Any]) -> Any:
    """Run ``fn`` on rank 0 only and broadcast its result; its failure raises on every rank."""
    box: list[Any] = [None, None]
    if _rank0():
        try:
            box = [fn(), None]
        except (CheckpointError, OSError) as err:
            box = [None, f"{type(err).__name__}: {err}" if isinstance(err, OSError) else str(err)]
    box = collectives.broadcast_object(box, src=0)  # the host (gloo) group
    if box[1] is not None:
        raise CheckpointError(box[1])
    return box[0]


def save_checkpoint(
    clip_engine: EngineState,
    ckpt_root: str | Path,
    step: int,
    client_state: dict[str, Any] | None = None,
    *,
    keep_last: int | None = None,
) -> Path:
    """Atomically save the full training state as ``ckpt_root/step-N``; returns that path.

    Collective: every rank must call it. A save killed at any point leaves the previous
    checkpoint complete and ``latest`` naming it. ``keep_last``: keep that many newest
    checkpoints (older ones are deleted only after the new one is published).
    """
    root = Path(ckpt_root)
    rank = dist.get_rank()

    def prepare() -> str:
        root.mkdir(parents=True, exist_ok=True)
        remove_stale(root)
        tag = step_tag(step, set(complete_tags(root)))
        (root / (TMP_PREFIX + tag)).mkdir()
        return tag

    tag = _on_rank0(prepare)
    tmp = root / (TMP_PREFIX + tag)
    clip_engine.engine.save_checkpoint(
        str(root), tag=tmp.name, client_state={"megaclip_step": int(step)}, save_latest=False
    )
    rank_file = tmp / rank_state_file(rank)
    rank_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "step": int(step),
            "rng": rng_state(),
            "client_state": client_state if client_state is not None else {},
            "optimizer_param_names": optimizer_param_names(clip_engine),
            "coords": {k: getattr(clip_engine.topo.coords, k) for k in ("pp", "dp", "tp")},
        },
        rank_file,
    )
    fsync_path(rank_file)
    collectives.barrier()
    if _local_leader():
        fsync_tree(tmp)  # the data of every process of this node
    collectives.barrier()

    def publish() -> None:
        fault_point("files", True)
        meta = make_meta(clip_engine.cfg, clip_engine.par, step, file_manifest(tmp))
        write_atomic(tmp / META_FILE, meta.to_json())
        fault_point("meta", True)
        commit(root, tmp.name, tag, fault=True)
        rotate(root, keep_last)
        fault_point("rotate", True)

    _on_rank0(publish)
    return root / tag


def load_latest(clip_engine: EngineState, ckpt_root: str | Path) -> dict[str, Any] | None:
    """Resume from the checkpoint ``ckpt_root/latest`` names; its client_state, or None if none.

    Collective. Same layout: DeepSpeed's loader (weights, optimizer, scheduler, counters) plus
    this rank's RNG states. Another (tp, pp, dp, ZeRO, precision): see :func:`load_checkpoint`.
    """
    root = Path(ckpt_root)
    tag = read_latest(root)
    if tag is None:
        return None
    path = root / tag
    if not path.is_dir():
        raise CheckpointError(f"{root}/latest names '{tag}' but {path} does not exist")
    return load_checkpoint(clip_engine, path)


def load_checkpoint(clip_engine: EngineState, ckpt_dir: str | Path) -> dict[str, Any]:
    """Resume from one checkpoint directory (a DeepSpeed ``step-N`` or a universal one).

    When the saved layout differs from this run's, the checkpoint is first converted (by rank
    0, once, into ``ckpt_dir/universal``) to the layout-free universal format and loaded from
    there: weights, Adam moments and step counters carry over; RNG states do not, and every
    rank receives rank 0's client_state.
    """
    from megaclip.checkpoint.universal import UNIVERSAL_META, load_universal

    ckpt_dir = Path(ckpt_dir)
    if (ckpt_dir / UNIVERSAL_META).is_file():
        return load_universal(clip_engine, ckpt_dir)
    meta = read_meta(ckpt_dir)
    check_same_model(meta.model, clip_engine.cfg, str(ckpt_dir))
    verify_files(ckpt_dir, meta)
    if layout_key(meta.parallel) != layout_key(clip_engine.par):
        return _load_resharded(clip_engine, ckpt_dir)
    try:
        with _mapped_loads(clip_engine.engine) as loaded:
            path, _ = clip_engine.engine.load_checkpoint(
                str(ckpt_dir.parent),
                tag=ckpt_dir.name,
                load_optimizer_states=True,
                load_lr_scheduler_states=True,
            )
            _own_optimizer_state(clip_engine.engine, loaded)
    except (RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(f"DeepSpeed could not load {ckpt_dir}: {err}") from None
    if path is None:
        raise CheckpointError(f"DeepSpeed found no checkpoint files in {ckpt_dir}")
    rank_state = load_file(ckpt_dir / rank_state_file(dist.get_rank()))
    set_rng_state(rank_state["rng"])
    clip_engine.step_count = meta.step
    return rank_state["client_state"]


@contextlib.contextmanager
def _mapped_loads(engine) -> Iterator[list[Any]]:
    """DeepSpeed's loads inside go through memory maps (no full copy of any file in memory).

    Yields the list of loaded objects; their pages are given back on exit. DeepSpeed copies the
    weights and fp32 partitions out of them; Adam's moments it adopts as they are (see
    :func:`_own_optimizer_state`).
    """
    loaded: list[Any] = []

    def load(path: str, map_location=None) -> Any:
        obj = mmap_io.load(path)
        loaded.append(obj)
        return obj

    try:
        with ds_compat.checkpoint_loads_through(engine, load):
            yield loaded
    finally:
        for obj in loaded:
            mmap_io.release_all(obj)
        loaded.clear()


def _own_optimizer_state(engine, loaded: list[Any]) -> None:
    """Copy optimizer-state tensors that still live in a loaded file's map into own memory."""
    ranges = sorted(
        (t.data_ptr(), t.data_ptr() + t.numel() * t.element_size())
        for obj in loaded
        for t in mmap_io.tensors(obj)
        if t.device.type == "cpu" and t.numel()
    )
    if not ranges:
        return

    def mapped(t: torch.Tensor) -> bool:
        p = t.data_ptr()
        return any(a <= p < b for a, b in ranges)

    opt = engine.optimizer
    bases = {id(o): o for o in (opt, ds_compat.base_optimizer(opt)) if o is not None}
    for base in bases.values():
        for state in getattr(base, "state", {}).values():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.device.type == "cpu" and mapped(value):
                    state[key] = mmap_io.detached(value)


def _load_resharded(clip_engine: EngineState, ckpt_dir: Path) -> dict[str, Any]:
    from megaclip.checkpoint.universal import UNIVERSAL_META, convert_to_universal, load_universal

    target = ckpt_dir / UNIVERSAL_SUBDIR

    def convert() -> None:
        if not (target / UNIVERSAL_META).is_file():
            convert_to_universal(ckpt_dir, target)

    try:
        _on_rank0(convert)
    except CheckpointError as err:
        raise CheckpointError(
            f"resuming {ckpt_dir} in another layout needs its universal form, which could not "
            f"be written ({err}); run `megaclip convert {ckpt_dir} --to universal --out DIR` "
            "and resume from DIR"
        ) from None
    return load_universal(clip_engine, target)


def check_checkpoint_inputs(cfg: RunConfig) -> None:
    """CheckpointError, before start-up, for the checkpoint the run would load.

    That is ``OUT/checkpoints/latest`` when resuming, else ``train.init_from`` (a megaclip
    checkpoint directory or root: its meta record, architecture and file sizes; other forms:
    existence). The loaders check again; this only moves the error before the process groups.
    """
    from megaclip.checkpoint.universal import UNIVERSAL_META

    def check_dir(path: Path) -> None:
        if (path / UNIVERSAL_META).is_file() or not (path / META_FILE).is_file():
            return  # universal layout / open_clip: checked by its loader
        meta = read_meta(path)
        check_same_model(meta.model, cfg.model, str(path), new_logit_bias=cfg.train.new_logit_bias)
        verify_files(path, meta)

    t = cfg.train
    root = Path(t.out_dir) / "checkpoints"
    tag = read_latest(root) if t.resume and root.is_dir() else None
    if tag is not None:
        if not (root / tag).is_dir():
            raise CheckpointError(
                f"{root}/latest names '{tag}' but {root / tag} does not exist: restore it, or "
                f"point {root}/latest at an older step-N directory"
            )
        check_dir(root / tag)
        return
    if t.init_from:
        path = Path(t.init_from)
        try:
            exists = path.exists()
        except OSError as err:  # e.g. a name longer than the file system allows
            raise CheckpointError(f"train.init_from {path}: {err.strerror}") from None
        if not exists:
            raise CheckpointError(f"train.init_from {path} does not exist")
        if path.is_dir() and not (path / UNIVERSAL_META).is_file():
            check_dir(resolve_checkpoint_dir(path))
