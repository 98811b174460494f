"""Per-rank memory of one training layout: parameters, gradients, optimizer states, activations.

All functions are pure and return bytes (parameter counts where the name says so).

Tensor parallelism (t ranks): QKV and fc1 (weights and biases) are column-split, out-proj and
fc2 weights row-split; their biases, both LayerNorms, the embeddings, ln_pre/ln_post/ln_final,
the projections and ``logit_scale`` are replicated, i.e. counted in full on every TP rank.

Pipeline parallelism: a stage holds vision blocks [a, b) and text blocks [c, d); stage 0 also
the patch/token/position embeddings, class token and ln_pre; the last stage ln_post + proj,
ln_final + text_projection and ``logit_scale``.

Model states follow what DeepSpeed 0.19.8 allocates (see :func:`optimizer_wrapper`), checked
against the tensors a real engine holds at the optimizer step (benchmarks/memory_accounting.py,
tests/test_memory_planner_vs_measured.py). With ``w`` bytes per 16/32-bit parameter, ``n``
parameters on the rank, ``d`` data-parallel ranks, ``m`` micro-batches per step, ``R`` the
``reduce_bucket_size`` and ``k = 2`` with ``overlap_comm`` (else 1):

================  ======  =============  =======  ===========  =====================  =========
wrapper           params  grads          optim.   buffers      working (fwd/bwd)      step
================  ======  =============  =======  ===========  =====================  =========
torch (fp32, Z0)  4n      4n             8n       -            -                      4 AR b.
fp16_optimizer    2n      2n             12n      -            -                      4n + 2 AR
bf16_optimizer    2n      2n + g n       12n / d  -            -                      4n/d + 2 AR
zero (stage 1)    w n     g n / d        12n / d  -            k g R (+ g n if m > 1)  4n/d + w A
zero (stage 2)    w n     g n / d        12n / d  -            k w R                  4n/d + w A
zero (stage 3)    w n/d   g n / d        12n / d  w R          w * 2 blocks           4n/d + w A
================  ======  =============  =======  ===========  =====================  =========

``g`` = bytes of an accumulated gradient: ``w`` (DeepSpeed's default ``grad_accum_dtype``) or 4.
12 = fp32 master copy (4) + Adam m and v (8): the "16 bytes per parameter" of mixed precision
(2 + 2 + 12), 18 when gradients are accumulated in fp32 (``g = 4``). ZeRO-1/2 keep a separate
fp32 partition even for fp32 models, hence 12n/d there too. ZeRO-1 reduces each gradient into
its partition as soon as the boundary micro-batch produces it and frees the full ``.grad``
(exactly like ZeRO-2), so at m = 1 it never holds full gradients; with m > 1 it accumulates
full gradients over the earlier micro-batches ("working"). The reduce buckets are allocated
per backward (ZeRO-1/2, ``setup_buckets``) or once (ZeRO-3, ``contiguous_gradients``), at the
configured size whatever n is. "AR b.": the ZeRO-0 wrappers' all-reduce buffer (up to 5e8
elements); "A": the all-gather bucket (``min(n, allgather_bucket_size)``).
``bf16_optimizer`` (DeepSpeed's BF16_Optimizer, used by the pipeline engine with bf16 at ZeRO-0)
partitions its fp32 master and Adam states over DP although it is "stage 0", and keeps the
low-precision ``.grad`` *and* a full high-precision accumulation buffer of dtype ``g``.
Not modelled: ZeRO-1/2's gradient partition holds *whole* parameters that straddle a partition
boundary (a few % of the gradients of a tiny model, negligible for large ones); flat groups
padded to a multiple of d; ZeRO-3 parameters under ``stage3_param_persistence_threshold`` stay
whole on every rank. Peak of a rank: ``states + buffers + max(activations + loss + working,
step transient)`` (the step transient exists only inside ``optimizer.step()``).

Activations (bytes per micro-batch per block, ``a`` bytes per activation element, tokens
``T = b * S``, TP size ``t``, heads ``h``), with fused (flash / memory-efficient) attention:

    saved = T * [a * (4W + 4W/t + 2M/t) + 4 h/t + 4 * 4]

4W: inputs of ln_1, QKV, ln_2, fc1 (replicated under TP, no sequence parallelism); 4W/t: the QKV
output (q, k, v are views of it) and the attention output (its [B, S, D/t] re-layout is a view,
not a copy); 2M/t: GELU input and output; fp32 log-sum-exp per local head; fp32 mean and rstd of
the two LayerNorms (CUDA keeps them in fp32; CPU in the input dtype). Checked against the
tensors autograd actually saves for a megaclip block on CPU (tests/test_perf_memory.py).
With activation checkpointing a block keeps only its input ``a * T * W``; backward recomputes
one block at a time, so one block's full activations (plus two input-sized gradient buffers)
are live on top.

Schedule assumption: megaclip's exact global-batch loss (GPipe order: all m forwards, the loss
over the whole global batch, then m backwards; the same with PP = 1 and gradient accumulation)
keeps the saved activations of *all m micro-batches* alive at the peak, on every stage, not only
the first. The last stage (every rank when PP = 1) also holds the gathered features of the
global batch N for the loss: 2 * N * E fp32 values, their gradients, and a [rows, chunk]
logits block of the chunked loss (rows = m * b, chunk = ``train.loss_chunk_size``). The
alternative "recompute" schedule (features from a no-grad pass first, then DeepSpeed's stock
1F1B) keeps min(m, P - s) micro-batches alive on stage s at the price of one more forward pass.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

# The buckets and ZeRO-3 limits megaclip writes into DeepSpeed configs (the one builder).
from megaclip.config.deepspeed import BUCKET_ELEMS, ZERO3_GRAD_BUFFER_ELEMS, ZERO3_LIVE_ELEMS
from megaclip.config.model import ClipConfig
from megaclip.config.parallel import ParallelConfig, check_tensor_parallel
from megaclip.config.train import LOSS_CHUNK_SIZE
from megaclip.errors import ConfigError
from megaclip.model.flops import (
    block_params,
    model_cost,
    text_embed_params,
    text_head_params,
    vision_embed_params,
    vision_head_params,
)
from megaclip.pipeline.partition import StageRanges, partition

#: DeepSpeed's fallback all-reduce buffer for ZeRO-0 wrappers (MEMORY_OPT_ALLREDUCE_SIZE).
ALLREDUCE_FALLBACK_ELEMS = 500_000_000
#: DeepSpeed 0.19.8's own default reduce/all-gather bucket (elements), used when a config sets none.
DEEPSPEED_DEFAULT_BUCKET_ELEMS = 500_000_000


def bytes_per_element(precision: str) -> int:
    """2 for bf16/fp16, 4 for fp32."""
    return 4 if precision == "fp32" else 2


# ---------------------------------------------------------------- parameter counts per TP rank


def _check_range(name: str, r: tuple[int, int], layers: int) -> None:
    a, b = r
    if not 0 <= a <= b <= layers:
        raise ConfigError(f"{name} block range [{a}, {b}) is outside [0, {layers}]")


def stage_param_count(
    cfg: ClipConfig,
    tp: int,
    vision_range: tuple[int, int],
    text_range: tuple[int, int],
    first: bool,
    last: bool,
) -> int:
    """Exact parameters held by one TP rank of a pipeline stage with the given block ranges.

    Blocks count :func:`megaclip.model.flops.block_params` (split as the sharding table says);
    ``first`` adds both towers' embeddings (and ln_pre), ``last`` both heads and
    ``logit_scale``. With tp = 1 and one stage holding everything this equals
    ``model_cost(cfg).params_total``.
    """
    check_tensor_parallel(cfg, tp)
    _check_range("vision", vision_range, cfg.vision.layers)
    _check_range("text", text_range, cfg.text.layers)
    v, t = cfg.vision, cfg.text
    n = (vision_range[1] - vision_range[0]) * block_params(v.width, v.mlp_dim, tp)
    n += (text_range[1] - text_range[0]) * block_params(t.width, t.mlp_dim, tp)
    if first:
        n += vision_embed_params(v) + text_embed_params(t)
    if last:
        scalars = 1 + (cfg.init_logit_bias is not None)  # logit_scale (+ SigLIP's logit_bias)
        n += vision_head_params(v, cfg.embed_dim) + text_head_params(t, cfg.embed_dim) + scalars
    return n


# ---------------------------------------------------------------- disk: checkpoints, exports


def checkpoint_bytes_per_param(precision: str, zero_stage: int) -> int:
    """Tensor bytes one parameter takes in a saved checkpoint (DeepSpeed 0.19.8's files).

    Adam's two fp32 moments (8), the fp32 master copy (4) where the optimizer keeps one apart
    from the module (every case but fp32 ZeRO-0, where the module is the master), and the
    module in its training dtype where DeepSpeed saves it (ZeRO < 3; ZeRO-3's module files hold
    empty partitions). fp32: 12 (ZeRO-0), 16 (ZeRO-1/2), 12 (ZeRO-3); bf16: 14, 14, 12.
    """
    module = 0 if zero_stage == 3 else bytes_per_element(precision)
    master = 0 if (precision == "fp32" and zero_stage == 0) else 4
    return module + master + 8


def checkpoint_bytes(cfg: ClipConfig, par: ParallelConfig) -> int:
    """Tensor bytes of one full checkpoint of this layout, every rank's files together: each
    (stage, TP rank) saves its parameters once (replicated ones once per TP rank)."""
    params = par.tp * sum(stage_params(cfg, par.tp, s) for s in default_stages(cfg, par.pp))
    return params * checkpoint_bytes_per_param(par.precision, par.zero_stage)


def export_bytes(cfg: ClipConfig) -> int:
    """Bytes of the run's final open_clip export: every parameter once, in fp32."""
    return 4 * model_cost(cfg).params_total


# ---------------------------------------------------------------- stage layouts


class StageLike(Protocol):
    """Anything with block ranges and first/last flags (e.g. megaclip.pipeline's StagePlan)."""

    @property
    def vision(self) -> tuple[int, int]: ...

    @property
    def text(self) -> tuple[int, int]: ...

    @property
    def first(self) -> bool: ...

    @property
    def last(self) -> bool: ...


def _split(n: int, parts: int, extra_last: bool) -> list[int]:
    base, rem = divmod(n, parts)
    counts = [base] * parts
    order = range(parts - 1, parts - 1 - rem, -1) if extra_last else range(rem)
    for i in order:
        counts[i] += 1
    return counts


def even_stages(cfg: ClipConfig, pp: int) -> tuple[StageRanges, ...]:
    """An even approximation of the FLOP-balanced partition: each tower split into pp ranges.

    Every stage gets floor or ceil of L/pp blocks of each tower; leftover vision blocks go to the
    last stages (stage 0 also runs the patch embedding), leftover text blocks to the first ones,
    so the two remainders land on different stages. Exact when pp divides both depths.
    """
    if not 1 <= pp <= cfg.vision.layers + cfg.text.layers:
        raise ConfigError(
            f"cannot split {cfg.vision.layers} vision + {cfg.text.layers} text blocks "
            f"into {pp} pipeline stages"
        )
    nv = _split(cfg.vision.layers, pp, extra_last=True)
    nt = _split(cfg.text.layers, pp, extra_last=False)
    stages, v0, t0 = [], 0, 0
    for s in range(pp):
        stages.append(StageRanges(s, pp, (v0, v0 + nv[s]), (t0, t0 + nt[s])))
        v0, t0 = v0 + nv[s], t0 + nt[s]
    return tuple(stages)


def default_stages(cfg: ClipConfig, pp: int) -> tuple[StageLike, ...]:
    """The stages megaclip trains with: megaclip.pipeline's FLOP-balanced partition(cfg, pp)."""
    return tuple(partition(cfg, pp))


def stage_params(cfg: ClipConfig, tp: int, stage: StageLike) -> int:
    """:func:`stage_param_count` for a stage object."""
    return stage_param_count(cfg, tp, stage.vision, stage.text, stage.first, stage.last)


# ---------------------------------------------------------------- model states


def optimizer_wrapper(par: ParallelConfig, grad_accum_fp32: bool = False) -> str:
    """Which DeepSpeed 0.19.8 optimizer wrapper a layout gets (engine._do_optimizer_sanity_check).

    ZeRO >= 1 -> "zero" ("bf16_optimizer" for bf16 + ZeRO-1 + fp32 gradient accumulation);
    ZeRO-0: fp32 -> "torch"; bf16 under the pipeline engine -> "bf16_optimizer"; other
    16-bit -> "fp16_optimizer" (DeepSpeed's FP16_Optimizer, also for bf16 with PP = 1).
    """
    mixed = par.precision != "fp32"
    if par.zero_stage >= 1:
        if par.precision == "bf16" and grad_accum_fp32 and par.zero_stage == 1:
            return "bf16_optimizer"
        return "zero"
    if not mixed:
        return "torch"
    if grad_accum_fp32:
        raise ConfigError(
            "DeepSpeed 0.19.8 rejects fp32 gradient accumulation with 16-bit parameters at "
            "ZeRO stage 0; use zero_stage: 1"
        )
    if par.precision == "bf16" and par.pp > 1:
        return "bf16_optimizer"
    return "fp16_optimizer"


@dataclass(frozen=True)
class StateBytes:
    """Model-state bytes of one rank, split by when they are live.

    ``params``, ``grads`` and ``optimizer`` are what the rank holds at the optimizer step (what
    :func:`megaclip.bench.memory.count_state` counts in a real engine); ``buffers`` persistent
    communication buffers (ZeRO-3's gradient bucket: the count's "other"); ``working`` bytes
    live only during forward/backward, on top of the activations (ZeRO-1's accumulated full
    gradients when m > 1, ZeRO-1/2's reduce buckets, ZeRO-3's gathered blocks);
    ``step_transient`` bytes live only inside ``optimizer.step()``.
    """

    params: float
    grads: float
    optimizer: float
    step_transient: float
    buffers: float = 0.0
    working: float = 0.0
    grad_buffer: float = 0.0  # ZeRO-3's fp32 gradient buffer (sized by its optimizer sub-group)

    @property
    def model_states(self) -> float:
        """params + grads + optimizer: the counted model states at the optimizer step."""
        return self.params + self.grads + self.optimizer

    @property
    def resident(self) -> float:
        """Bytes held for the whole step: model states + persistent buffers."""
        return self.model_states + self.buffers + self.grad_buffer


def model_state_bytes(
    n: int,
    par: ParallelConfig,
    *,
    grad_accum_fp32: bool = False,
    zero3_live_params: int = 0,
    reduce_bucket_elems: int = BUCKET_ELEMS,
    allgather_bucket_elems: int = BUCKET_ELEMS,
    overlap_comm: bool = True,
    zero3_sub_group_elems: int = ZERO3_GRAD_BUFFER_ELEMS,
    host: bool = False,
) -> StateBytes:
    """Bytes of a rank holding ``n`` parameters under DeepSpeed 0.19.8 (module docstring table).

    ZeRO-3 also keeps a fp32 gradient buffer of the largest optimizer sub-group's *full* size:
    ``4 min(n, zero3_sub_group_elems)`` (``sub_group_size`` x dp; megaclip caps it at 1e8,
    DeepSpeed's default would give 4n). ``host``: a CPU rank's resident set, where a bucket
    counts only as far as it is written (min(bucket, n)); on a GPU it is allocated whole.

    ``zero3_live_params``: parameters ZeRO-3 holds gathered at once (current + prefetched
    block). ``reduce_bucket_elems`` / ``allgather_bucket_elems`` / ``overlap_comm``: the
    DeepSpeed ``zero_optimization`` settings (the planner writes 5e7, 5e7, true; DeepSpeed's
    defaults are 5e8, 5e8, false). ZeRO-1/2 allocate ``1 + overlap_comm`` reduce buckets
    during each backward; ZeRO-3 one for its whole life (``contiguous_gradients``).
    """
    d = par.dp
    w = bytes_per_element(par.precision)
    g = 4 if grad_accum_fp32 else w
    wrapper = optimizer_wrapper(par, grad_accum_fp32)
    if wrapper == "torch":
        return StateBytes(4 * n, 4 * n, 8 * n, 4 * min(n, ALLREDUCE_FALLBACK_ELEMS))
    if wrapper == "fp16_optimizer":
        ar = 2 * min(n, ALLREDUCE_FALLBACK_ELEMS)
        return StateBytes(2 * n, 2 * n, 12 * n, 4 * n + ar)
    if wrapper == "bf16_optimizer":
        transient = (4 * n / d if g == 2 else 0) + 2 * min(n, ALLREDUCE_FALLBACK_ELEMS)
        return StateBytes(2 * n, (2 + g) * n, 12 * n / d, transient)
    # ZeRO-1/2/3: fp32 master + Adam m, v partitioned; the reduced gradient partition g n / d.
    transient = 4 * n / d + w * min(n, allgather_bucket_elems)  # fp32 grad partition + gather
    if par.zero_stage in (1, 2):
        buckets = (2 if overlap_comm else 1) * reduce_bucket_elems
        # ZeRO-1 stages reductions in the accumulation dtype, ZeRO-2 in the parameter dtype.
        working = (g if par.zero_stage == 1 else w) * buckets
        if par.zero_stage == 1 and par.grad_accum_steps > 1:
            working += g * n  # full .grad accumulated until the boundary micro-batch reduces it
        return StateBytes(w * n, g * n / d, 12 * n / d, transient, working=working)
    bucket = min(reduce_bucket_elems, n) if host else reduce_bucket_elems
    return StateBytes(
        w * n / d,
        g * n / d,
        12 * n / d,
        w * min(n, allgather_bucket_elems),  # the fp32 step gradient lives in grad_buffer
        buffers=w * bucket,
        working=w * zero3_live_params,
        grad_buffer=4 * min(n, zero3_sub_group_elems),
    )


def rank_model_states(
    cfg: ClipConfig,
    par: ParallelConfig,
    pp_rank: int = 0,
    stages: tuple[StageLike, ...] | None = None,
    **kwargs: object,
) -> StateBytes:
    """:func:`model_state_bytes` of one rank of pipeline stage ``pp_rank``.

    ``stages`` default to :func:`default_stages` (megaclip.pipeline's partition); ``kwargs``
    go to :func:`model_state_bytes` (``zero3_live_params`` defaults to two of the widest block).
    """
    stages = default_stages(cfg, par.pp) if stages is None else stages
    n = stage_params(cfg, par.tp, stages[pp_rank])
    if par.zero_stage == 3:
        kwargs.setdefault("zero3_live_params", _zero3_live(cfg, par.tp))
    return model_state_bytes(n, par, **kwargs)  # type: ignore[arg-type]


def _zero3_live(cfg: ClipConfig, tp: int) -> int:
    v, t = cfg.vision, cfg.text
    return 2 * max(
        block_params(v.width, v.mlp_dim, tp),
        block_params(t.width, t.mlp_dim, tp),
    )


# ---------------------------------------------------------------- activations


def block_activation_bytes(
    tokens: int,
    width: int,
    mlp_dim: int,
    heads: int,
    tp: int,
    act_bytes: int,
    stats_bytes: int = 4,
) -> float:
    """Saved activations of one block for T = b * S tokens: T [a (4W + 4W/t + 2M/t) + 4h/t + 4s].

    ``stats_bytes`` (s): bytes of a LayerNorm mean/rstd value (4 on CUDA, the dtype's on CPU).
    """
    per_token = act_bytes * (4 * width + (4 * width + 2 * mlp_dim) / tp)
    per_token += 4 * heads / tp + 4 * stats_bytes
    return tokens * per_token


def alive_micro_batches(par: ParallelConfig, stage_index: int, schedule: str = "keep") -> int:
    """Micro-batches whose activations are alive at the peak on stage ``stage_index``.

    "keep" (megaclip's exact global loss): all m, on every stage. "recompute" (features from a
    no-grad pass, then DeepSpeed's stock 1F1B schedule): min(m, P - stage_index).
    """
    if schedule == "keep":
        return par.grad_accum_steps
    if schedule == "recompute":
        return min(par.grad_accum_steps, par.pp - stage_index)
    raise ConfigError(f"unknown schedule '{schedule}'; valid: keep, recompute")


def stage_activation_bytes(
    cfg: ClipConfig, par: ParallelConfig, stage: StageLike, micro_batches: int | None = None
) -> float:
    """Peak activation bytes of one stage rank with ``micro_batches`` (default: accum) alive.

    Stored per micro-batch: every block's saved activations (or only its input when
    checkpointing), stage 0's embedding outputs, the stage's output kept for its gradient
    (PP > 1). Working set on top: one block's full activations being recomputed (checkpointing)
    plus two input-sized gradient buffers of the widest block.
    """
    m = par.grad_accum_steps if micro_batches is None else micro_batches
    b, t, a = par.micro_batch_size, par.tp, bytes_per_element(par.precision)
    v, x = cfg.vision, cfg.text
    tv, tt = b * v.seq_len, b * x.context_length
    nv = stage.vision[1] - stage.vision[0]
    nt = stage.text[1] - stage.text[0]
    full_v = block_activation_bytes(tv, v.width, v.mlp_dim, v.heads, t, a)
    full_t = block_activation_bytes(tt, x.width, x.mlp_dim, x.heads, t, a)
    in_v, in_t = a * tv * v.width, a * tt * x.width
    if par.activation_checkpointing:
        stored = nv * in_v + nt * in_t
        work = max(full_v if nv else 0.0, full_t if nt else 0.0)
    else:
        stored = nv * full_v + nt * full_t
        work = 0.0
    work += 2 * max(in_v if nv else 0.0, in_t if nt else 0.0)
    if stage.first:
        image = 4 * b * v.channels * v.image_size**2  # fp32 pixels from the loader
        stored += image + 3 * in_v + in_t + 8 * tt  # conv out, +pos, ln_pre; text embed; ids
    if par.pp > 1 and not stage.last:
        stored += in_v + in_t  # the stage output, kept until its gradient arrives
    return m * stored + work


def loss_bytes(
    cfg: ClipConfig, par: ParallelConfig, loss_chunk: int | None = LOSS_CHUNK_SIZE
) -> float:
    """Loss bytes on a last-stage rank: gathered fp32 features 2NE, their grads, a logits chunk
    of ``loss_chunk`` columns (``train.loss_chunk_size``; None: the whole batch)."""
    n = par.global_batch_size
    rows = par.micro_batch_size * par.grad_accum_steps
    feats = 2 * n * cfg.embed_dim * 4
    cols = n if loss_chunk is None else min(n, loss_chunk)
    return 2 * feats + 2 * rows * cols * 4


# ---------------------------------------------------------------- totals


@dataclass(frozen=True)
class StageMemory:
    """Peak bytes of one rank of one pipeline stage, by kind."""

    stage: int
    params_count: int
    params: float
    grads: float
    optimizer: float
    activations: float
    loss: float
    step_transient: float
    buffers: float = 0.0
    working: float = 0.0
    grad_buffer: float = 0.0

    @property
    def peak(self) -> float:
        """states + buffers + max(activations + loss + working, optimizer-step transient)."""
        resident = self.params + self.grads + self.optimizer + self.buffers + self.grad_buffer
        return resident + max(self.activations + self.loss + self.working, self.step_transient)

    def as_dict(self) -> dict[str, float]:
        gib = 2**30
        return {
            "stage": self.stage,
            "params_count": self.params_count,
            "params_gib": self.params / gib,
            "grads_gib": self.grads / gib,
            "optimizer_gib": self.optimizer / gib,
            "activations_gib": self.activations / gib,
            "loss_gib": self.loss / gib,
            "step_transient_gib": self.step_transient / gib,
            "buffers_gib": self.buffers / gib,
            "working_gib": self.working / gib,
            "grad_buffer_gib": self.grad_buffer / gib,
            "peak_gib": self.peak / gib,
        }


def stage_memory(
    cfg: ClipConfig,
    par: ParallelConfig,
    stage: StageLike,
    index: int = 0,
    *,
    grad_accum_fp32: bool = False,
    schedule: str = "keep",
    buckets: dict[str, object] | None = None,
    loss_chunk: int | None = LOSS_CHUNK_SIZE,
) -> StageMemory:
    """Peak memory breakdown of one rank of stage number ``index`` under layout ``par``.

    ``buckets``: DeepSpeed bucket settings for :func:`model_state_bytes` (planner's defaults);
    ``loss_chunk``: the run's ``train.loss_chunk_size``.
    """
    n = stage_params(cfg, par.tp, stage)
    kw = dict(buckets or {})
    live = 0
    if par.zero_stage == 3:  # gathered: the live limit plus a prefetch bucket, or 2 blocks
        limit = kw.pop("zero3_live_elems", None)
        prefetch = kw.pop("zero3_prefetch_elems", BUCKET_ELEMS)
        live = _zero3_live(cfg, par.tp) if limit is None else min(n, limit + prefetch)
    else:
        kw.pop("zero3_live_elems", None)
        kw.pop("zero3_prefetch_elems", None)
    states = model_state_bytes(
        n, par, grad_accum_fp32=grad_accum_fp32, zero3_live_params=live, **kw
    )
    acts = stage_activation_bytes(cfg, par, stage, alive_micro_batches(par, index, schedule))
    loss = loss_bytes(cfg, par, loss_chunk) if stage.last else 0.0
    return StageMemory(
        index,
        n,
        states.params,
        states.grads,
        states.optimizer,
        acts,
        loss,
        states.step_transient,
        states.buffers,
        states.working,
        states.grad_buffer,
    )


def layout_memory(
    cfg: ClipConfig,
    par: ParallelConfig,
    stages: tuple[StageLike, ...] | None = None,
    *,
    grad_accum_fp32: bool = False,
    schedule: str = "keep",
    buckets: dict[str, object] | None = None,
    loss_chunk: int | None = LOSS_CHUNK_SIZE,
) -> tuple[StageMemory, ...]:
    """Per-stage memory of a layout (stages default to :func:`default_stages`)."""
    stages = default_stages(cfg, par.pp) if stages is None else stages
    if len(stages) != par.pp:
        raise ConfigError(f"got {len(stages)} stage ranges for pp={par.pp}")
    return tuple(
        stage_memory(
            cfg,
            par,
            s,
            i,
            grad_accum_fp32=grad_accum_fp32,
            schedule=schedule,
            buckets=buckets,
            loss_chunk=loss_chunk,
        )
        for i, s in enumerate(stages)
    )


# ---------------------------------------------------------------- a run's ranks


#: Resident bytes of a CPU rank before any model state: the interpreter, torch, DeepSpeed,
#: megatron-core, gloo (measured: megaclip.train.memlog's "build" phase start on this machine).
HOST_RUNTIME_BYTES = 0.74 * 2**30


@dataclass(frozen=True)
class RankMemory:
    """Predicted peak of one global rank: its stage's breakdown plus the process runtime."""

    rank: int
    stage: StageMemory
    runtime: float

    @property
    def peak(self) -> float:
        return self.stage.peak + self.runtime


def schedule_without_budget(par: ParallelConfig) -> str:
    """``par.schedule`` with "auto" resolved without a memory budget: recompute only where
    keeping the graphs cannot run (ZeRO-3 with accumulation), else keep."""
    if par.schedule != "auto":
        return par.schedule
    if par.pp == 1 and par.zero_stage == 3 and par.grad_accum_steps > 1:
        return "recompute"
    return "keep"


def choose_schedule(
    cfg: ClipConfig,
    par: ParallelConfig,
    budget_bytes: float | None = None,
    *,
    host: bool = False,
    ds: Mapping[str, object] | None = None,
    loss_chunk: int | None = LOSS_CHUNK_SIZE,
) -> str:
    """The exact-loss schedule ``par`` trains with: "keep" or "recompute" ("auto" resolved).

    "auto": recompute where keeping graphs cannot run (ZeRO-3 with accumulation) or where the
    planner predicts that keeping every micro-batch's graph exceeds ``budget_bytes`` (per rank,
    runtime included on a host) while recomputing fits; otherwise keep (one forward fewer).
    With one micro-batch the two are the same computation: keep.
    """
    unbudgeted = schedule_without_budget(par)
    if par.schedule != "auto" or unbudgeted == "recompute" or par.grad_accum_steps == 1:
        return unbudgeted
    if budget_bytes is None:
        return "keep"
    peaks = rank_peaks(cfg, par, host=host, ds=ds, schedule="keep", loss_chunk=loss_chunk)
    kept = max(r.peak for r in peaks)
    return "keep" if kept <= budget_bytes else "recompute"


def ds_buckets(ds: Mapping[str, object] | None, dp: int = 1) -> dict[str, object]:
    """:func:`model_state_bytes` bucket settings of a DeepSpeed config (None: the planner's)."""
    if ds is None:
        return {"zero3_live_elems": ZERO3_LIVE_ELEMS}
    zero = ds.get("zero_optimization") or {}
    assert isinstance(zero, dict)
    stage = zero.get("stage", 0)
    dp_default = 1_000_000_000  # DeepSpeed 0.19.8: sub_group_size, max_live_parameters
    out: dict[str, object] = {
        "reduce_bucket_elems": int(zero.get("reduce_bucket_size", DEEPSPEED_DEFAULT_BUCKET_ELEMS)),
        "allgather_bucket_elems": int(
            zero.get("allgather_bucket_size", DEEPSPEED_DEFAULT_BUCKET_ELEMS)
        ),
        "overlap_comm": bool(zero.get("overlap_comm", stage == 3)),  # DeepSpeed 0.19.8's default
    }
    if stage == 3:
        sub = int(zero.get("sub_group_size", dp_default))
        out["zero3_sub_group_elems"] = sub * dp
        out["zero3_live_elems"] = int(zero.get("stage3_max_live_parameters", dp_default))
        out["zero3_prefetch_elems"] = int(zero.get("stage3_prefetch_bucket_size", BUCKET_ELEMS))
    return out


def rank_peaks(
    cfg: ClipConfig,
    par: ParallelConfig,
    *,
    host: bool,
    ds: Mapping[str, object] | None = None,
    schedule: str | None = None,
    loss_chunk: int | None = LOSS_CHUNK_SIZE,
) -> list[RankMemory]:
    """Predicted peak memory of every global rank of a run (``host``: a CPU rank's RSS).

    ``ds``: the run's resolved DeepSpeed config (its bucket sizes); None: the planner's.
    ``loss_chunk``: the run's ``train.loss_chunk_size``.
    """
    buckets = {**ds_buckets(ds, par.dp), "host": host}
    schedule = schedule or choose_schedule(cfg, par, host=host, ds=ds, loss_chunk=loss_chunk)
    mem = layout_memory(cfg, par, schedule=schedule, buckets=buckets, loss_chunk=loss_chunk)
    runtime = HOST_RUNTIME_BYTES if host else 0.0
    out = []
    for rank in range(par.world_size):
        stage = rank // (par.tp * par.dp)  # rank order: TP fastest, then DP, then PP
        out.append(RankMemory(rank, mem[stage], runtime))
    return out
