"""Offline reader of megaclip's DeepSpeed checkpoints: one process, no process groups.

Merges every layout's files into full (unsharded) tensors keyed by ClipModel parameter names:

- ZeRO partitions over DP: ZeRO-1/2 and the bf16 optimizer store, per DP rank, flat fp32
  partitions with ``param_slice_mappings`` (name -> (start, numel) in that partition); a
  parameter is the concatenation of its fragments in DP-rank order. ZeRO-3 splits every
  parameter into ceil(numel / dp) elements per rank, laid out in ``param_shapes`` order.
- pipeline stages: layer ``s`` of the PipelineModule is stage ``s``; names are disjoint;
- TP shards: :func:`megaclip.parallel.sharding.tp_partition` (by name) and
  :func:`megaclip.parallel.shapes.unshard`.
Adam moments (``exp_avg``, ``exp_avg_sq``) live in the same flat layout as the fp32 masters.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megaclip.checkpoint import mmap_io
from megaclip.checkpoint.atomic import read_latest
from megaclip.checkpoint.layout import ShardFiles, zero3_partition_numel
from megaclip.checkpoint.meta import META_FILE, CheckpointMeta, read_meta, verify_files
from megaclip.config.model import ClipConfig
from megaclip.errors import CheckpointError
from megaclip.model.naming import strip_prefix
from megaclip.parallel.shapes import unshard
from megaclip.parallel.sharding import tp_partition

MOMENTS = ("exp_avg", "exp_avg_sq")
RANK_DIR = "megaclip_rank_state"


def rank_state_file(rank: int) -> str:
    """Relative path of the per-rank state (RNG, client state, optimizer names) of ``rank``."""
    return f"{RANK_DIR}/rank_{rank:05d}.pt"


@dataclass
class FullState:
    """Full (TP/PP/DP-merged) tensors of a checkpoint, keyed by ClipModel parameter names."""

    meta: CheckpointMeta
    params: dict[str, torch.Tensor]
    moments: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # key -> name -> t
    adam_step: int | None = None
    lr_scheduler: dict[str, Any] | None = None
    engine_state: dict[str, Any] = field(default_factory=dict)
    client_states: dict[int, Any] = field(default_factory=dict)


def expected_shapes(cfg: ClipConfig) -> dict[str, torch.Size]:
    """{ClipModel parameter name: full shape} of ``cfg`` (built on the meta device, no memory)."""
    from megaclip.model.clip import ClipModel

    with torch.device("meta"):
        model = ClipModel(cfg)
    return {name: p.shape for name, p in model.named_parameters()}


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """A checkpoint directory: ``path`` itself, or the one ``path/latest`` names."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    tag = read_latest(path)
    if tag is not None:
        if not (path / tag).is_dir():
            raise CheckpointError(f"{path}/latest names '{tag}' but {path / tag} does not exist")
        return path / tag
    raise CheckpointError(
        f"{path} is neither a megaclip checkpoint (no {META_FILE}) nor a checkpoint root "
        "(no 'latest' file)"
    )


