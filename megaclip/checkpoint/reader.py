"""Offline reader of megaclip's DeepSpeed checkpoints: one process, no process groups.

Merges every layout's files into full (unsharded) tensors keyed by ClipModel parameter names:

- ZeRO partitions over DP: ZeRO-1/2 and the bf16 optimizer store, per DP rank, flat fp32
  partitions with ``param_slice_mappings`` (name -> (start, numel) in that partition); a
  parameter is the concatenation of its fragments in DP-rank order. ZeRO-3 splits every
  parameter into ceil(numel / dp) elements per rank, laid out in ``param_shapes`` order.
- pipeline stages: layer ``s`` of the PipelineModule is stage ``s``; names are disjoint;
- TP shards: :func:`megaclip.checkpoint.layout.tp_partition` (by name) and
  :func:`megaclip.parallel.shapes.unshard`.
Adam moments (``exp_avg``, ``exp_avg_sq``) live in the same flat layout as the fp32 masters.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megaclip.checkpoint.atomic import read_latest
from megaclip.checkpoint.layout import (
    ShardFiles,
    canonical_name,
    tp_partition,
    zero3_partition_numel,
)
from megaclip.checkpoint.meta import META_FILE, CheckpointMeta, read_meta, verify_files
from megaclip.config.model import ClipConfig
from megaclip.errors import CheckpointError
from megaclip.parallel.shapes import unshard

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


def _cat_fragments(
    frags: dict[str, list[torch.Tensor]], shapes: dict[str, torch.Size], where: str
) -> dict[str, torch.Tensor]:
    out = {}
    for name, shape in shapes.items():
        if name not in frags:
            raise CheckpointError(f"{where}: no optimizer partition holds parameter {name}")
        flat = torch.cat(frags[name])
        if flat.numel() != shape.numel():
            raise CheckpointError(
                f"{where}: parameter {name} has {flat.numel()} elements in the ZeRO partitions, "
                f"expected {shape.numel()} (shape {tuple(shape)})"
            )
        out[name] = flat.view(shape)
    return out


def _group_shapes(model_states: dict, where: str) -> list[dict[str, torch.Size]]:
    shapes = model_states.get("param_shapes")
    if not shapes:
        raise CheckpointError(f"{where} has no 'param_shapes': not a ZeRO checkpoint")
    return [dict(g) for g in shapes]


class _Shard:
    """Reads the tensors of one (stage, TP rank) model shard over all DP ranks.

    DeepSpeed 0.19 optimizers and where they keep fp32 masters and Adam moments:
    ZeRO-1/2, ZeRO-0 bf16 under the pipeline (BF16_Optimizer): flat partitions in
    ``[bf16_]zero_pp_rank_D_mp_rank_MM_optim_states.pt`` with ``param_slice_mappings``;
    ZeRO-3: flat partitions in the same files, laid out by ``param_shapes``; ZeRO-0 bf16 without
    pipeline: per-parameter fp32 copies (``fp32_groups``) in the model-states file; ZeRO-0 fp32:
    the module itself, torch AdamW state in the model-states file.
    """

    def __init__(self, root: Path, meta: CheckpointMeta, stage: int, tp_rank: int) -> None:
        par = meta.parallel
        self.root, self.par, self.manifest = root, par, meta.files
        self.files = ShardFiles(stage, tp_rank, par["tp"], par["pp"])
        self.zero = par["zero_stage"]
        self.dp = par["dp"]
        self._model_states: dict | None = None

    def _file(self, name: str) -> Path:
        return self.root / name

    def model_states(self) -> dict:
        """The engine model-states file of this shard (DP rank 0)."""
        if self._model_states is None:
            self._model_states = load_file(self._file(self.files.model_states(self.zero)))
        return self._model_states

    def optim_file(self, dp_rank: int) -> Path | None:
        """This shard's partition file of ``dp_rank`` (bf16_ or plain prefix), None if none."""
        for bf16 in (True, False):
            name = self.files.optim_states(dp_rank, bf16)
            if name in self.manifest:
                return self._file(name)
        return None

    def module(self) -> dict[str, torch.Tensor]:
        """Module weights (training dtype), ClipModel names."""
        if self.zero == 3:
            raise CheckpointError("ZeRO-3 checkpoints hold the weights in the optimizer only")
        if self.files.pp > 1:
            state = load_file(self._file(self.files.layer_states()))
        else:
            state = self.model_states().get("module") or {}
        return {canonical_name(k): v for k, v in state.items()}

    def partitioned(self, keys: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """{'fp32' | moment key: {name: local TP shard}} from wherever the optimizer keeps them."""
        if self.zero == 3:
            return self._zero3(keys)
        if self.optim_file(0) is not None:
            return self._zero12(keys)
        opt = self.model_states().get("optimizer") or {}
        if "fp32_groups" in opt:
            return self._unfused(keys, opt)
        if self.par["precision"] != "fp32":
            raise CheckpointError(
                f"{self.root}: the {self.par['precision']} ZeRO-0 optimizer state of this "
                "checkpoint is not in a format megaclip can read (no fp32 master copies found)"
            )
        return self._plain(keys, opt)

    def _optim(self, dp_rank: int) -> dict:
        path = self.optim_file(dp_rank)
        if path is None:
            want = self.files.optim_states(dp_rank)
            raise CheckpointError(f"checkpoint file {self.root / want} is missing")
        return load_file(path)["optimizer_state_dict"]

    def _zero12(self, keys: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        where = f"{self.root} (mp rank {self.files.mp_rank})"
        shapes = _group_shapes(self.model_states(), where)
        frags: dict[str, dict[str, list[torch.Tensor]]] = {}
        for dp_rank in range(self.dp):
            osd = self._optim(dp_rank)
            state = osd["base_optimizer_state"]["state"]
            for g, mapping in enumerate(osd["param_slice_mappings"]):
                sources = {"fp32": osd["single_partition_of_fp32_groups"][g]}
                for key in keys:
                    if key != "fp32":
                        sources[key] = state[g][key] if g in state else None
                for key, flat in sources.items():
                    for name, frag in mapping.items():
                        piece = (
                            torch.zeros(frag.numel)
                            if flat is None
                            else flat.narrow(0, frag.start, frag.numel)
                        )
                        frags.setdefault(key, {}).setdefault(name, []).append(piece)
        out = {}
        for key in keys:
            merged = {}
            for group in shapes:
                merged.update(_cat_fragments(frags.get(key, {}), group, where))
            out[key] = {canonical_name(k): v for k, v in merged.items()}
        return out

    def _zero3(self, keys: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        shapes = _group_shapes(self.model_states(), f"{self.root} (mp rank {self.files.mp_rank})")
        flats: dict[str, list[list[torch.Tensor]]] = {}
        for dp_rank in range(self.dp):
            osd = self._optim(dp_rank)
            inner = osd["optimizer_state_dict"]["state"]
            for key in keys:
                if key == "fp32":
                    groups = list(osd["fp32_flat_groups"])
                else:
                    groups = [inner[g][key] for g in range(len(shapes))]
                flats.setdefault(key, []).append(groups)
        out = {}
        for key, per_rank in flats.items():
            merged = {}
            for g, group in enumerate(shapes):
                offset = 0
                for name, shape in group.items():
                    part = zero3_partition_numel(shape.numel(), self.dp)
                    pieces = [per_rank[d][g].narrow(0, offset, part) for d in range(self.dp)]
                    merged[name] = torch.cat(pieces)[: shape.numel()].view(shape)
                    offset += part
            out[key] = {canonical_name(k): v for k, v in merged.items()}
        out["fp32"].update(self._zero3_frozen())
        return out

    def _zero3_frozen(self) -> dict[str, torch.Tensor]:
        shapes = self.model_states().get("frozen_param_shapes") or {}
        if not shapes:
            return {}
        parts = [
            load_file(self._file(self.files.model_states(3, d)))["frozen_param_fragments"]
            for d in range(self.dp)
        ]
        return {
            canonical_name(n): torch.cat([p[n].flatten() for p in parts])[: s.numel()].view(s)
            for n, s in shapes.items()
        }

    def _optimizer_names(self) -> list[str]:
        """Names of the optimizer's parameters in index order (recorded by megaclip's save)."""
        rank = (self.files.stage * self.dp) * self.files.tp + self.files.tp_rank
        names = load_file(self._file(rank_state_file(rank))).get("optimizer_param_names")
        if names is None:
            raise CheckpointError(f"{self.root}: no optimizer parameter names recorded")
        return [canonical_name(n) for group in names for n in group]

    def _indexed_state(
        self, keys: list[str], opt_state: dict, fp32: dict[str, torch.Tensor]
    ) -> dict[str, dict[str, torch.Tensor]]:
        out = {"fp32": fp32}
        names = self._optimizer_names() if len(keys) > 1 else []
        state = opt_state.get("state", {})
        for key in keys:
            if key != "fp32":
                out[key] = {
                    n: state[i][key] if i in state else torch.zeros_like(fp32[n])
                    for i, n in enumerate(names)
                }
        return out

    def _unfused(self, keys: list[str], opt: dict) -> dict[str, dict[str, torch.Tensor]]:
        """ZeRO-0 bf16 without pipeline: fp32 copies per parameter in optimizer order."""
        names = self._optimizer_names()
        masters = [t for group in opt["fp32_groups"] for t in group]
        if len(masters) != len(names):
            raise CheckpointError(
                f"{self.root}: optimizer holds {len(masters)} fp32 copies, expected {len(names)}"
            )
        fp32 = {n: t.float() for n, t in zip(names, masters)}
        return self._indexed_state(keys, opt.get("optimizer_state_dict", {}), fp32)

    def _plain(self, keys: list[str], opt: dict) -> dict[str, dict[str, torch.Tensor]]:
        """ZeRO-0 fp32: the module is the master; torch AdamW state maps indices to names."""
        fp32 = {k: v.float() for k, v in self.module().items()}
        return self._indexed_state(keys, opt, fp32)

    def adam_step(self) -> int | None:
        """The optimizer's step count (bias correction), from DP rank 0's state."""
        if self.zero == 3 or self.optim_file(0) is not None:
            osd = self._optim(0)
            inner = osd.get("base_optimizer_state") or osd.get("optimizer_state_dict") or {}
        else:
            opt = self.model_states().get("optimizer") or {}
            inner = opt.get("optimizer_state_dict", opt)
        for s in inner.get("state", {}).values():
            if "step" in s:
                return int(torch.as_tensor(s["step"]).item())
        return None


def _merge_tp(per_tp: list[dict[str, torch.Tensor]], where: str) -> dict[str, torch.Tensor]:
    """Full tensors from every TP rank's shard (rules by name; replicated: rank 0's)."""
    out = {}
    for name in per_tp[0]:
        dim, stride = tp_partition(name)
        if dim is None or len(per_tp) == 1:
            out[name] = per_tp[0][name]
            continue
        try:
            out[name] = unshard([p[name] for p in per_tp], dim, stride)
        except KeyError:
            raise CheckpointError(f"{where}: TP shards disagree on parameter {name}") from None
    return out


def read_checkpoint(
    path: str | Path, *, fp32_master: bool = True, optimizer: bool = False
) -> FullState:
    """Full state of a megaclip DeepSpeed checkpoint (root with ``latest`` or a step directory).

    ``fp32_master``: weights from the fp32 master copy (ZeRO partitions / bf16 optimizer); else
    the module weights in their training dtype (ZeRO-3 keeps none: masters are used).
    ``optimizer``: also merge the Adam moments and read step counters and scheduler state.
    """
    root = resolve_checkpoint_dir(path)
    meta = read_meta(root)
    verify_files(root, meta)
    cfg = meta.model_config
    par = meta.parallel
    use_master = fp32_master or par["zero_stage"] == 3
    keys = ["fp32", *MOMENTS] if optimizer else ["fp32"]
    params: dict[str, torch.Tensor] = {}
    moments: dict[str, dict[str, torch.Tensor]] = {k: {} for k in MOMENTS} if optimizer else {}
    adam_step = None
    for stage in range(par["pp"]):
        shards = [_Shard(root, meta, stage, t) for t in range(par["tp"])]
        where = f"{root} stage {stage}"
        if use_master or optimizer:
            per_key = [s.partitioned(keys) for s in shards]
            if use_master:
                params.update(_merge_tp([p["fp32"] for p in per_key], where))
            for key in moments:
                moments[key].update(_merge_tp([p[key] for p in per_key], where))
            if adam_step is None and optimizer:
                adam_step = shards[0].adam_step()
        if not use_master:
            params.update(_merge_tp([s.module() for s in shards], where))
    _fill_frozen(root, meta, params, moments, expected_shapes(cfg))
    _check_complete(params, cfg, root)
    state = FullState(meta=meta, params=params, moments=moments, adam_step=adam_step)
    if optimizer:
        first = _Shard(root, meta, 0, 0).model_states()
        state.lr_scheduler = first.get("lr_scheduler")
        state.engine_state = {
            k: first.get(k) for k in ("global_steps", "global_samples", "skipped_steps")
        }
        world = par["tp"] * par["pp"] * par["dp"]
        for rank in range(world):
            rs = root / rank_state_file(rank)
            if rs.is_file():
                state.client_states[rank] = load_file(rs).get("client_state")
    return state


def _fill_frozen(
    root: Path,
    meta: CheckpointMeta,
    params: dict[str, torch.Tensor],
    moments: dict[str, dict[str, torch.Tensor]],
    want: dict[str, torch.Size],
) -> None:
    """Frozen parameters (train.lock_image/text) have no fp32 master: take the module's."""
    if not set(want) - set(params) or meta.parallel["zero_stage"] == 3:
        return
    par = meta.parallel
    for stage in range(par["pp"]):
        shards = [_Shard(root, meta, stage, t) for t in range(par["tp"])]
        module = _merge_tp([s.module() for s in shards], f"{root} stage {stage}")
        for name, value in module.items():
            if name not in params:
                params[name] = value.float()
                for per_name in moments.values():
                    per_name[name] = torch.zeros_like(params[name])


def _check_complete(params: dict[str, torch.Tensor], cfg: ClipConfig, root: Path) -> None:
    want = expected_shapes(cfg)
    missing = sorted(set(want) - set(params))
    if missing:
        raise CheckpointError(f"{root} lacks parameter {missing[0]} (and {len(missing) - 1} more)")
    for name, shape in want.items():
        if tuple(params[name].shape) != tuple(shape):
            raise CheckpointError(
                f"{root}: parameter {name} has shape {tuple(params[name].shape)}, the model "
                f"config says {tuple(shape)}"
            )
    extra = sorted(set(params) - set(want))
    if extra:
        raise CheckpointError(f"{root} has unexpected parameter {extra[0]}")
