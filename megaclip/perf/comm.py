"""Bytes each rank sends per training step, by class of communication (pure formulas).

One module, two views of the same traffic:

- **accounting** (:func:`comm_volume`, :class:`Volume`): every (class, op) of one rank of
  megaclip's engine under DeepSpeed 0.19.8, calls and payloads, as counted call by call by
  :class:`megaclip.bench.comm.CommCounter` (benchmarks/comm_volume.py compares the two);
- **step time** (:func:`stage_transfers`, :class:`Transfer`): what the planner's step-time model
  (:mod:`megaclip.perf.timing`) charges to links, with the phase each transfer can overlap.

Ring collectives over n ranks on a tensor of S bytes (the *full* tensor), per rank
(:func:`sent_bytes`):

    all-reduce      2 (n - 1) / n * S   sent (and as much received)
    reduce-scatter    (n - 1) / n * S     all-gather  (n - 1) / n * S   (S = the gathered result)
    broadcast/reduce  (n - 1) / n * S     gather/scatter  S / n
    send              S                   recv 0 (counted on the sender)

Notation: b micro-batch, m = grad_accum_steps micro-batches per step, t/p/d the TP/PP/DP sizes,
a bytes per activation element, w bytes per parameter, g bytes per gradient (= w unless fp32
accumulation), n parameters on the rank (its stage's TP shard), S_v/S_t and W_v/W_t sequence
lengths and widths, E embed dim, N = b m d the global batch, P = b (S_v W_v + S_t W_t) a the
packed inter-stage activations of one micro-batch.

Accounting, per rank per step:

TP   every residual block of the stage, every micro-batch: k all-reduces of [b, S, W] in a;
     k = 4 (2 forward: out-proj, fc2; 2 backward: input grads of QKV, fc1), +2 with activation
     checkpointing (the recomputed forward), +2 when a no-grad feature pass runs first (the
     "recompute" schedule, :func:`megaclip.perf.memory.schedule_without_budget`:
     ``parallel.schedule: recompute``, or ZeRO-3 with accumulation; at PP = 1 only with
     accumulation); f = 2 forward passes then, else f = 1 (the single-pass "keep" schedule).
PP   stage s < p-1 sends, per micro-batch and forward pass, P and the EOT positions (b int64);
     stage s > 0 sends the gradient of its input (P) once per micro-batch. With t > 1 DeepSpeed
     partitions each float message over TP (P / t per rank, plus an 8-int64 meta tensor) and
     all-gathers it over TP on arrival (receiver: f m gathers of P) and before the backward of
     its own output (sender: m gathers of its output, m of the received grads).
DP   ZeRO-0: one all-reduce of g n per step. ZeRO-1: all-reduce of g n at the accumulation
     boundary (DeepSpeed 0.19.8's default ``use_multi_rank_bucket_allreduce``), then an
     all-gather of the updated w n. ZeRO-2: the same but the all-reduce runs every micro-batch
     (m times). ZeRO-3: a reduce-scatter of g n per micro-batch; parameters all-gathered once
     per step when m = 1 (the backward reuses the forward's gather: the model is smaller than
     ``stage3_max_reuse_distance``), 3 m times when m > 1 (every use re-gathers: the no-grad
     feature pass, then each micro-batch's forward and backward); needs
     ``stage3_param_persistence_threshold: 0``, else small parameters stay resident and are
     never gathered.
loss on the last stage with d > 1: all-gather of the fp32 features [m b, 2E] of every DP rank
     (N 2E 4 bytes) and of the per-row statistics ((3 m b + 3) d 4 bytes); no communication in
     the loss backward.
Not modelled (reported separately by the benchmark, each < 1 KB per step): grad-norm scalars,
the pipeline's loss broadcast and barrier, megaclip's metrics broadcast, ZeRO-3's int64
bookkeeping broadcasts; DeepSpeed's padding of flat partitions to a multiple of d.

Step time (the planner), per rank per step:

    V_tp = m * sum_blocks k * 2 (t - 1) / t * b S W a,   k = 4 (6 with checkpointing)
    V_pp = m * 2 * P / t  (p2p)   +   m * 2 * (t - 1) / t * P  (TP all-gather, if t > 1)

    ZeRO-0  (torch / fp16_optimizer):  all-reduce(g n)                          = 2 (d-1)/d g n
    ZeRO-0  (bf16_optimizer, PP > 1):  all-reduce(g n) + all-gather(w n)         (fp32 master
                                       and Adam are partitioned, updated params gathered back)
    ZeRO-1:  reduce-scatter(g n) + all-gather(w n)                           = (d-1)/d (g + w) n
    ZeRO-2:  m * reduce-scatter(g n) + all-gather(w n)   (gradients are reduced every micro-batch)
    ZeRO-3:  m * [reduce-scatter(g n) + 2 * all-gather(w n)]  (parameters gathered for forward and
             again for backward, every micro-batch; the recompute reuses the backward gather)

    V_loss = 2 * (d - 1)/d * 2 N E * 4   (features all-gathered, their gradients reduce-scattered)

Where the planner differs from the accounting (kept as calibrated; docs/planner.md):
ZeRO-1/2 gradients as a reduce-scatter, not DeepSpeed's all-reduce; ZeRO-3 always re-gathers
for the backward (a giant model exceeds ``stage3_max_reuse_distance``); no feature pass, EOT
ids or meta tensors; the loss's reduce-scatter instead of the per-row statistics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megaclip.config.model import ClipConfig
from megaclip.config.parallel import ParallelConfig, forward_passes
from megaclip.perf.memory import (
    BUCKET_ELEMS,
    StageLike,
    bytes_per_element,
    default_stages,
    optimizer_wrapper,
    schedule_without_budget,
    stage_params,
)

FEATURE_BYTES = 4  # the loss gathers fp32 features
EOT_BYTES = 8  # int64 EOT position per sample travelling with the packed activations
META_BYTES = 8 * 8  # DeepSpeed's PartitionedTensor meta: 8 int64 values (TP > 1 only)


# ---------------------------------------------------------------- ring collectives


def sent_bytes(op: str, payload: float, n: int) -> float:
    """Bytes one rank sends for ``op`` on ``payload`` bytes over ``n`` ranks (ring algorithms)."""
    if n <= 1 or op in ("recv", "barrier"):
        return 0.0
    if op == "all_reduce":
        return 2.0 * (n - 1) / n * payload
    if op in ("all_gather", "reduce_scatter", "all_to_all", "broadcast", "reduce"):
        return (n - 1) / n * payload
    if op in ("gather", "scatter"):
        return payload / n
    if op == "send":
        return float(payload)
    raise ValueError(f"unknown collective kind {op!r}")


def all_reduce_bytes(size: float, n: int) -> float:
    """Ring all-reduce of ``size`` bytes over ``n`` ranks: 2 (n-1)/n * size sent per rank."""
    return sent_bytes("all_reduce", size, n)


def reduce_scatter_bytes(size: float, n: int) -> float:
    """Ring reduce-scatter of a ``size``-byte tensor: (n-1)/n * size sent per rank."""
    return sent_bytes("reduce_scatter", size, n)


def all_gather_bytes(size: float, n: int) -> float:
    """Ring all-gather producing ``size`` bytes: (n-1)/n * size sent per rank."""
    return sent_bytes("all_gather", size, n)


def packed_stage_bytes(cfg: ClipConfig, par: ParallelConfig) -> float:
    """Bytes of the packed inter-stage tensor of one micro-batch: b (S_v W_v + S_t W_t) a."""
    v, x = cfg.vision, cfg.text
    elems = par.micro_batch_size * (v.seq_len * v.width + x.context_length * x.width)
    return elems * bytes_per_element(par.precision)


def _blocks(stage: StageLike) -> tuple[int, int]:
    return stage.vision[1] - stage.vision[0], stage.text[1] - stage.text[0]


# ---------------------------------------------------------------- accounting (op by op)


@dataclass(frozen=True)
class Volume:
    """Traffic of one (class, op) of a rank per step: calls, payload, bytes sent."""

    cls: str
    op: str
    calls: float | None  # None: not modelled (only the bytes are)
    payload_bytes: float
    sent_bytes: float


def _vol(cls: str, op: str, calls: float, payload_each: float, n: int) -> Volume:
    payload = calls * payload_each
    return Volume(cls, op, calls, payload, sent_bytes(op, payload, n))


def _forward_passes(par: ParallelConfig) -> int:
    """Forward passes per micro-batch and step of ``par`` (its schedule resolved budget-free)."""
    return forward_passes(schedule_without_budget(par), par.pp, par.grad_accum_steps)


def tp_volume(cfg: ClipConfig, par: ParallelConfig, stage: StageLike) -> list[Volume]:
    """TP activation all-reduces of one stage rank per step (module docstring, "TP")."""
    t = par.tp
    if t == 1:
        return []
    nv, nt = _blocks(stage)
    k = 2 + 2 * _forward_passes(par) + (2 if par.activation_checkpointing else 0)
    b, m, a = par.micro_batch_size, par.grad_accum_steps, bytes_per_element(par.precision)
    v, x = cfg.vision, cfg.text
    calls = m * k * (nv + nt)
    payload = m * k * b * a * (nv * v.seq_len * v.width + nt * x.context_length * x.width)
    return [Volume("tp", "all_reduce", calls, payload, sent_bytes("all_reduce", payload, t))]


def pp_volume(cfg: ClipConfig, par: ParallelConfig, stage: StageLike) -> list[Volume]:
    """Pipeline p2p (and its TP all-gathers) of one stage rank per step (docstring, "PP")."""
    if par.pp == 1:
        return []
    m, t, b = par.grad_accum_steps, par.tp, par.micro_batch_size
    f = _forward_passes(par)
    size = packed_stage_bytes(cfg, par)
    part = size / t
    meta = META_BYTES if t > 1 else 0
    send_calls = send_bytes = recv_calls = recv_bytes = 0.0
    gathers = 0
    if not stage.last:  # activations forward, once per forward pass; their gradients back
        send_calls += f * m * (2 if t > 1 else 1) + f * m
        send_bytes += f * m * (part + meta + b * EOT_BYTES)
        recv_calls += m * (2 if t > 1 else 1)
        recv_bytes += m * (part + meta)
        gathers += 2 * m if t > 1 else 0
    if not stage.first:  # gradients backward, once
        send_calls += m * (2 if t > 1 else 1)
        send_bytes += m * (part + meta)
        recv_calls += f * m * (2 if t > 1 else 1) + f * m
        recv_bytes += f * m * (part + meta + b * EOT_BYTES)
        gathers += f * m if t > 1 else 0
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
    w = g = bytes_per_element(par.precision)
    m, z = par.grad_accum_steps, par.zero_stage
    if z == 0:
        return [_vol("dp", "all_reduce", 1, g * n, d)]
    if z in (1, 2):
        reduces = 1 if z == 1 else m
        return [_vol("dp", "all_reduce", reduces, g * n, d), _vol("dp", "all_gather", 1, w * n, d)]
    gathered = (1 if m == 1 else (_forward_passes(par) + 1) * m) * w * n
    return [
        _vol("dp", "reduce_scatter", m, g * n, d),
        # one coalesced or many per-parameter gathers: only the bytes are modelled
        Volume("dp", "all_gather", None, gathered, sent_bytes("all_gather", gathered, d)),
    ]


def loss_volume(cfg: ClipConfig, par: ParallelConfig, stage: StageLike) -> list[Volume]:
    """Feature and statistics all-gathers of the exact global-batch loss (last stage, d > 1)."""
    d = par.dp
    if d == 1 or not stage.last:
        return []
    rows = par.micro_batch_size * par.grad_accum_steps
    feats = d * rows * 2 * cfg.embed_dim * FEATURE_BYTES
    stats = d * (3 * rows + 3) * 4
    return [
        Volume("loss", "all_gather", 2, feats + stats, sent_bytes("all_gather", feats + stats, d))
    ]


def comm_volume(cfg: ClipConfig, par: ParallelConfig, pp_rank: int = 0) -> list[Volume]:
    """Every modelled (class, op) volume of one rank of pipeline stage ``pp_rank`` per step."""
    stage = default_stages(cfg, par.pp)[pp_rank]
    n = stage_params(cfg, par.tp, stage)
    return (
        tp_volume(cfg, par, stage)
        + pp_volume(cfg, par, stage)
        + dp_volume(n, par)
        + loss_volume(cfg, par, stage)
    )


# ---------------------------------------------------------------- step time (the planner)


@dataclass(frozen=True)
class Transfer:
    """One class of communication of a rank in one step: bytes sent, calls, group and phase.

    ``group`` is "tp", "dp" or "pp" (whose links it uses); ``phase`` says what it may overlap
    with: "compute" (TP, on the critical path), "p2p", "loss", "backward" (DP gradient
    reduction that can run under backward), "forward" (ZeRO-3 gathers), "step" (after it).
    """

    name: str
    group: str
    phase: str
    bytes: float
    calls: int


def tp_transfers(cfg: ClipConfig, par: ParallelConfig, stage: StageLike) -> list[Transfer]:
    """TP activation all-reduces of one stage rank per step (see module docstring)."""
    if par.tp == 1:
        return []
    nv, nt = _blocks(stage)
    b, a, m, t = (
        par.micro_batch_size,
        bytes_per_element(par.precision),
        par.grad_accum_steps,
        par.tp,
    )
    k = 6 if par.activation_checkpointing else 4
    v, x = cfg.vision, cfg.text
    size_v = b * v.seq_len * v.width * a
    size_t = b * x.context_length * x.width * a
    total = m * k * (nv * all_reduce_bytes(size_v, t) + nt * all_reduce_bytes(size_t, t))
    return [Transfer("tp all-reduce (activations)", "tp", "compute", total, m * k * (nv + nt))]


def pp_transfers(cfg: ClipConfig, par: ParallelConfig) -> list[Transfer]:
    """Pipeline p2p of an interior stage rank per step: activations forward, gradients back."""
    if par.pp == 1:
        return []
    m, t = par.grad_accum_steps, par.tp
    size = packed_stage_bytes(cfg, par)
    out = [Transfer("pp p2p (activations + grads)", "pp", "p2p", m * 2 * size / t, 2 * m)]
    if t > 1:
        gather = m * 2 * all_gather_bytes(size, t)
        out.append(Transfer("pp partition all-gather", "tp", "p2p", gather, 2 * m))
    return out


def _calls(size: float, bucket_bytes: float) -> int:
    return max(1, math.ceil(size / bucket_bytes))


def dp_transfers(
    n: int,
    par: ParallelConfig,
    *,
    grad_bytes: int | None = None,
    grad_accum_fp32: bool = False,
) -> list[Transfer]:
    """DP gradient/parameter traffic per step of a rank holding ``n`` parameters (docstring).

    ``grad_bytes`` overrides the bytes per communicated gradient (e.g. 4 for PyTorch AMP DDP,
    which keeps fp32 gradients).
    """
    d = par.dp
    if d == 1:
        return []
    w = bytes_per_element(par.precision)
    g = grad_bytes if grad_bytes is not None else (4 if grad_accum_fp32 else w)
    m = par.grad_accum_steps
    wrapper = optimizer_wrapper(par, grad_accum_fp32)
    bucket = BUCKET_ELEMS * g
    grads, params = g * n, w * n
    if wrapper in ("torch", "fp16_optimizer"):
        return [
            Transfer(
                "dp all-reduce (grads)",
                "dp",
                "backward",
                all_reduce_bytes(grads, d),
                _calls(grads, bucket),
            )
        ]
    gather = Transfer(
        "dp all-gather (params)", "dp", "step", all_gather_bytes(params, d), _calls(params, bucket)
    )
    if wrapper == "bf16_optimizer":
        reduce = Transfer(
            "dp all-reduce (grads)",
            "dp",
            "backward",
            all_reduce_bytes(grads, d),
            _calls(grads, bucket),
        )
        return [reduce, gather]
    rs = reduce_scatter_bytes(grads, d)
    if par.zero_stage == 1:
        return [
            Transfer("dp reduce-scatter (grads)", "dp", "backward", rs, _calls(grads, bucket)),
            gather,
        ]
    if par.zero_stage == 2:
        reduce = Transfer(
            "dp reduce-scatter (grads)", "dp", "backward", m * rs, m * _calls(grads, bucket)
        )
        return [reduce, gather]
    ag = all_gather_bytes(params, d)
    return [
        Transfer("dp reduce-scatter (grads)", "dp", "backward", m * rs, m * _calls(grads, bucket)),
        Transfer(
            "dp all-gather (params, fwd)", "dp", "forward", m * ag, m * _calls(params, bucket)
        ),
        Transfer(
            "dp all-gather (params, bwd)", "dp", "backward", m * ag, m * _calls(params, bucket)
        ),
    ]


def loss_transfers(cfg: ClipConfig, par: ParallelConfig) -> list[Transfer]:
    """Feature all-gather and gradient reduce-scatter of the exact global-batch loss per step."""
    if par.dp == 1:
        return []
    size = 2 * par.global_batch_size * cfg.embed_dim * FEATURE_BYTES
    return [
        Transfer("loss all-gather (features)", "dp", "loss", all_gather_bytes(size, par.dp), 2),
        Transfer(
            "loss reduce-scatter (grads)", "dp", "loss", reduce_scatter_bytes(size, par.dp), 2
        ),
    ]


def stage_transfers(
    cfg: ClipConfig,
    par: ParallelConfig,
    stage: StageLike,
    n_params: int,
    *,
    grad_bytes: int | None = None,
    grad_accum_fp32: bool = False,
) -> list[Transfer]:
    """Everything one rank of ``stage`` sends in a step (loss traffic only on the last stage)."""
    out = tp_transfers(cfg, par, stage) + pp_transfers(cfg, par)
    out += dp_transfers(n_params, par, grad_bytes=grad_bytes, grad_accum_fp32=grad_accum_fp32)
    if stage.last:
        out += loss_transfers(cfg, par)
    return out


@dataclass(frozen=True)
class GroupPlacement:
    """How a process group sits on nodes: intra-node or not, and members per node."""

    size: int
    intra_node: bool
    members_per_node: int


def placement(group: str, par: ParallelConfig, gpus_per_node: int) -> GroupPlacement:
    """Placement of the "tp", "dp" or "pp" group with ranks ordered TP fastest, then DP, then PP.

    A group of ``size`` ranks at stride ``s`` spans s * size consecutive ranks; it is intra-node
    when that fits in one node, else it has min(size, gpus_per_node // s) members per node
    (at least 1). For "pp" the neighbours of a boundary are t * d ranks apart.
    """
    t, d, p = par.tp, par.dp, par.pp
    size, stride = {"tp": (t, 1), "dp": (d, t), "pp": (p, t * d)}[group]
    if stride * size <= gpus_per_node:
        return GroupPlacement(size, True, size)
    per_node = max(1, min(size, gpus_per_node // stride))
    return GroupPlacement(size, False, per_node)