def load_file(path: Path) -> Any:
    """torch.load on CPU; a missing or unreadable file raises CheckpointError naming it."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} is missing; the checkpoint is incomplete")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise CheckpointError(
            f"checkpoint file {path} cannot be read ({type(err).__name__}): it is truncated or "
            "damaged"
        ) from None


#: Bytes of full tensors read per scope of memory-mapped files (pages released after each scope).
READ_BUDGET = 256 << 20
#: Value kinds a reader returns: fp32 master weights, module weights (training dtype), moments.
MASTER, MODULE = "fp32", "module"


def stage_names(cfg: ClipConfig, pp: int, stage: int) -> list[str]:
    """ClipModel names of the parameters pipeline stage ``stage`` of ``pp`` holds, in order."""
    from megaclip.model.clip import ClipStage, Span

    if pp == 1:
        span = Span.whole(cfg)
    else:
        from megaclip.pipeline.partition import partition

        span = partition(cfg, pp)[stage].span
    with torch.device("meta"):
        module = ClipStage(cfg, span)
    return [name for name, _ in module.named_parameters()]


class _Files:
    """The files of one read scope: memory-mapped on first use, their pages released at close."""

    def __init__(self, root: Path) -> None:
        self.root, self.loaded = root, {}

    def get(self, rel: str) -> Any:
        if rel not in self.loaded:
            self.loaded[rel] = mmap_io.load(self.root / rel)
        return self.loaded[rel]

    def close(self) -> None:
        for obj in self.loaded.values():
            mmap_io.release_all(obj)
        self.loaded.clear()


def _take(src: torch.Tensor) -> torch.Tensor:
    """A copy of (a slice of) a mapped tensor in ordinary memory; the source pages released."""
    return mmap_io.detached(src)


class _Shard:
    """Reads the tensors of one (stage, TP rank) model shard, merged over its DP ranks.

    DeepSpeed 0.19 optimizers and where they keep fp32 masters and Adam moments:
    ZeRO-1/2, ZeRO-0 bf16 under the pipeline (BF16_Optimizer): flat partitions in
    ``[bf16_]zero_pp_rank_D_mp_rank_MM_optim_states.pt`` with ``param_slice_mappings``;
    ZeRO-3: flat partitions in the same files, laid out by ``param_shapes``; ZeRO-0 bf16 without
    pipeline: per-parameter fp32 copies (``fp32_groups``) in the model-states file; ZeRO-0 fp32:
    the module itself, torch AdamW state in the model-states file. Frozen parameters
    (``train.lock_image/text``) have no master: their module weights (ZeRO-3: the
    ``frozen_param_fragments``) are returned, with zero moments.
    """

    def __init__(self, root: Path, meta: CheckpointMeta, stage: int, tp_rank: int) -> None:
        par = meta.parallel
        self.root, self.par, self.manifest = root, par, meta.files
        self.files = ShardFiles(stage, tp_rank, par["tp"], par["pp"])
        self.zero, self.dp = par["zero_stage"], par["dp"]
        self.where = f"{root} (stage {stage}, tp rank {tp_rank})"
        self.ms_rel = self.files.model_states(self.zero)
        self.module_rel = self.files.layer_states() if self.files.pp > 1 else self.ms_rel
        f = _Files(root)
        try:
            ms = f.get(self.ms_rel)
            shapes = [dict(g) for g in ms.get("param_shapes") or []]
            self.frozen_shapes = {
                strip_prefix(k): (k, s) for k, s in (ms.get("frozen_param_shapes") or {}).items()
            }
            opt = ms.get("optimizer") or {}
            self.unfused = "fp32_groups" in opt
            if self.zero == 3:
                module = {}
            elif self.files.pp > 1:
                module = f.get(self.module_rel)
            else:
                module = ms.get("module") or {}
            self.module_names = {strip_prefix(k): k for k in (module or {})}
        finally:
            f.close()
        # (group, ds name, shape, offset in the ZeRO-3 flat partition) of each trainable param
        self.groups: dict[str, tuple[int, str, torch.Size, int]] = {}
        for g, group in enumerate(shapes):
            offset = 0
            for k, shape in group.items():
                self.groups[strip_prefix(k)] = (g, k, shape, offset)
                offset += zero3_partition_numel(shape.numel(), self.dp)
        self.kind = (
            "zero3"
            if self.zero == 3
            else "partitioned"
            if self.optim_rel(0) is not None
            else "unfused"
            if self.unfused
            else "plain"
        )
        if self.kind == "unfused" and self.par["precision"] == "fp32":
            self.kind = "plain"
        if self.kind == "plain" and self.par["precision"] != "fp32":
            raise CheckpointError(
                f"{root}: the {self.par['precision']} ZeRO-0 optimizer state of this "
                "checkpoint is not in a format megaclip can read (no fp32 master copies found)"
            )
        self._opt_names: list[str] | None = None

    def optim_rel(self, dp_rank: int) -> str | None:
        """This shard's partition file of ``dp_rank`` (bf16_ or plain prefix), None if none."""
        for bf16 in (True, False):
            name = self.files.optim_states(dp_rank, bf16)
            if name in self.manifest:
                return name
        return None

    def _optim(self, f: _Files, dp_rank: int) -> dict:
        rel = self.optim_rel(dp_rank)
        if rel is None:
            want = self.files.optim_states(dp_rank)
            raise CheckpointError(f"checkpoint file {self.root / want} is missing")
        return f.get(rel)["optimizer_state_dict"]

    def optimizer_names(self) -> list[str]:
        """Names of the optimizer's parameters in index order (recorded by megaclip's save)."""
        if self._opt_names is None:
            rank = (self.files.stage * self.dp) * self.files.tp + self.files.tp_rank
            names = load_file(self.root / rank_state_file(rank)).get("optimizer_param_names")
            if names is None:
                raise CheckpointError(f"{self.root}: no optimizer parameter names recorded")
            self._opt_names = [strip_prefix(n) for group in names for n in group]
        return self._opt_names

    def module_value(self, f: _Files, name: str) -> torch.Tensor:
        """The module weight (training dtype) of ``name`` on this shard."""
        if self.zero == 3:
            if name not in self.frozen_shapes:
                raise CheckpointError("ZeRO-3 checkpoints hold the weights in the optimizer only")
            ds_name, shape = self.frozen_shapes[name]
            parts = [
                f.get(self.files.model_states(3, d))["frozen_param_fragments"][ds_name].flatten()
                for d in range(self.dp)
            ]
            return torch.cat(parts)[: shape.numel()].view(shape)
        state = f.get(self.module_rel)
        state = state if self.files.pp > 1 else state.get("module") or {}
        if name not in self.module_names:
            raise CheckpointError(f"{self.where}: no module weight for parameter {name}")
        return _take(state[self.module_names[name]])

    def value(self, f: _Files, name: str, key: str) -> torch.Tensor:
        """Local TP shard of ``name``: key 'fp32' (master), 'module' or a moment name."""
        if key == MODULE:
            return self.module_value(f, name)
        if self.kind == "zero3":
            if name in self.frozen_shapes:
                return self._frozen(f, name, key)
            return self._zero3(f, name, key)
        if self.kind == "partitioned":
            if name not in self.groups:
                return self._frozen(f, name, key)
            return self._partitioned(f, name, key)
        return self._indexed(f, name, key)

    def _frozen(self, f: _Files, name: str, key: str) -> torch.Tensor:
        value = self.module_value(f, name).float()
        return value if key == MASTER else torch.zeros_like(value)

    def _zero3(self, f: _Files, name: str, key: str) -> torch.Tensor:
        if name not in self.groups:
            raise CheckpointError(f"{self.where}: no optimizer partition holds parameter {name}")
        g, _, shape, offset = self.groups[name]
        part = zero3_partition_numel(shape.numel(), self.dp)
        pieces = []
        for d in range(self.dp):
            osd = self._optim(f, d)
            if key == MASTER:
                flat = osd["fp32_flat_groups"][g]
            else:
                flat = osd["optimizer_state_dict"]["state"][g][key]
            pieces.append(flat.narrow(0, offset, part))
        out = torch.cat(pieces)[: shape.numel()].view(shape).clone()
        for piece in pieces:
            mmap_io.release(piece)
        return out

    def _partitioned(self, f: _Files, name: str, key: str) -> torch.Tensor:
        g, ds_name, shape, _ = self.groups[name]
        pieces = []
        for d in range(self.dp):
            osd = self._optim(f, d)
            frag = osd["param_slice_mappings"][g].get(ds_name)
            if frag is None:
                continue
            if key == MASTER:
                flat = osd["single_partition_of_fp32_groups"][g]
            else:
                state = osd["base_optimizer_state"]["state"]
                flat = state[g][key] if g in state else None
            if flat is None:
                pieces.append(torch.zeros(frag.numel))
                continue
            piece = flat.narrow(0, frag.start, frag.numel)
            pieces.append(piece.clone())
            mmap_io.release(piece)
        numel = sum(p.numel() for p in pieces)
        if numel != shape.numel():
            raise CheckpointError(
                f"{self.where}: parameter {name} has {numel} elements in the ZeRO partitions, "
                f"expected {shape.numel()} (shape {tuple(shape)})"
            )
        return torch.cat(pieces).view(shape)

    def _indexed(self, f: _Files, name: str, key: str) -> torch.Tensor:
        """ZeRO-0: fp32 copies per parameter (bf16) or the module itself (fp32), by index."""
        opt = f.get(self.ms_rel).get("optimizer") or {}
        needs_index = self.kind == "unfused" or key != MASTER
        names = self.optimizer_names() if needs_index else []
        if name not in names and needs_index:
            return self._frozen(f, name, key)  # not trained: no master, no moments
        index = names.index(name) if needs_index else -1
        if key == MASTER:
            if self.kind == "plain":
                return self.module_value(f, name).float()
            masters = [t for group in opt["fp32_groups"] for t in group]
            if len(masters) != len(names):
                raise CheckpointError(
                    f"{self.root}: optimizer holds {len(masters)} fp32 copies, expected "
                    f"{len(names)}"
                )
            return _take(masters[index]).float()
        inner = opt.get("optimizer_state_dict", opt) if self.kind == "unfused" else opt
        state = inner.get("state", {})
        if index in state:
            return _take(state[index][key]).float()
        return torch.zeros_like(self.module_value(f, name).float())

    def adam_step(self) -> int | None:
        """The optimizer's step count (bias correction), from DP rank 0's state."""
        if self.kind in ("zero3", "partitioned"):
            osd = load_file(self.root / self.optim_rel(0))["optimizer_state_dict"]
            inner = osd.get("base_optimizer_state") or osd.get("optimizer_state_dict") or {}
        else:
            ms = mmap_io.load(self.root / self.ms_rel)
            opt = ms.get("optimizer") or {}
            inner = opt.get("optimizer_state_dict", opt)
            mmap_io.release_all(ms)
        for s in inner.get("state", {}).values():
            if "step" in s:
                return int(torch.as_tensor(s["step"]).item())
        return None


