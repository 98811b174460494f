"""Peak memory and time of megaclip's chunked CLIP loss vs open_clip's ClipLoss, one DP rank.

One process stands in for one rank of a DP group of size ``--dp``: it holds b = N / dp local image
and text features and the N pre-gathered features of the whole group. Each loss runs forward +
backward on the same tensors, with the collectives replaced by local stand-ins that allocate what
the real collectives allocate: megaclip "allgather" mode the N x 2d gather buffer, "stream" mode
one fresh receive buffer of chunk x 2d per step (forward and again backward), both the gathered
per-row statistics; open_clip ``ClipLoss`` (local_loss=True with gather_with_grad=True, and
local_loss=False with gather_with_grad=False) runs its own code with ``gather_features`` replaced:
``all_gather`` becomes a copy of the pre-gathered features whose backward keeps this rank's slice
(as its reduce-scatter does). Communication time is not included for any of them.

Every measurement runs in a fresh subprocess (glibc told to mmap every allocation >= 128 KiB so
freed tensors leave RSS): one warm-up iteration, then the peak RSS high-water mark is reset
(/proc/self/clear_refs) and ``--repeats`` timed iterations run. Reported: the extra peak RSS over
the RSS right before the timed iterations (inputs, torch itself), and the best CPU time (user +
sys of the process, all threads; OpenMP threads told not to spin) and wall time. The table's time
columns and ratios use CPU time, which a shared, oversubscribed machine disturbs far less than
wall time; the JSON lines carry both (and the 1-minute load average).

    PYTHONPATH=. python benchmarks/loss_memory.py            # default sweep, ~2-4 minutes
    PYTHONPATH=. python benchmarks/loss_memory.py --n 4096 8192 --dp 64 --dim 1024
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMPLS = ("megaclip", "megaclip_stream", "open_clip_local", "open_clip_global")


def _status_kib(field: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    """Release freed heap to the OS and reset the RSS high-water mark to the current RSS."""
    gc.collect()
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def run_child(impl: str, n: int, dp: int, dim: int, chunk: int, repeats: int, threads: int) -> dict:
    """Measure one (impl, N) case in this process; return the figures as a dict."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    b, rank = n // dp, 0
    offset = rank * b
    feats = F.normalize(torch.randn(n, 2, dim), dim=-1).reshape(n, 2 * dim)  # pre-gathered
    img = feats[offset : offset + b, :dim].clone().requires_grad_()
    txt = feats[offset : offset + b, dim:].clone().requires_grad_()
    logit_scale = torch.tensor([math.log(1 / 0.07)], requires_grad=True)

    if impl.startswith("megaclip"):
        from megaclip.loss import DPComm, clip_loss_with_comm

        def standin_gather(x: torch.Tensor) -> torch.Tensor:
            if x.shape == (b, 2 * dim):
                return feats.clone()  # the all-gather output buffer
            return x.repeat(dp, *([1] * (x.dim() - 1)))  # per-row stats of the dp ranks

        def standin_stream(x: torch.Tensor, per_step: int):
            for j in range(0, dp, per_step):  # a fresh receive buffer per step, as broadcasts
                yield j, feats[j * b : min(dp, j + per_step) * b].clone()

        comm = DPComm(rank=rank, size=dp, gather=standin_gather, stream=standin_stream)
        mode = "stream" if impl == "megaclip_stream" else "allgather"

        def step() -> torch.Tensor:
            return clip_loss_with_comm(img, txt, logit_scale, comm, chunk, mode).loss

    else:
        import open_clip.loss as ocl

        class StandInAllGatherCat(torch.autograd.Function):
            """cat(all_gather(x)) with the gathered copy; backward keeps this rank's rows."""

            @staticmethod
            def forward(ctx, local, gathered):
                out = gathered.clone()
                out[offset : offset + b] = local
                return out

            @staticmethod
            def backward(ctx, grad):
                return grad[offset : offset + b].clone(), None

        def standin_gather_features(
            image_features,
            text_features,
            local_loss=False,
            gather_with_grad=False,
            rank=0,
            world_size=1,
            use_horovod=False,
        ):
            all_img, all_txt = feats[:, :dim], feats[:, dim:]
            if gather_with_grad:
                return (
                    StandInAllGatherCat.apply(image_features, all_img),
                    StandInAllGatherCat.apply(text_features, all_txt),
                )
            gathered_img = list(all_img.clone().chunk(world_size))
            gathered_txt = list(all_txt.clone().chunk(world_size))
            if not local_loss:
                gathered_img[rank] = image_features
                gathered_txt[rank] = text_features
            return torch.cat(gathered_img), torch.cat(gathered_txt)

        ocl.gather_features = standin_gather_features  # ClipLoss.get_logits looks it up per call
        local = impl == "open_clip_local"
        loss_fn = ocl.ClipLoss(local_loss=local, gather_with_grad=local, rank=rank, world_size=dp)

        def step() -> torch.Tensor:
            return loss_fn(img, txt, logit_scale.exp())

    def iteration() -> tuple[float, float]:
        for t in (img, txt, logit_scale):
            t.grad = None
        start, cpu = time.perf_counter(), time.process_time()
        step().backward()
        return time.perf_counter() - start, time.process_time() - cpu

    iteration()  # warm-up (thread pools, first-touch)
    _reset_peak()
    base_kib = _status_kib("VmRSS")
    times = [iteration() for _ in range(repeats)]
    load = os.getloadavg()[0]
    peak_kib = _status_kib("VmHWM")
    return {
        "impl": impl,
        "n": n,
        "b": b,
        "dp": dp,
        "dim": dim,
        "chunk": chunk if impl.startswith("megaclip") else None,
        "threads": threads,
        "time_s": min(t for t, _ in times),
        "cpu_s": min(c for _, c in times),
        "loadavg_1min": load,
        "base_rss_mib": base_kib / 1024,
        "peak_rss_mib": peak_kib / 1024,
        "extra_peak_mib": (peak_kib - base_kib) / 1024,
    }


