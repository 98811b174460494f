"""Predicted time of one training step of a layout (analytic roofline + communication model).

Per pipeline stage and micro-batch (b samples; MACs from :mod:`megaclip.model.flops`, block
MACs divided by TP, embeddings and heads replicated):

    tau_f = 2 MACs / (peak * e_mm * sat) + X / (hbm * e_mem) + TP_f
    tau_b = (4 [+ 2 recompute]) MACs / (peak * e_mm * sat) + (2 [+ 1]) X / (hbm * e_mem) + TP_b

- ``sat = T / (T + T_half)``: small GEMMs are slower; T = b * S tokens per GEMM, T_half = 256
  (an assumption, not fitted: the calibration runs use T > 20,000 where sat ~ 1);
- ``X``: forward elementwise HBM traffic (LayerNorms 2 x read + write W, two residual adds
  2 x read 2W + write W, GELU read + write M, fused attention reading q, k, v and writing its
  output 4W), per token per block ``10 W r + (4 W + 2 M) / t a`` bytes, with r the bytes
  of the residual stream (4 under PyTorch AMP, else as the activations) and a the activation
  bytes: the residual-stream part is replicated on every TP rank (no sequence parallelism);
- ``TP_f``, ``TP_b``: the blocks' TP all-reduces (2 forward, 2 backward, +2 when recomputing),
  each ``latency + 2 (t-1)/t * b S W a / (nvlink * e_link)``, not overlapped.

Step (GPipe order, P stages, m micro-batches; the slowest stage sets the pace):

    T = (m + P - 1) * (tau_f + tau_b + p2p)          # the (P-1) slots are the bubble:
                                                     # fraction (P-1)/(m+P-1) of this term
      + loss (gather/reduce-scatter features over DP + 12 rows N E FLOPs of logits)
      + exposed DP traffic + optimizer step (30 bytes of HBM traffic per owned parameter)

With the "recompute" schedule a no-grad forward pass (its own pipeline fill included) runs first:
``+ (m + P - 1) * (tau_f + p2p / 2)``.

Exposed DP traffic: the pipeline engine reduces gradients after the last backward (all of it
exposed); with PP = 1 a reduction runs under the backward of its micro-batch (ZeRO-0/1: the
last one, ZeRO-2/3: every one) and only the excess ``max(0, t_comm - tau_b)`` counts; ZeRO-3's
forward gathers likewise hide under ``tau_f``; parameter all-gathers after the step are exposed.
Link time of a DP collective: ``calls * latency + bytes / (bw * e_link)`` with bw NVLink inside
a node, else ``min(NVLink, k * NIC)`` for k group members per node (NCCL spreads rings over the
node's NICs); a p2p across nodes gets one NIC.

``e_mm`` and ``e_mem`` are fitted to published runs (:mod:`megaclip.perf.calibration`);
``e_link`` = 0.8, latencies 10 us (NVLink) / 30 us (network) and T_half are assumptions.
Data loading is assumed hidden by loader workers; the contrastive loss's own elementwise work and
kernel-launch gaps are folded into ``e_mem`` by the fit.
"""

from __future__ import annotations

from dataclasses import dataclass

from megaclip.config.model import ClipConfig
from megaclip.config.parallel import ParallelConfig
from megaclip.model.flops import block_macs, model_cost, vision_embed_macs
from megaclip.perf.comm import (
    Transfer,
    all_gather_bytes,
    all_reduce_bytes,
    dp_transfers,
    loss_transfers,
    packed_stage_bytes,
    placement,
)
from megaclip.perf.devices import Device
from megaclip.perf.memory import (
    StageLike,
    bytes_per_element,
    even_stages,
    optimizer_wrapper,
    stage_params,
)


@dataclass(frozen=True)
class Efficiency:
    """Achieved fractions of the device's peaks: the model's constants (see module docstring)."""

    matmul: float
    memory: float
    link: float = 0.8
    optimizer_memory: float = 0.5
    gemm_half_tokens: int = 256
    latency_intra_s: float = 10e-6
    latency_inter_s: float = 30e-6


@dataclass(frozen=True)
class Cluster:
    """``gpus`` devices in nodes of ``gpus_per_node``; NIC bandwidth per GPU overridable."""

    device: Device
    gpus: int
    gpus_per_node: int | None = None
    internode_gbps: float | None = None

    @property
    def node_size(self) -> int:
        """GPUs per node."""
        return self.gpus_per_node or self.device.gpus_per_node

    @property
    def nic_gbps(self) -> float:
        """Inter-node GB/s per GPU per direction."""
        return self.internode_gbps or self.device.internode_gbps


