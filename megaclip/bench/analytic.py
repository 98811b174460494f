"""Analytic per-rank communication volume and model-state memory of megaclip's engine.

These are the formulas the measured figures of benchmarks/comm_volume.py and
benchmarks/memory_accounting.py are compared with. They describe what megaclip's ClipEngine
*does* with DeepSpeed 0.19.8 (checked call by call with :mod:`megaclip.bench.comm`), not an
idealised algorithm; where DeepSpeed differs from the textbook (ZeRO-1/2 all-reduce the whole
gradient instead of reduce-scattering it) the formula follows DeepSpeed. All functions are pure.

Notation: b micro-batch, m micro-batches per step (grad accumulation), t/p/d the TP/PP/DP sizes,
a = w bytes per activation/parameter element (4 fp32, 2 bf16/fp16), g bytes per communicated
gradient (= w), n parameters held by this rank's stage shard (after TP), S_v/S_t/W_v/W_t the
vision/text sequence lengths and widths, E the embedding dim, N = b m d the global batch.

Communication per rank per step (payload = logical tensor bytes; "sent" = ring bytes, see
:func:`megaclip.bench.comm.sent_bytes`):

TP   every residual block of the stage, every micro-batch: k all-reduces of [b, S, W] in a;
     k = 4 (2 forward: out-proj, fc2; 2 backward: input grads of QKV, fc1), +2 with activation
     checkpointing (the recomputed forward), +2 with PP > 1 (the no-grad feature pass).
PP   stage s < p-1 sends, per micro-batch and pass (2 passes: feature pass + training pass),
     the packed activations P = b (S_v W_v + S_t W_t) a and the EOT positions (b int64);
     stage s > 0 sends the gradient of its input (P) once per micro-batch. With t > 1
     DeepSpeed partitions each float message over TP (P / t per rank, plus an 8-int64 meta
     tensor) and all-gathers it over TP on arrival (receiver: 2m gathers of P) and before the
     backward of its own output (sender: m gathers of its output, m of the received grads).
DP   ZeRO-0: one all-reduce of g n per step. ZeRO-1: all-reduce of g n at the accumulation
     boundary (DeepSpeed 0.19.8's default ``use_multi_rank_bucket_allreduce``), then an
     all-gather of the updated w n. ZeRO-2: the same but the all-reduce runs every micro-batch
     (m times). ZeRO-3: a reduce-scatter of g n per micro-batch; parameters all-gathered once
     per step when m = 1 (the backward reuses the forward's gather: the model is smaller than
     ``stage3_max_reuse_distance``), 2 m times when m > 1 (megaclip runs all m forwards before
     the backwards, so every use re-gathers); needs ``stage3_param_persistence_threshold: 0``,
     else small parameters stay resident and are never gathered.
loss on the last stage with d > 1: all-gather of the fp32 features [m b, 2E] of every DP rank
     (N 2E 4 bytes) and of the per-row statistics ((3 m b + 3) d 4 bytes); no communication in
     the loss backward.
Not modelled (reported separately by the benchmark, each < 1 KB per step): grad-norm scalars,
the pipeline's loss broadcast and barrier, megaclip's metrics broadcast, ZeRO-3's int64
bookkeeping broadcasts; DeepSpeed's padding of flat partitions to a multiple of d.

Model states per rank (bytes) at the optimizer step (accumulation boundary), AdamW, n parameters
of this rank (after TP and PP), d DP ranks, w bytes per parameter:

    ZeRO-0 fp32 (torch AdamW):  params 4n     grads 4n      optimizer 8n (exp_avg, exp_avg_sq)
    ZeRO-1 / ZeRO-2:            params w n    grads w n/d   optimizer 12n/d
    ZeRO-3:                     params w n/d  grads w n/d   optimizer 12n/d

12n/d = the fp32 master partition (4) + Adam's two moments (8): DeepSpeed keeps a separate fp32
master even for fp32 models. In DeepSpeed 0.19.8 ZeRO-1 with one micro-batch per step reduces
its gradients into a partition buffer exactly as ZeRO-2 does (the full ``param.grad`` is freed
before the step); the fp32 gradient of each master partition exists only inside the step, one
parameter group at a time. Differences the formula ignores: ZeRO-1/2's gradient buffer holds
*whole* parameters that straddle a partition boundary; flat partitions are padded to a
multiple of d; torch's per-parameter ``step`` counters; communication buckets (reported as
"other": ZeRO-3 allocates ``reduce_bucket_size`` elements up front, 5e8 by default).
"""

from __future__ import annotations

from dataclasses import dataclass

from megaclip.bench.comm import sent_bytes
from megaclip.config.model import ClipConfig
from megaclip.config.parallel import ParallelConfig
from megaclip.model.flops import block_params, text_params, vision_params
from megaclip.pipeline.partition import StagePlan, partition

