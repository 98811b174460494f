"""Pre-flight checks of the node: a writable output directory, and memory.

:func:`check_output_dir`: ``train.out_dir`` is (or can be created as) a writable directory.

Memory: refuse a layout that will not fit before anything is allocated.

The planner's per-rank prediction (megaclip.perf.memory.rank_peaks) is compared with this
node's budget: device memory per GPU (the planner's usable share of it), or on a CPU node the
memory available now (``MemAvailable``) shared among the node's ranks, plus what this rank
already holds (its runtime, which the prediction includes). A misfit is one line: prediction,
budget, and the nearest layouts of the same global batch that fit (ranked as ``megaclip plan``
ranks them). ``train.memory_check: false`` overrides it; the kernel's OOM killer is never the
error message.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from megaclip.config.model import ClipConfig
from megaclip.config.parallel import ParallelConfig
from megaclip.config.train import LOSS_CHUNK_SIZE, RunConfig
from megaclip.errors import ConfigError
from megaclip.train.host import meminfo_kib

GIB = 2**30


def nearest_existing(path: Path) -> Path:
    """``path`` if it exists, else its nearest existing ancestor."""
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def check_output_dir(path: str | Path, what: str = "train.out_dir") -> None:
    """ConfigError unless ``path`` is (or can be created as) a writable directory.

    Creates nothing: checks ``path`` if it exists, else its nearest existing ancestor
    (``os.access`` also reports read-only mounts, even to root).
    """
    if "\x00" in str(path):
        raise ConfigError(f"{what} {str(path)!r} contains a NUL character")
    path = Path(path).expanduser()
    try:
        probe = nearest_existing(path)
        is_dir = probe.is_dir()
        writable = is_dir and os.access(probe, os.W_OK | os.X_OK)
    except OSError as err:
        raise ConfigError(f"{what} {path} cannot be used: {err.strerror or err}") from None
    if not is_dir:
        kind = "is" if probe == path else f"is under {probe}, which is"
        raise ConfigError(f"{what} {path} {kind} a file, not a directory; choose another {what}")
    if not writable:
        where = "" if probe == path else f" (its nearest existing parent {probe} is not)"
        raise ConfigError(
            f"{what} {path} is not writable{where}: fix the permissions or choose another "
            f"{what} (runs write config.yaml, metrics.jsonl and checkpoints/ there)"
        )


@dataclass(frozen=True)
class Budget:
    """Bytes one rank may use, and where the figure comes from."""

    bytes: float
    host: bool
    source: str


def local_ranks() -> int:
    """Processes of this job on this node (launcher variables; 1 when launched alone)."""
    for var in ("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"):
        value = os.environ.get(var, "")
        if value.split("(")[0].isdigit():
            return max(1, int(value.split("(")[0]))
    return max(1, int(os.environ.get("WORLD_SIZE", "1")))


def node_budget() -> Budget | None:
    """This rank's memory budget, or None when it cannot be read (then nothing is checked)."""
    from megaclip.parallel.device import accelerator
    from megaclip.perf.planner import PlanRequest
    from megaclip.train.memlog import current_bytes

    acc = accelerator()
    if acc.device_name() != "cpu":
        total = float(acc.total_memory(int(os.environ.get("LOCAL_RANK", "0"))))
        margin, reserved = PlanRequest.memory_margin, PlanRequest.reserved_gib
        usable = total * (1 - margin) - reserved * GIB
        return Budget(usable, False, f"{total / GIB:.1f} GiB {acc.device_name()} memory")
    avail = meminfo_kib("MemAvailable")
    if avail is None:
        return None
    n = local_ranks()
    share = avail * 1024 / n + current_bytes()
    return Budget(share, True, f"MemAvailable {avail / 2**20:.1f} GiB over {n} local ranks")