def measure(impl: str, n: int, args: argparse.Namespace) -> dict:
    """Run one case in a fresh subprocess and return its JSON result."""
    cmd = [sys.executable, __file__, "--child", impl, "--n", str(n), "--dp", str(args.dp)]
    cmd += ["--dim", str(args.dim), "--chunk", str(args.chunk), "--repeats", str(args.repeats)]
    cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", OMP_NUM_THREADS=str(args.threads))
    env["OMP_WAIT_POLICY"] = "PASSIVE"  # idle OpenMP threads must not burn CPU time
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"impl": impl, "n": n, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Sweep N, print a table, ratios and one JSON line per N."""
    from megaclip.config.train import LOSS_CHUNK_SIZE

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[4096, 8192, 16384, 32768, 65536])
    p.add_argument("--dp", type=int, default=64, help="DP size one process stands in for")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=LOSS_CHUNK_SIZE, help="megaclip chunk_size")
    p.add_argument("--repeats", type=int, default=3, help="timed iterations after a warm-up")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--global-max-n", type=int, default=8192, help="largest N for local_loss=False")
    p.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        result = run_child(
            args.child, args.n[0], args.dp, args.dim, args.chunk, args.repeats, args.threads
        )
        print(json.dumps(result))
        return 0

    print(
        f"extra peak RSS over inputs (MiB) and best fwd+bwd CPU time (s) of one rank; dp={args.dp} "
        f"dim={args.dim} chunk={args.chunk} threads={args.threads} fp32"
    )
    header = (
        f"{'N':>6} {'b':>5} | {'mc allgather':>12} {'s':>6} | {'mc stream':>10} {'s':>6} | "
        f"{'oc local':>9} {'s':>6} | {'oc global':>9} {'s':>6} || "
        f"{'mem oc_local/mc':>15} {'(stream)':>8} | {'time mc/oc_local':>16} {'(stream)':>8}"
    )
    print(header)
    print("-" * len(header))
    rows = []
    for n in args.n:
        res = {impl: measure(impl, n, args) for impl in IMPLS[:3]}
        if n <= args.global_max_n:
            res["open_clip_global"] = measure("open_clip_global", n, args)
        ol = res["open_clip_local"]

        def cell(r: dict | None, w: int) -> str:
            if r is None:
                return f"{'-':>{w}} {'-':>6}"
            if "error" in r:
                return f"{'error':>{w}} {'-':>6}"
            return f"{r['extra_peak_mib']:>{w}.1f} {r['cpu_s']:>6.2f}"

        def ratios(r: dict, ol: dict = ol) -> tuple[float, float]:
            if "error" in r or "error" in ol:
                return float("nan"), float("nan")
            mem = ol["extra_peak_mib"] / max(r["extra_peak_mib"], 1e-9)
            return mem, r["cpu_s"] / ol["cpu_s"]

        mem_a, time_a = ratios(res["megaclip"])
        mem_s, time_s = ratios(res["megaclip_stream"])
        print(
            f"{n:>6} {n // args.dp:>5} | {cell(res['megaclip'], 12)} | "
            f"{cell(res['megaclip_stream'], 10)} | {cell(ol, 9)} | "
            f"{cell(res.get('open_clip_global'), 9)} || {mem_a:>15.1f} {mem_s:>8.1f} | "
            f"{time_a:>16.2f} {time_s:>8.2f}",
            flush=True,
        )
        rows.append(
            {
                "n": n,
                "results": res,
                "mem_ratio_oc_local_over_mc_allgather": mem_a,
                "mem_ratio_oc_local_over_mc_stream": mem_s,
                "cpu_time_ratio_mc_allgather_over_oc_local": time_a,
                "cpu_time_ratio_mc_stream_over_oc_local": time_s,
            }
        )
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
