"""Bytes each rank sends per training step, by class of communication (pure formulas).

Ring collectives over n ranks on a tensor of S bytes (the *full* tensor), per rank:

    all-reduce      2 (n - 1) / n * S   sent (and as much received)
    reduce-scatter    (n - 1) / n * S
    all-gather        (n - 1) / n * S   (S = the gathered result)

Notation: b micro-batch, m = grad_accum_steps micro-batches per step, t/p/d the TP/PP/DP sizes,
a bytes per activation element, w bytes per parameter, g bytes per gradient, n parameters on
the rank, S_v/S_t and W_v/W_t sequence lengths and widths, E embed dim, N global batch.

TP (per block, per micro-batch): the row-parallel out-proj and fc2 all-reduce [b, S, W] in
forward; the column-parallel QKV and fc1 all-reduce the input gradient in backward: 4 all-reduces
of b S W a bytes, 6 with activation checkpointing (the recomputed forward repeats its two):

    V_tp = m * sum_blocks k * 2 (t - 1) / t * b S W a,   k = 4 (6 with checkpointing)

PP (DeepSpeed pipeline engine, per stage boundary and micro-batch): one packed tensor of
P = b (S_v W_v + S_t W_t) a bytes forward and its gradient backward. With t > 1 the engine's
default ``pipe_partitioned`` / ``grad_partitioned`` send 1/t of it from every TP rank and
all-gather it over TP on arrival:

    V_pp = m * 2 * P / t  (p2p)   +   m * 2 * (t - 1) / t * P  (TP all-gather, if t > 1)

DP gradient synchronisation per step (n parameters of this rank's stage shard):

    ZeRO-0  (torch / fp16_optimizer):  all-reduce(g n)                          = 2 (d-1)/d g n
    ZeRO-0  (bf16_optimizer, PP > 1):  all-reduce(g n) + all-gather(w n)         (fp32 master
                                       and Adam are partitioned, updated params gathered back)
    ZeRO-1:  reduce-scatter(g n) + all-gather(w n)                           = (d-1)/d (g + w) n
    ZeRO-2:  m * reduce-scatter(g n) + all-gather(w n)   (gradients are reduced every micro-batch)
    ZeRO-3:  m * [reduce-scatter(g n) + 2 * all-gather(w n)]  (parameters gathered for forward and
             again for backward, every micro-batch; the recompute reuses the backward gather)

Contrastive loss (global-loss step, once per step): all-gather the image and text features of
the global batch over DP and reduce-scatter their gradients back, in fp32:

    V_loss = 2 * (d - 1)/d * 2 N E * 4
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megaclip.config.model import ClipConfig
from megaclip.config.parallel import ParallelConfig
from megaclip.perf.memory import BUCKET_ELEMS, StageLike, bytes_per_element, optimizer_wrapper

FEATURE_BYTES = 4  # the loss gathers fp32 features


def all_reduce_bytes(size: float, n: int) -> float:
    """Ring all-reduce of ``size`` bytes over ``n`` ranks: 2 (n-1)/n * size sent per rank."""
    return 2 * (n - 1) / n * size


def reduce_scatter_bytes(size: float, n: int) -> float:
    """Ring reduce-scatter of a ``size``-byte tensor: (n-1)/n * size sent per rank."""
    return (n - 1) / n * size


def all_gather_bytes(size: float, n: int) -> float:
    """Ring all-gather producing ``size`` bytes: (n-1)/n * size sent per rank."""
    return (n - 1) / n * size


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


def _blocks(stage: StageLike) -> tuple[int, int]:
    return stage.vision[1] - stage.vision[0], stage.text[1] - stage.text[0]


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


def packed_stage_bytes(cfg: ClipConfig, par: ParallelConfig) -> float:
    """Bytes of the packed inter-stage tensor of one micro-batch: b (S_v W_v + S_t W_t) a."""
    v, x = cfg.vision, cfg.text
    elems = par.micro_batch_size * (v.seq_len * v.width + x.context_length * x.width)
    return elems * bytes_per_element(par.precision)


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