def nearest_fits(cfg: ClipConfig, par: ParallelConfig, budget: Budget, top: int = 3) -> list[str]:
    """Up to ``top`` layouts of the same world size and global batch that fit ``budget``."""
    from megaclip.perf.devices import Device
    from megaclip.perf.memory import HOST_RUNTIME_BYTES
    from megaclip.perf.planner import PlanRequest, plan
    from megaclip.perf.timing import Cluster

    node = min(par.world_size, local_ranks())
    device = Device("this-node", 1.0, 1.0, 1.0, budget.bytes / GIB, 100.0, 10.0, 10.0, node)
    runtime = HOST_RUNTIME_BYTES / GIB if budget.host else 0.0
    req = PlanRequest(
        model=cfg,
        cluster=Cluster(device, par.world_size, node),
        global_batch=par.global_batch_size,
        precision=par.precision,
        memory_margin=0.0,
        reserved_gib=runtime,
        batch_tolerance=0.0,
    )
    try:
        result = plan(req)
    except ConfigError:
        return []
    out = []
    for c in result.feasible:
        p = c.par
        text = (
            f"tp={p.tp} pp={p.pp} dp={p.dp} zero_stage={p.zero_stage} "
            f"micro_batch_size={p.micro_batch_size} grad_accum_steps={p.grad_accum_steps} "
            f"activation_checkpointing={str(p.activation_checkpointing).lower()} "
            f"({(c.peak_bytes / GIB + runtime):.1f} GiB)"
        )
        if text not in out:
            out.append(text)
        if len(out) == top:
            break
    return out


def check_memory(
    cfg: ClipConfig,
    par: ParallelConfig,
    *,
    ds: Mapping[str, Any] | None = None,
    budget: Budget | None = None,
    loss_chunk: int | None = LOSS_CHUNK_SIZE,
) -> None:
    """ConfigError (one line) when the planner predicts a rank above this node's budget.

    ``ds``: the run's resolved DeepSpeed config (bucket sizes); ``loss_chunk``: its
    ``train.loss_chunk_size``.
    """
    from megaclip.perf.memory import rank_peaks

    budget = budget or node_budget()
    if budget is None:  # not readable here: nothing to check against
        return
    peaks = rank_peaks(cfg, par, host=budget.host, ds=ds, loss_chunk=loss_chunk)
    worst = max(peaks, key=lambda r: r.peak)
    if worst.peak <= budget.bytes:
        return
    fits = nearest_fits(cfg, replace(par), budget)
    advice = (
        "layouts of this global batch that fit: " + "; ".join(fits)
        if fits
        else "no layout of this global batch fits: use more processes or a smaller batch"
    )
    raise ConfigError(
        f"{cfg.name} on tp={par.tp} pp={par.pp} dp={par.dp} ZeRO-{par.zero_stage} "
        f"({par.precision}, micro_batch_size={par.micro_batch_size}, activation_checkpointing="
        f"{str(par.activation_checkpointing).lower()}) needs about {worst.peak / GIB:.1f} GiB on "
        f"rank {worst.rank} (planner), but a rank has {budget.bytes / GIB:.1f} GiB "
        f"({budget.source}); {advice}; set train.memory_check=false to start anyway"
    )


#: Bytes a parameter occupies in ZeRO-Infinity's NVMe files, per offloaded section: the swapped
#: parameter (4 in fp32, 2 in bf16/fp16); AdamW's fp32 partition and two moments (12).
OFFLOAD_BYTES_PER_PARAM = {
    "offload_param": {"fp32": 4, "bf16": 2, "fp16": 2},
    "offload_optimizer": {"fp32": 12, "bf16": 12, "fp16": 12},
}


def offload_bytes_per_rank(
    cfg: ClipConfig, par: ParallelConfig, sections: Sequence[str] = ("offload_param",)
) -> float:
    """Disk bytes one rank's NVMe files hold for ``sections``: its 1/dp share of the model."""
    from megaclip.perf.memory import default_stages, stage_params

    params = sum(stage_params(cfg, par.tp, s) for s in default_stages(cfg, par.pp))
    per = sum(OFFLOAD_BYTES_PER_PARAM[k][par.precision] for k in sections)
    return per * params / par.dp