def _merge_tp(parts: list[torch.Tensor], name: str) -> torch.Tensor:
    """The full tensor from every TP rank's shard (rules by name; replicated: rank 0's)."""
    dim, stride = tp_partition(name)
    if dim is None or len(parts) == 1:
        return parts[0]
    return unshard(parts, dim, stride)


class CheckpointReader:
    """Full (TP/PP/DP-merged) tensors of a megaclip DeepSpeed checkpoint, one at a time.

    Offline, one process, no process groups. Files are memory-mapped and read in scopes of
    :data:`READ_BUDGET` bytes of output whose pages are handed back afterwards, so memory stays
    about one budget plus one tensor whatever the checkpoint's size.
    ``fp32_master``: weights from the fp32 master copy (ZeRO partitions / bf16 optimizer); else
    the module weights in their training dtype (ZeRO-3 keeps none: masters are used).
    """

    def __init__(self, path: str | Path, *, fp32_master: bool = True) -> None:
        self.root = resolve_checkpoint_dir(path)
        self.meta = read_meta(self.root)
        verify_files(self.root, self.meta)
        self.cfg = self.meta.model_config
        par = self.meta.parallel
        self.use_master = fp32_master or par["zero_stage"] == 3
        self.shapes = expected_shapes(self.cfg)
        self.stages = [stage_names(self.cfg, par["pp"], s) for s in range(par["pp"])]
        self._shards: dict[int, list[_Shard]] = {}

    @property
    def names(self) -> list[str]:
        """Every parameter, in the order :meth:`entries` yields them."""
        return [n for names in self.stages for n in names]

    @property
    def weight_dtype(self) -> torch.dtype:
        """dtype of the weights :meth:`entries` returns under key 'fp32'."""
        if self.use_master:
            return torch.float32
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(
            self.meta.parallel["precision"], torch.float32
        )

    def shards(self, stage: int) -> list[_Shard]:
        if stage not in self._shards:
            tp = self.meta.parallel["tp"]
            self._shards[stage] = [_Shard(self.root, self.meta, stage, t) for t in range(tp)]
        return self._shards[stage]

    def entries(
        self,
        keys: tuple[str, ...] = (MASTER,),
        budget: int = READ_BUDGET,
        names: list[str] | None = None,
    ) -> Iterator[tuple[str, dict[str, torch.Tensor]]]:
        """(name, {key: full tensor}) per parameter (``names``: only those; keys 'fp32' and/or
        moment names), stage by stage; only the stages holding a wanted name are opened."""
        wanted = set(self.names if names is None else names)
        unknown = wanted - set(self.names)
        if unknown:
            raise CheckpointError(f"{self.root} holds no parameter {sorted(unknown)[0]}")
        for stage, stage_names in enumerate(self.stages):
            names_here = [n for n in stage_names if n in wanted]
            if not names_here:
                continue
            yield from self._stage_entries(stage, names_here, keys, budget)

    def _stage_entries(self, stage: int, names: list[str], keys: tuple[str, ...], budget: int):
        """Entries of one stage, read in scopes of about ``budget`` output bytes."""
        shards = self.shards(stage)
        i = 0
        while i < len(names):
            group, size = [], 0
            while i < len(names) and (not group or size < budget):
                group.append(names[i])
                size += self.shapes[names[i]].numel() * 4 * len(keys)
                i += 1
            scopes = [_Files(self.root) for _ in shards]
            try:
                for name in group:
                    yield name, self._entry(shards, scopes, name, keys)
            finally:
                for scope in scopes:
                    scope.close()

    def _entry(self, shards, scopes, name: str, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        out = {}
        for key in keys:
            kind = MODULE if key == MASTER and not self.use_master else key
            full = _merge_tp([s.value(f, name, kind) for s, f in zip(shards, scopes)], name)
            if tuple(full.shape) != tuple(self.shapes[name]):
                raise CheckpointError(
                    f"{self.root}: parameter {name} has shape {tuple(full.shape)}, the model "
                    f"config says {tuple(self.shapes[name])}"
                )
            out[key] = full
        return out

    def adam_step(self) -> int | None:
        """Adam's step count of the first shard."""
        return self.shards(0)[0].adam_step()

    def training_state(self) -> dict[str, Any]:
        """LR scheduler, engine counters and every rank's client state (small objects)."""
        first = mmap_io.load(self.root / self.shards(0)[0].ms_rel)
        counters = ("global_steps", "global_samples", "skipped_steps")
        engine = {k: first.get(k) for k in counters}
        scheduler = first.get("lr_scheduler")
        mmap_io.release_all(first)
        par = self.meta.parallel
        clients = {}
        for rank in range(par["tp"] * par["pp"] * par["dp"]):
            rs = self.root / rank_state_file(rank)
            if rs.is_file():
                clients[rank] = load_file(rs).get("client_state")
        return {
            "lr_scheduler": scheduler,
            "engine": engine,
            "client_states": clients,
        }


def read_checkpoint(
    path: str | Path, *, fp32_master: bool = True, optimizer: bool = False
) -> FullState:
    """All full tensors of a checkpoint in memory (small models, tests); see CheckpointReader.

    ``optimizer``: also the Adam moments, step counters and scheduler state.
    """
    reader = CheckpointReader(path, fp32_master=fp32_master)
    keys = (MASTER, *MOMENTS) if optimizer else (MASTER,)
    params: dict[str, torch.Tensor] = {}
    moments: dict[str, dict[str, torch.Tensor]] = {k: {} for k in MOMENTS} if optimizer else {}
    for name, entry in reader.entries(keys):
        params[name] = entry[MASTER]
        for key in moments:
            moments[key][name] = entry[key]
    state = FullState(meta=reader.meta, params=params, moments=moments)
    if optimizer:
        state.adam_step = reader.adam_step()
        extra = reader.training_state()
        state.lr_scheduler = extra["lr_scheduler"]
        state.engine_state = extra["engine"]
        state.client_states = extra["client_states"]
    return state