@dataclass(frozen=True)
class Workload:
    """Details of how a run executes that are not part of the layout (defaults: megaclip)."""

    residual_bytes: int | None = None  # 4 for PyTorch AMP (fp32 residual stream)
    grad_bytes: int | None = None  # bytes per communicated gradient (4 for AMP DDP)
    grad_accum_fp32: bool = False
    tf32: bool = True
    schedule: str = "keep"  # or "recompute": + one no-grad forward pass (features first)


@dataclass(frozen=True)
class StepTime:
    """Predicted seconds per step by part, and the throughput they imply."""

    compute_s: float
    tp_s: float
    pp_s: float
    bubble_s: float
    loss_s: float
    dp_exposed_s: float
    optimizer_s: float
    total_s: float
    samples_per_s: float
    samples_per_s_per_gpu: float
    mfu: float
    hfu: float
    bubble_fraction: float

    def as_dict(self) -> dict[str, float]:
        """All fields as a plain dict (for JSON)."""
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def block_elementwise_bytes(width: int, mlp_dim: int, tp: int, act: int, residual: int) -> float:
    """Forward elementwise HBM bytes per token of one block: 10 W r + (4 W + 2 M) / t a."""
    return 10 * width * residual + (4 * width + 2 * mlp_dim) * act / tp


def stage_macs(cfg: ClipConfig, tp: int, stage: StageLike) -> float:
    """Forward MACs per sample on one TP rank of ``stage`` (blocks / t; embeddings, heads whole)."""
    v, x = cfg.vision, cfg.text
    nv = stage.vision[1] - stage.vision[0]
    nt = stage.text[1] - stage.text[0]
    macs = nv * block_macs(v.width, v.mlp_dim, v.seq_len) / tp
    macs += nt * block_macs(x.width, x.mlp_dim, x.context_length) / tp
    if stage.first:
        macs += vision_embed_macs(v)
    if stage.last:
        macs += (v.width + x.width) * cfg.embed_dim
    return macs


def _link_time(tr: Transfer, par: ParallelConfig, cluster: Cluster, eff: Efficiency) -> float:
    place = placement(tr.group, par, cluster.node_size)
    nvlink = cluster.device.nvlink_gbps * 1e9
    if place.intra_node:
        bw, lat = nvlink, eff.latency_intra_s
    elif tr.group == "pp":
        bw, lat = min(nvlink, cluster.nic_gbps * 1e9), eff.latency_inter_s
    else:
        bw, lat = min(nvlink, place.members_per_node * cluster.nic_gbps * 1e9), eff.latency_inter_s
    return tr.calls * lat + tr.bytes / (bw * eff.link)


@dataclass(frozen=True)
class _StageTimes:
    fwd_compute: float
    bwd_compute: float
    fwd_tp: float
    bwd_tp: float


def _stage_times(
    cfg: ClipConfig,
    par: ParallelConfig,
    stage: StageLike,
    cluster: Cluster,
    eff: Efficiency,
    work: Workload,
) -> _StageTimes:
    dev, b, t = cluster.device, par.micro_batch_size, par.tp
    a = bytes_per_element(par.precision)
    r = work.residual_bytes or a
    v, x = cfg.vision, cfg.text
    nv = stage.vision[1] - stage.vision[0]
    nt = stage.text[1] - stage.text[0]
    tokens = b * (v.seq_len if nv or stage.first else x.context_length)
    sat = tokens / (tokens + eff.gemm_half_tokens)
    flops_per_mac_s = 1.0 / (dev.peak_flops(par.precision, work.tf32) * eff.matmul * sat)
    macs = b * stage_macs(cfg, t, stage)
    elem = b * nv * v.seq_len * block_elementwise_bytes(v.width, v.mlp_dim, t, a, r)
    elem += b * nt * x.context_length * block_elementwise_bytes(x.width, x.mlp_dim, t, a, r)
    elem_s = elem / (dev.hbm_gbps * 1e9 * eff.memory)
    recompute = par.activation_checkpointing
    fwd = 2 * macs * flops_per_mac_s + elem_s
    bwd = (6 if recompute else 4) * macs * flops_per_mac_s + (3 if recompute else 2) * elem_s
    fwd_tp = bwd_tp = 0.0
    if t > 1:
        bw = dev.nvlink_gbps * 1e9 * eff.link
        one_v = eff.latency_intra_s + all_reduce_bytes(b * v.seq_len * v.width * a, t) / bw
        one_t = eff.latency_intra_s + all_reduce_bytes(b * x.context_length * x.width * a, t) / bw
        per_pass = 2 * (nv * one_v + nt * one_t)
        fwd_tp = per_pass
        bwd_tp = per_pass * (2 if recompute else 1)
    return _StageTimes(fwd, bwd, fwd_tp, bwd_tp)


