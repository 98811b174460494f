"""megaclip vs open_clip: the same CLIP, batch and precision, one process, alternating steps.

    python benchmarks/vs_open_clip.py --model ViT-B-32 --batch 8 --precision fp32,bf16 \
        --steps 5 [--device cuda] [--profile] [--json FILE]

megaclip side: ClipModel + megaclip.loss.clip_loss + torch AdamW. open_clip side: open_clip's
CLIP of the same architecture (megaclip.checkpoint.openclip.open_clip_model) with megaclip's
initial weights converted (so both compute the same loss) + open_clip's ClipLoss + torch AdamW
with the same parameter groups. bf16 = torch.autocast("cpu"/device, bfloat16) around forward and
loss for both, fp32 master weights (open_clip's --precision amp_bf16).

Timed steps alternate A B B A ... (so drift of a shared machine hits both alike). Each step is
timed in process CPU time (the primary figure: on a shared machine wall time mostly measures
the scheduler; with --threads 1, the default, CPU time is the work done) and in wall time.
Reported: medians per side, the ratio megaclip / open_clip, forward+backward without the
optimizer, and MFU = 6 x MACs x batch / step time / peak, where the peak is the best square GEMM
(megaclip.train.metrics.probe_matmul) of the same dtype measured in this process with the same
thread count, before and after the steps, in the same clock (CPU or wall). --profile prints
torch.profiler's top operators of one step of each side.

On a GPU (``--device cuda``, or ``auto``: the accelerator's device) both sides run there, each
step is timed between device synchronisations, the probe is a GPU GEMM, and ``mfu_datasheet``
is MFU against the GPU's dense datasheet peak (megaclip.perf.devices.datasheet_peak, e.g. H100/H200
bf16 989.4 TFLOP/s) next to ``mfu_step`` against the probe.
"""

from __future__ import annotations

import argparse
import sys
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from megaclip.bench.compare import report_all  # noqa: E402
from megaclip.bench.harness import synthetic_config  # noqa: E402
from megaclip.checkpoint.openclip import open_clip_model, to_open_clip  # noqa: E402
from megaclip.config.model import resolve_model  # noqa: E402
from megaclip.data.synthetic import synthetic_batch  # noqa: E402
from megaclip.loss.contrastive import clip_loss  # noqa: E402
from megaclip.model.clip import ClipModel  # noqa: E402
from megaclip.model.flops import model_cost  # noqa: E402
from megaclip.model.init import init_parameters  # noqa: E402
from megaclip.perf.devices import datasheet_peak  # noqa: E402
from megaclip.perf.throughput import median  # noqa: E402
from megaclip.train.metrics import probe_matmul  # noqa: E402
from megaclip.train.optim import build_optimizer, param_groups  # noqa: E402


class Side:
    """One implementation: model, loss, AdamW; ``step()`` runs one training step."""

    def __init__(self, name: str, model, loss_fn, precision: str, batch, device="cpu") -> None:
        self.name, self.model, self.loss_fn = name, model, loss_fn
        self.precision, self.batch, self.device = precision, batch, torch.device(device)
        self.opt = build_optimizer(param_groups(model, 0.2), lr=1e-5)
        self.times: list[float] = []  # wall seconds per step
        self.fwd_bwd: list[float] = []  # wall seconds of forward + loss + backward
        self.cpu: list[float] = []  # process CPU seconds per step
        self.cpu_fwd_bwd: list[float] = []
        self.losses: list[float] = []

    def _autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def _sync(self) -> None:
        """Timing on an accelerator: wait for its queued work (no-op on CPU)."""
        if self.device.type != "cpu":
            from deepspeed.accelerator import get_accelerator

            get_accelerator().synchronize()

    def step(self) -> None:
        """One training step (forward + loss + backward + AdamW), timed in wall and CPU time."""
        images, tokens = self.batch
        self._sync()
        t0, c0 = time.perf_counter(), time.process_time()
        with self._autocast():
            loss = self.loss_fn(self.model, images, tokens)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self._sync()
        t1, c1 = time.perf_counter(), time.process_time()
        self.opt.step()
        self._sync()
        t2, c2 = time.perf_counter(), time.process_time()
        self.times.append(t2 - t0)
        self.fwd_bwd.append(t1 - t0)
        self.cpu.append(c2 - c0)
        self.cpu_fwd_bwd.append(c1 - c0)
        self.losses.append(float(loss.detach()))

    def reset(self) -> None:
        """Forget the recorded times (after warm-up)."""
        self.times, self.fwd_bwd, self.cpu, self.cpu_fwd_bwd, self.losses = [], [], [], [], []