EOT_BYTES = 8  # int64 EOT position per sample travelling with the packed activations
META_BYTES = 8 * 8  # DeepSpeed's PartitionedTensor meta: 8 int64 values (TP > 1 only)
FEATURE_BYTES = 4  # the loss gathers fp32 features


def elem_bytes(precision: str) -> int:
    """Bytes per parameter/activation element: 4 for fp32, 2 for bf16/fp16."""
    return 4 if precision == "fp32" else 2


# ---------------------------------------------------------------- parameters per rank


def block_params_tp(width: int, mlp_dim: int, tp: int) -> int:
    """One block's parameters on one TP rank: QKV, fc1 (weights + biases) and out-proj/fc2
    weights split t ways; out-proj/fc2 biases and both LayerNorms replicated (6W)."""
    split = block_params(width, mlp_dim) - 6 * width
    return split // tp + 6 * width


def stage_of(cfg: ClipConfig, par: ParallelConfig, pp_rank: int) -> StagePlan | None:
    """The StagePlan of pipeline rank ``pp_rank`` (None when pp = 1: the whole model)."""
    return None if par.pp == 1 else partition(cfg, par.pp)[pp_rank]


def rank_params(cfg: ClipConfig, tp: int, plan: StagePlan | None) -> int:
    """Parameters held by one TP rank of a stage (``plan`` None: the whole model)."""
    v, t = cfg.vision, cfg.text
    if plan is None:
        nv, nt, first, last = v.layers, t.layers, True, True
    else:
        nv = plan.vision[1] - plan.vision[0]
        nt = plan.text[1] - plan.text[0]
        first, last = plan.first, plan.last
    n = nv * block_params_tp(v.width, v.mlp_dim, tp) + nt * block_params_tp(t.width, t.mlp_dim, tp)
    vis_blocks = v.layers * block_params(v.width, v.mlp_dim)
    txt_blocks = t.layers * block_params(t.width, t.mlp_dim)
    vis_head = 2 * v.width + v.width * cfg.embed_dim
    txt_head = 2 * t.width + t.width * cfg.embed_dim
    if first:
        n += vision_params(v, cfg.embed_dim) - vis_blocks - vis_head
        n += text_params(t, cfg.embed_dim) - txt_blocks - txt_head
    if last:
        n += vis_head + txt_head + 1  # + logit_scale
    return n


# ---------------------------------------------------------------- communication


@dataclass(frozen=True)
class Volume:
    """Analytic traffic of one (class, op) of a rank per step: calls, payload, bytes sent."""

    cls: str
    op: str
    calls: float | None  # None: not modelled (only the bytes are)
    payload_bytes: float
    sent_bytes: float


def _vol(cls: str, op: str, calls: float, payload_each: float, n: int) -> Volume:
    payload = calls * payload_each
    return Volume(cls, op, calls, payload, sent_bytes(op, payload, n))


def _blocks(cfg: ClipConfig, plan: StagePlan | None) -> tuple[int, int]:
    if plan is None:
        return cfg.vision.layers, cfg.text.layers
    return plan.vision[1] - plan.vision[0], plan.text[1] - plan.text[0]


def tp_volume(cfg: ClipConfig, par: ParallelConfig, plan: StagePlan | None) -> list[Volume]:
    """TP activation all-reduces of one stage rank per step (module docstring, "TP")."""
    t = par.tp
    if t == 1:
        return []
    nv, nt = _blocks(cfg, plan)
    k = 4 + (2 if par.activation_checkpointing else 0) + (2 if par.pp > 1 else 0)
    b, m, a = par.micro_batch_size, par.grad_accum_steps, elem_bytes(par.precision)
    v, x = cfg.vision, cfg.text
    calls = m * k * (nv + nt)
    payload = m * k * b * a * (nv * v.seq_len * v.width + nt * x.context_length * x.width)
    return [Volume("tp", "all_reduce", calls, payload, sent_bytes("all_reduce", payload, t))]


def packed_bytes(cfg: ClipConfig, par: ParallelConfig) -> int:
    """Bytes of one micro-batch's packed inter-stage activations: b (S_v W_v + S_t W_t) a."""
    v, x = cfg.vision, cfg.text
    elems = v.seq_len * v.width + x.context_length * x.width
    return par.micro_batch_size * elems * elem_bytes(par.precision)