def step_time(
    cfg: ClipConfig,
    par: ParallelConfig,
    cluster: Cluster,
    eff: Efficiency,
    stages: tuple[StageLike, ...] | None = None,
    work: Workload | None = None,
) -> StepTime:
    """Predicted step time and throughput of ``par`` on ``cluster`` (module docstring model)."""
    work = work or Workload()
    stages = even_stages(cfg, par.pp) if stages is None else stages
    dev, m, p = cluster.device, par.grad_accum_steps, par.pp
    times = [_stage_times(cfg, par, s, cluster, eff, work) for s in stages]
    slow = max(times, key=lambda st: st.fwd_compute + st.bwd_compute + st.fwd_tp + st.bwd_tp)
    compute = slow.fwd_compute + slow.bwd_compute
    tp = slow.fwd_tp + slow.bwd_tp
    p2p = 0.0
    if p > 1:
        size = packed_stage_bytes(cfg, par)
        one = Transfer("p2p", "pp", "p2p", 2 * size / par.tp, 2)
        p2p = _link_time(one, par, cluster, eff)
        if par.tp > 1:
            gather = Transfer("gather", "tp", "p2p", 2 * all_gather_bytes(size, par.tp), 2)
            p2p += _link_time(gather, par, cluster, eff)
    slot = compute + tp + p2p
    bubble = (p - 1) * slot
    if work.schedule == "recompute":  # the no-grad feature pass: forwards only, its own fill
        extra = slow.fwd_compute + slow.fwd_tp + p2p / 2
        compute += slow.fwd_compute
        tp += slow.fwd_tp
        p2p += p2p / 2
        bubble += (p - 1) * extra
        slot += extra

    # the global-batch loss: features over DP, then the logits on the last stage
    loss_s = sum(_link_time(tr, par, cluster, eff) for tr in loss_transfers(cfg, par))
    rows = par.micro_batch_size * m
    loss_flops = 12 * rows * par.global_batch_size * cfg.embed_dim
    loss_s += loss_flops / (dev.peak_flops(par.precision, work.tf32) * eff.matmul)

    # DP traffic of the slowest-to-sync stage (the one with most parameters)
    n = max(stage_params(cfg, par.tp, s) for s in stages)
    dp = dp_transfers(n, par, grad_bytes=work.grad_bytes, grad_accum_fp32=work.grad_accum_fp32)
    by_phase: dict[str, float] = {}
    for tr in dp:
        by_phase[tr.phase] = by_phase.get(tr.phase, 0.0) + _link_time(tr, par, cluster, eff)
    fwd_mb = slow.fwd_compute + slow.fwd_tp
    bwd_mb = slow.bwd_compute + slow.bwd_tp
    if p > 1:
        exposed = sum(by_phase.values())
    elif par.zero_stage >= 2:
        exposed = m * max(0.0, by_phase.get("backward", 0.0) / m - bwd_mb)
        exposed += m * max(0.0, by_phase.get("forward", 0.0) / m - fwd_mb)
        exposed += by_phase.get("step", 0.0)
    else:
        exposed = max(0.0, by_phase.get("backward", 0.0) - bwd_mb) + by_phase.get("step", 0.0)

    wrapper = optimizer_wrapper(par, work.grad_accum_fp32)
    owned = n if wrapper in ("torch", "fp16_optimizer") else n / par.dp
    optimizer_s = 30 * owned / (dev.hbm_gbps * 1e9 * eff.optimizer_memory)

    total = m * slot + bubble + loss_s + exposed + optimizer_s
    samples = par.global_batch_size / total
    per_gpu = samples / par.world_size
    cost = model_cost(cfg)
    peak = dev.peak_flops(par.precision, work.tf32)
    mfu = per_gpu * cost.train_flops / peak
    hfu = per_gpu * cost.hardware_flops(par.activation_checkpointing) / peak
    return StepTime(
        compute_s=m * compute,
        tp_s=m * tp,
        pp_s=m * p2p,
        bubble_s=bubble,
        loss_s=loss_s,
        dp_exposed_s=exposed,
        optimizer_s=optimizer_s,
        total_s=total,
        samples_per_s=samples,
        samples_per_s_per_gpu=per_gpu,
        mfu=mfu,
        hfu=hfu,
        bubble_fraction=(p - 1) / (m + p - 1),
    )