def megaclip_loss(max_scale: float):
    """megaclip's step loss: ClipModel features -> clip_loss (scale clamped like the engine)."""

    def fn(model, images, tokens):
        img, txt, scale = model(images, tokens)
        return clip_loss(img.float(), txt.float(), scale.clamp(0, max_scale).float()).loss

    return fn


def open_clip_loss():
    """open_clip's step loss: CLIP features -> ClipLoss."""
    from open_clip.loss import ClipLoss

    loss = ClipLoss()

    def fn(model, images, tokens):
        img, txt, scale = model(images, tokens)
        return loss(img.float(), txt.float(), scale.float())

    return fn


def build(model_name: str, batch: int, precision: str, seed: int, device="cpu"):
    """Both sides with identical initial weights and one shared synthetic batch."""
    cfg = resolve_model(model_name)
    mega = ClipModel(cfg)
    init_parameters(mega, cfg, seed)
    oc = open_clip_model(cfg)
    missing, unexpected = oc.load_state_dict(to_open_clip(mega.state_dict()), strict=False)
    if [k for k in missing if "attn_mask" not in k] or unexpected:
        raise RuntimeError(f"weight conversion mismatch: {missing} {unexpected}")
    gen = torch.Generator().manual_seed(seed)
    data = tuple(t.to(device) for t in synthetic_batch(synthetic_config(cfg, batch, seed), gen))
    mega.to(device).train()
    oc.to(device).train()
    a = Side("megaclip", mega, megaclip_loss(cfg.max_logit_scale), precision, data, device)
    b = Side("open_clip", oc, open_clip_loss(), precision, data, device)
    return cfg, a, b


