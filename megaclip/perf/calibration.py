"""Fit the step-time model's two efficiencies to published CLIP training runs.

The model (:mod:`megaclip.perf.timing`) has two free constants: ``e_mm``, the fraction of the
tensor-core peak reached by matmuls, and ``e_mem``, the fraction of HBM bandwidth reached by the
elementwise-traffic estimate (it also absorbs whatever else scales with tokens x width: unfused
kernels, launch gaps, loader stalls). Two published runs give two equations; :func:`fit` solves
them (Newton's method on log e), so the fit reproduces both runs by construction.
:data:`CALIBRATED` holds the fitted values rounded to 3 digits; the tests check that they still
reproduce the runs within :data:`BAND` (i.e. that the formulas did not drift) and that a refit
gives them back. The only independent check is :data:`CROSS_CHECK`, not used in the fit.

Both runs used OpenCLIP with PyTorch DDP and AMP: modelled as pure data parallelism (tp = pp = 1,
ZeRO-0, one micro-batch per step), fp32 gradients all-reduced (4 bytes) and an fp32 residual
stream (r = 4), activation checkpointing on (stated for G/14; assumed for L/14, whose batch of
84 per 40 GB GPU needs it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from megaclip.config.model import load_preset
from megaclip.config.parallel import ParallelConfig
from megaclip.perf.devices import get_device
from megaclip.perf.timing import Cluster, Efficiency, StepTime, Workload, step_time


@dataclass(frozen=True)
class PublishedRun:
    """A published training run: model, hardware, batch and measured samples/s/GPU."""

    name: str
    model: str
    device: str
    gpus: int
    gpus_per_node: int
    global_batch: int
    precision: str
    samples_per_s_per_gpu: float
    source: str
    internode_gbps: float | None = None

    def layout(self) -> ParallelConfig:
        """The run's layout in megaclip terms: DDP = dp over all GPUs, ZeRO-0, no accumulation."""
        return ParallelConfig(
            tp=1,
            pp=1,
            dp=self.gpus,
            zero_stage=0,
            micro_batch_size=self.global_batch // self.gpus,
            grad_accum_steps=1,
            precision=self.precision,  # type: ignore[arg-type]
            activation_checkpointing=True,
        )

    def cluster(self) -> Cluster:
        """The run's GPUs, node size and network."""
        return Cluster(get_device(self.device), self.gpus, self.gpus_per_node, self.internode_gbps)


AMP_DDP = Workload(residual_bytes=4, grad_bytes=4)

RUNS: tuple[PublishedRun, ...] = (
    PublishedRun(
        # 34B samples in 122 h on 1024 A100-40GB = 75.6 samples/s/GPU (about 13% MFU).
        # JUWELS Booster: 4 A100-40GB per node, 4x HDR200 InfiniBand per node (25 GB/s per GPU).
        # Batch 86k (Cherti et al. 2023, "Reproducible scaling laws for contrastive
        # language-image learning", ViT-L/14 34B-sample run) = 84 per GPU.
        name="ViT-L/14 LAION-2B (JUWELS)",
        model="ViT-L-14",
        device="a100-40gb",
        gpus=1024,
        gpus_per_node=4,
        global_batch=84 * 1024,
        precision="fp16",
        samples_per_s_per_gpu=34e9 / (122 * 3600) / 1024,
        source="Cherti et al. 2023; LAION ViT-L/14 model card",
    ),
    PublishedRun(
        # "Unmasked fine-tuning was done on 512 A100 GPUs at a speed of roughly 10,450
        # samples/s or 20.4 samples/s/GPU"; "to scale up the batch size to 160k, we used
        # gradient checkpointing and 80GB VRAM A100s" (LAION blog "Reaching 80% zero-shot
        # accuracy with OpenCLIP: ViT-G/14 trained on LAION-2B", Jan 2023).
        # Batch assumed 160k = 163,840 = 320 per GPU; node size 8, default A100 NICs.
        name="ViT-G/14 fine-tune (LAION blog)",
        model="ViT-G-14",
        device="a100-80gb",
        gpus=512,
        gpus_per_node=8,
        global_batch=320 * 512,
        precision="bf16",
        samples_per_s_per_gpu=10450 / 512,
        source="laion.ai/blog/giant-openclip",
    ),
)

#: Fitted by :func:`fit` on :data:`RUNS` and rounded; used by the planner by default.
CALIBRATED = Efficiency(matmul=0.542, memory=0.133)

#: Relative error allowed between CALIBRATED's predictions and the published runs.
BAND = 0.05


@dataclass(frozen=True)
class CrossCheck:
    """An independent ratio: NeMo's ViT-g/14 throughput on 128 H100 over 128 A100-80GB."""

    model: str = "ViT-g-14"
    gpus: int = 128
    a100_samples_per_s: float = 8633.0
    h100_samples_per_s: float = 13829.0
    source: str = "NVIDIA NeMo framework user guide, CLIP performance page (16 DGX nodes)"

    @property
    def ratio(self) -> float:
        """Published H100 / A100 samples/s."""
        return self.h100_samples_per_s / self.a100_samples_per_s


CROSS_CHECK = CrossCheck()


def predict(run: PublishedRun, eff: Efficiency) -> StepTime:
    """The model's step time for ``run`` with efficiencies ``eff``."""
    return step_time(load_preset(run.model), run.layout(), run.cluster(), eff, work=AMP_DDP)


def fit(runs: tuple[PublishedRun, ...] = RUNS, start: Efficiency = CALIBRATED) -> Efficiency:
    """Solve for (e_mm, e_mem) so that both runs' predicted samples/s/GPU equal the published."""
    if len(runs) != 2:
        raise ValueError("fit() needs exactly two runs for its two unknowns")
    x = [math.log(start.matmul), math.log(start.memory)]

    def residual(z: list[float]) -> list[float]:
        eff = replace(start, matmul=math.exp(z[0]), memory=math.exp(z[1]))
        return [
            math.log(predict(r, eff).samples_per_s_per_gpu / r.samples_per_s_per_gpu) for r in runs
        ]

    for _ in range(50):
        f = residual(x)
        if max(abs(v) for v in f) < 1e-10:
            break
        h = 1e-6
        jac = []
        for j in range(2):
            z = list(x)
            z[j] += h
            fj = residual(z)
            jac.append([(fj[i] - f[i]) / h for i in range(2)])
        # jac[j][i] = d f_i / d x_j ; solve J dx = -f
        a, b, c, d = jac[0][0], jac[1][0], jac[0][1], jac[1][1]
        det = a * d - b * c
        if det == 0:
            raise ValueError("calibration runs do not constrain both efficiencies")
        dx0 = (-f[0] * d + f[1] * b) / det
        dx1 = (-f[1] * a + f[0] * c) / det
        x = [x[0] + dx0, x[1] + dx1]
    return replace(start, matmul=math.exp(x[0]), memory=math.exp(x[1]))


def cross_check_ratio(eff: Efficiency = CALIBRATED, micro_batch: int = 64) -> float:
    """Predicted H100 / A100-80GB throughput ratio for :data:`CROSS_CHECK` (DP only, bf16)."""
    cfg = load_preset(CROSS_CHECK.model)
    n = CROSS_CHECK.gpus
    par = ParallelConfig(
        dp=n, zero_stage=1, micro_batch_size=micro_batch, precision="bf16", tp=1, pp=1
    )
    rates = [
        step_time(cfg, par, Cluster(get_device(d), n), eff).samples_per_s
        for d in ("a100-80gb", "h100-80gb")
    ]
    return rates[1] / rates[0]
