"""The DeepSpeed JSON of a megaclip layout: the one builder.

:func:`deepspeed_config` turns a :class:`ParallelConfig` into DeepSpeed's dict. It is what
`megaclip plan --out-dir` writes as ``ds_config.json``, what `megaclip train` runs with when the
run names no DeepSpeed file and what it fills into a file that leaves keys out
(``megaclip.train.ds_config.resolve_ds_config``), and what ``megaclip.bench`` starts from. It
never writes a key the trainer refuses (:data:`REFUSED_KEYS`: megaclip builds AdamW and its
schedule from the run config). Pure data: no torch or DeepSpeed import.
"""

from __future__ import annotations

from typing import Any

from megaclip.config.parallel import ParallelConfig

#: DeepSpeed reduce / all-gather bucket (elements) megaclip writes; the memory model's default.
BUCKET_ELEMS = 50_000_000
#: ZeRO-3: elements of the fp32 gradient buffer (``sub_group_size`` = this / dp), and of gathered
#: parameters kept alive at once (``stage3_max_live_parameters``, ``stage3_max_reuse_distance``).
ZERO3_GRAD_BUFFER_ELEMS = 100_000_000
ZERO3_LIVE_ELEMS = 100_000_000
#: Sections a DeepSpeed config given to megaclip must not define (the trainer refuses them).
REFUSED_KEYS = ("optimizer", "scheduler")
#: DeepSpeed 0.19 prints every ``steps_per_print`` steps; megaclip logs its own metrics.
STEPS_PER_PRINT = 10**9


def zero_section(par: ParallelConfig, overlap_comm: bool | None = None) -> dict[str, Any]:
    """``zero_optimization`` of a layout: the stage, bucket sizes and ZeRO-3 limits.

    Buckets: :data:`BUCKET_ELEMS`. ZeRO-3: DeepSpeed 0.19.8 allocates its fp32 gradient buffer
    with the *full* (unpartitioned) size of the largest optimizer sub-group, i.e. 4 bytes per
    model parameter on every rank with its default ``sub_group_size`` of 1e9; sub-groups of
    ``ZERO3_GRAD_BUFFER_ELEMS / dp`` partition elements cap it at 4 x 1e8 bytes. Its default
    ``stage3_max_live_parameters`` / ``max_reuse_distance`` of 1e9 keep up to 1e9 gathered
    parameters alive between uses (the whole of ViT-L, measured +0.9 GiB per rank from step 2):
    :data:`ZERO3_LIVE_ELEMS` bounds the gathered working set instead. ``overlap_comm``: written
    when not None (DeepSpeed's default: off for ZeRO-1/2, on for ZeRO-3).
    """
    zero: dict[str, Any] = {"stage": par.zero_stage}
    if par.zero_stage == 0:
        return zero
    zero |= {"reduce_bucket_size": BUCKET_ELEMS, "allgather_bucket_size": BUCKET_ELEMS}
    if overlap_comm is not None:
        zero["overlap_comm"] = overlap_comm
    if par.zero_stage == 3:
        zero |= {
            "sub_group_size": max(1, ZERO3_GRAD_BUFFER_ELEMS // par.dp),
            "stage3_prefetch_bucket_size": BUCKET_ELEMS,
            "stage3_max_live_parameters": ZERO3_LIVE_ELEMS,
            "stage3_max_reuse_distance": ZERO3_LIVE_ELEMS,
        }
    return zero


def deepspeed_config(
    par: ParallelConfig, gradient_clipping: float = 0.0, overlap_comm: bool | None = None
) -> dict[str, Any]:
    """The DeepSpeed config of layout ``par``: batch sizes, precision, ZeRO, clipping.

    ``gradient_clipping`` is always written (DeepSpeed 0.19 silently clips at 1.0 otherwise);
    `megaclip train` sets it from ``optim.grad_clip``. No ``optimizer`` / ``scheduler``.
    """
    ds: dict[str, Any] = {
        "train_batch_size": par.global_batch_size,
        "train_micro_batch_size_per_gpu": par.micro_batch_size,
        "gradient_accumulation_steps": par.grad_accum_steps,
        "zero_optimization": zero_section(par, overlap_comm),
        "gradient_clipping": gradient_clipping,
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
    }
    if par.precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif par.precision == "fp16":
        ds["fp16"] = {"enabled": True, "loss_scale": 0}  # dynamic loss scaling
    return ds