#: What a saved file adds beyond its tensors (zip entries, pickled metadata): a margin on top.
FILE_OVERHEAD = 0.02


def disk_need(
    cfg: RunConfig, par: ParallelConfig, existing: int = 0
) -> tuple[float, int, float, float]:
    """(bytes this run may still write to ``train.out_dir``, checkpoints it may add, bytes of
    one checkpoint, bytes of the final export) with ``existing`` complete checkpoints there.

    A save is published before the oldest beyond ``train.keep_last`` is deleted, so at most
    keep_last + 1 exist at once (every save when keep_last is 0); a run saves every
    ``save_every`` steps and at the end.
    """
    from megaclip.perf.memory import checkpoint_bytes, export_bytes

    t = cfg.train
    saves = (t.steps // t.save_every if t.save_every else 0) + 1
    peak = saves if t.keep_last == 0 else min(saves, t.keep_last + 1)
    new = max(1, peak - existing) if t.keep_last else saves
    one = checkpoint_bytes(cfg.model, par) * (1 + FILE_OVERHEAD)
    export = export_bytes(cfg.model) * (1 + FILE_OVERHEAD)
    return new * one + export, new, one, export


def check_disk(cfg: RunConfig, par: ParallelConfig, existing: int = 0) -> None:
    """ConfigError (one line) when ``train.out_dir``'s disk has no room for the checkpoints
    and the export this run writes (:func:`disk_need`), before anything is allocated."""
    import shutil

    out = Path(cfg.train.out_dir).expanduser()
    free = shutil.disk_usage(nearest_existing(out)).free
    need, new, one, export = disk_need(cfg, par, existing)
    if need <= free:
        return
    gib = 2**30
    raise ConfigError(
        f"train.out_dir {out} has {free / gib:.1f} GiB free, but this run writes up to "
        f"{need / gib:.1f} GiB there ({new} checkpoint(s) of {one / gib:.1f} GiB with "
        f"train.keep_last={cfg.train.keep_last}, and the {export / gib:.1f} GiB final export): "
        "free space, lower train.keep_last / raise train.save_every, or choose another "
        "train.out_dir"
    )


def async_io_problem() -> str | None:
    """Why DeepSpeed's async_io op (ZeRO-Infinity's disk I/O) cannot load here, or None."""
    from deepspeed.accelerator import get_accelerator

    builder = get_accelerator().create_op_builder("AsyncIOBuilder")
    if builder is None or not builder.is_compatible(verbose=False):
        return "libaio is missing (Debian: apt-get install libaio-dev, then scripts/install.sh)"
    return None


def check_offload(
    cfg: ClipConfig, par: ParallelConfig, ds: Mapping[str, Any], *, local: int | None = None
) -> None:
    """ConfigError (one line) unless an NVMe-offloading run can start: the async_io op loads,
    and each offload directory is writable with room for this node's ranks' offload files."""
    import shutil

    from megaclip.train.ds_config import nvme_offload

    sections = nvme_offload(ds)
    if not sections:
        return
    problem = async_io_problem()
    if problem is not None:
        raise ConfigError(
            f"NVMe offload needs DeepSpeed's async_io op, which cannot build: {problem}"
        )
    zero = ds["zero_optimization"]
    need = offload_bytes_per_rank(cfg, par, sections) * (local or local_ranks())
    for path in sorted({str(zero[k]["nvme_path"]) for k in sections}):
        check_output_dir(path, "the NVMe offload directory (train.offload_dir)")
        free = shutil.disk_usage(nearest_existing(Path(path).expanduser())).free
        if free < need:
            raise ConfigError(
                f"NVMe offload of {cfg.name} needs about {need / GIB:.1f} GiB at {path} for "
                f"this node's ranks, but {free / GIB:.1f} GiB is free there; free space or set "
                "train.offload_dir to a larger disk"
            )