def profile_step(side: Side, rows: int = 14) -> str:
    """torch.profiler table (top operators by self CPU time) of one step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        side.step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def run(args, precision: str) -> dict:
    """Warm up, alternate timed steps, probe the GEMM peak; medians, ratios, MFU."""
    device = resolve_device(args.device)
    cfg, mega, oc = build(args.model, args.batch, precision, args.seed, device)
    before = probe_matmul(precision, args.probe_size, 3, device)
    for _ in range(args.warmup):
        mega.step()
        oc.step()
    for s in (mega, oc):
        s.reset()
    for i in range(args.steps):
        order = (mega, oc) if i % 2 == 0 else (oc, mega)
        for side in order:
            side.step()
    after = probe_matmul(precision, args.probe_size, 3, device)
    peak = max(before.flops, after.flops)
    peak_cpu = max(before.cpu_flops or 0.0, after.cpu_flops or 0.0)
    flops = 6 * model_cost(cfg).macs_total * args.batch
    out = {
        "model": cfg.name,
        "batch": args.batch,
        "precision": precision,
        "threads": torch.get_num_threads(),
        "steps": args.steps,
        "peak_tflops": peak / 1e12,
        "peak_tflops_cpu_time": peak_cpu / 1e12,
        "peak_tflops_before_after": [before.flops / 1e12, after.flops / 1e12],
        "model_tflop_per_step": flops / 1e12,
        "device": str(device),
    }
    sheet = None
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
        sheet = datasheet_peak(out["device_name"], precision)
        out["datasheet_peak_tflops"] = sheet[0] / 1e12 if sheet else None
    for side in (mega, oc):
        t, fb = median(side.times), median(side.fwd_bwd)
        c, cfb = median(side.cpu), median(side.cpu_fwd_bwd)
        out[side.name] = {
            "step_s": t,
            "fwd_bwd_s": fb,
            "cpu_step_s": c,
            "cpu_fwd_bwd_s": cfb,
            "cpu_optimizer_s": c - cfb,
            "step_times": side.times,
            "cpu_times": side.cpu,
            "mfu_step": flops / t / peak,
            "mfu_datasheet": flops / t / sheet[0] if sheet else None,
            "mfu_cpu_step": flops / c / peak_cpu,
            "mfu_cpu_fwd_bwd": flops / cfb / peak_cpu,
            "last_loss": side.losses[-1],
        }
    m, o = out["megaclip"], out["open_clip"]
    out["ratio_step"] = m["step_s"] / o["step_s"]
    out["ratio_cpu_step"] = m["cpu_step_s"] / o["cpu_step_s"]
    out["ratio_cpu_fwd_bwd"] = m["cpu_fwd_bwd_s"] / o["cpu_fwd_bwd_s"]
    if args.profile:
        out["profile"] = {s.name: profile_step(s) for s in (mega, oc)}
    return out


def print_result(r: dict) -> None:
    """Print one precision's table (and profiles)."""
    print(
        f"\n## {r['model']} batch {r['batch']} {r['precision']} ({r['threads']} threads, "
        f"{r['steps']} alternating steps each; GEMM peak {r['peak_tflops_cpu_time']:.3f} "
        f"TFLOP/s per CPU second, {r['peak_tflops']:.3f} wall)"
    )
    head = ("", "CPU s", "CPU f+b", "CPU opt", "wall s", "MFU(CPU)", "MFU f+b", "MFU wall", "loss")
    widths = (10, 8, 8, 8, 8, 9, 8, 9, 8)
    print(" ".join(f"{h:>{w}}" if i else f"{h:<{w}}" for i, (h, w) in enumerate(zip(head, widths))))
    for name in ("megaclip", "open_clip"):
        s = r[name]
        cells = (
            f"{s['cpu_step_s']:.3f}",
            f"{s['cpu_fwd_bwd_s']:.3f}",
            f"{s['cpu_optimizer_s']:.3f}",
            f"{s['step_s']:.3f}",
            f"{100 * s['mfu_cpu_step']:.1f}%",
            f"{100 * s['mfu_cpu_fwd_bwd']:.1f}%",
            f"{100 * s['mfu_step']:.1f}%",
            f"{s['last_loss']:.4f}",
        )
        print(f"{name:<10} " + " ".join(f"{c:>{w}}" for c, w in zip(cells, widths[1:])))
    print(
        f"ratio megaclip/open_clip: CPU time per step {r['ratio_cpu_step']:.3f}, "
        f"forward+backward {r['ratio_cpu_fwd_bwd']:.3f}, wall per step {r['ratio_step']:.3f}"
    )
    for name, table in r.get("profile", {}).items():
        print(f"\n### torch.profiler, one step of {name}\n{table}")


def resolve_device(name: str) -> torch.device:
    """'cpu', 'cuda[:n]', or 'auto': the accelerator's device (megaclip.parallel.runtime)."""
    if name == "auto":
        from megaclip.parallel.device import device

        return device()
    return torch.device(name)


def main(argv: list[str] | None = None) -> int:
    """Run the requested precisions and print them."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--precision", default="fp32,bf16", help="comma list of fp32, bf16")
    p.add_argument("--steps", type=int, default=5, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--probe-size", type=int, default=2048)
    p.add_argument("--device", default="cpu", help="cpu, cuda[:n] or auto (the accelerator's)")
    p.add_argument("--profile", action="store_true")
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    return report_all(args.precision.split(","), lambda p: run(args, p), print_result, args.json)


if __name__ == "__main__":
    sys.exit(main())