def pp_volume(cfg: ClipConfig, par: ParallelConfig, plan: StagePlan | None) -> list[Volume]:
    """Pipeline p2p (and its TP all-gathers) of one stage rank per step (docstring, "PP")."""
    if par.pp == 1 or plan is None:
        return []
    m, t, b = par.grad_accum_steps, par.tp, par.micro_batch_size
    size = packed_bytes(cfg, par)
    part = size / t
    meta = META_BYTES if t > 1 else 0
    send_calls = send_bytes = recv_calls = recv_bytes = 0.0
    gathers = 0
    if not plan.last:  # activations forward, twice (feature pass + training pass)
        send_calls += 2 * m * (2 if t > 1 else 1) + 2 * m
        send_bytes += 2 * m * (part + meta + b * EOT_BYTES)
        recv_calls += m * (2 if t > 1 else 1)
        recv_bytes += m * (part + meta)
        gathers += 2 * m if t > 1 else 0
    if not plan.first:  # gradients backward, once
        send_calls += m * (2 if t > 1 else 1)
        send_bytes += m * (part + meta)
        recv_calls += 2 * m * (2 if t > 1 else 1) + 2 * m
        recv_bytes += 2 * m * (part + meta + b * EOT_BYTES)
        gathers += 2 * m if t > 1 else 0
    out = [
        Volume("pp", "send", send_calls, send_bytes, send_bytes),
        Volume("pp", "recv", recv_calls, recv_bytes, 0.0),
    ]
    if gathers:
        out.append(_vol("tp", "all_gather", gathers, size, t))
    return out


def dp_volume(n: int, par: ParallelConfig) -> list[Volume]:
    """DP gradient / parameter traffic of a rank holding ``n`` parameters (docstring, "DP")."""
    d = par.dp
    if d == 1:
        return []
    w = elem_bytes(par.precision)
    g = w
    m = par.grad_accum_steps
    z = par.zero_stage
    if z == 0:
        return [_vol("dp", "all_reduce", 1, g * n, d)]
    if z in (1, 2):
        reduces = 1 if z == 1 else m
        return [_vol("dp", "all_reduce", reduces, g * n, d), _vol("dp", "all_gather", 1, w * n, d)]
    gathers = 1 if m == 1 else 2 * m
    return [
        _vol("dp", "reduce_scatter", m, g * n, d),
        Volume(
            "dp",
            "all_gather",
            None,  # one coalesced or many per-parameter gathers: only the bytes are modelled
            gathers * w * n,
            sent_bytes("all_gather", gathers * w * n, d),
        ),
    ]


def loss_volume(cfg: ClipConfig, par: ParallelConfig, plan: StagePlan | None) -> list[Volume]:
    """Feature and statistics all-gathers of the exact global-batch loss (last stage, d > 1)."""
    d = par.dp
    if d == 1 or (plan is not None and not plan.last):
        return []
    rows = par.micro_batch_size * par.grad_accum_steps
    feats = d * rows * 2 * cfg.embed_dim * FEATURE_BYTES
    stats = d * (3 * rows + 3) * 4
    return [
        Volume("loss", "all_gather", 2, feats + stats, sent_bytes("all_gather", feats + stats, d))
    ]


def comm_volume(cfg: ClipConfig, par: ParallelConfig, pp_rank: int = 0) -> list[Volume]:
    """Every modelled (class, op) volume of one rank of pipeline stage ``pp_rank`` per step."""
    plan = stage_of(cfg, par, pp_rank)
    n = rank_params(cfg, par.tp, plan)
    return (
        tp_volume(cfg, par, plan)
        + pp_volume(cfg, par, plan)
        + dp_volume(n, par)
        + loss_volume(cfg, par, plan)
    )


# ---------------------------------------------------------------- model-state memory


@dataclass(frozen=True)
class StateMemory:
    """Analytic bytes of parameters, gradients and optimizer states on one rank."""

    params: float
    grads: float
    optimizer: float

    @property
    def total(self) -> float:
        """params + grads + optimizer."""
        return self.params + self.grads + self.optimizer

    def as_dict(self) -> dict[str, float]:
        """The three categories and their total, in bytes."""
        return {
            "params": self.params,
            "grads": self.grads,
            "optimizer": self.optimizer,
            "total": self.total,
        }


def state_memory(n: int, par: ParallelConfig) -> StateMemory:
    """Model-state bytes of a rank holding ``n`` parameters (table in the module docstring)."""
    d, z, w = par.dp, par.zero_stage, elem_bytes(par.precision)
    if z == 0:
        if par.precision != "fp32":
            raise ValueError("the ZeRO-0 formula covers fp32 only (torch AdamW, no wrapper)")
        return StateMemory(4 * n, 4 * n, 8 * n)
    if z in (1, 2):
        return StateMemory(w * n, w * n / d, 12 * n / d)
    return StateMemory(w * n / d, w * n / d, 12 * n / d)


def rank_state_memory(cfg: ClipConfig, par: ParallelConfig, pp_rank: int = 0) -> StateMemory:
    """:func:`state_memory` for the parameters of one rank of stage ``pp_rank``."""
    return state_memory(rank_params(cfg, par.tp, stage_of(cfg, par, pp_rank)), par)
