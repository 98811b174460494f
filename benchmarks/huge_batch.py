"""One exact optimizer step at a global batch of 262,144 on this machine, checked in float64.

2 ranks (torchrun, gloo) x ``--accum`` micro-batches x ``--micro-batch``: a nano CLIP (smaller
than the ``tiny`` preset) trained with the recompute schedule (features of all micro-batches
without graphs, the global loss, then each micro-batch again) and the streamed loss (owner
blocks broadcast in turn; rows *and* columns of the logits blocked, so no buffer is b x N or
b x chunk for a large b). The micro-batches are regenerated from their seed in the second pass
(nothing but uint8 images is cached).

Then the launcher recomputes the loss from the same features (saved by the ranks) in float64,
independently of megaclip.loss: tiles of the N x N logits, one exp per logit for both directions
(row and column sums under a fixed shift), and prints
one JSON line: global_batch, loss, loss_fp64, loss_abs_err, peak_mib_per_rank, step_s (the step),
wall_s (the launch), reference_s (the check) and total_s (all of it).

    PYTHONPATH=. python benchmarks/huge_batch.py                 # N = 262,144
    PYTHONPATH=. python benchmarks/huge_batch.py --accum 2       # a quick N = 32,768 check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NANO = {
    "name": "nano",
    "embed_dim": 8,
    "vision": {"image_size": 16, "patch_size": 8, "width": 16, "layers": 1, "heads": 2,
               "mlp_dim": 32},
    "text": {"context_length": 8, "vocab_size": 64, "width": 16, "layers": 1, "heads": 2,
             "mlp_dim": 32},
}  # fmt: skip


def micro_batch(k: int, rank: int, b: int, cfg):
    """Micro-batch ``k`` of DP rank ``rank``: uint8 images (as float) and tokens with an EOT."""
    import torch

    g = torch.Generator().manual_seed(1_000_003 * rank + k)
    size = cfg.vision.image_size
    images = torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8)
    tokens = torch.randint(1, cfg.text.vocab_size - 1, (b, cfg.text.context_length), generator=g)
    tokens[:, -1] = cfg.text.vocab_size - 1  # EOT: the largest id (argmax pooling)
    return images, tokens


class LazyBatches:
    """A sequence of micro-batches made when indexed: the two passes re-read, nothing cached."""

    def __init__(self, n: int, rank: int, b: int, cfg) -> None:
        self.n, self.rank, self.b, self.cfg = n, rank, b, cfg

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, k: int):
        if not 0 <= k < self.n:
            raise IndexError(k)
        images, tokens = micro_batch(k, self.rank, self.b, self.cfg)
        return images.float().div_(127.5).sub_(1.0), tokens


def worker(out: Path, micro: int, accum: int, chunk: int) -> None:
    import torch

    from megaclip.config.model import model_from_dict
    from megaclip.config.parallel import ParallelConfig
    from megaclip.config.train import OptimConfig
    from megaclip.parallel.runtime import clean_exit, init_distributed
    from megaclip.parallel.topology import Topology
    from megaclip.train.engine import ClipEngine
    from megaclip.train.memlog import peak_bytes

    rank, world = init_distributed()
    cfg = model_from_dict(NANO, where="nano")
    par = ParallelConfig(
        dp=world, zero_stage=1, micro_batch_size=micro, grad_accum_steps=accum, schedule="recompute"
    )
    topo = Topology(par)
    engine = ClipEngine(
        cfg, par, topo, {}, OptimConfig(lr=1e-4), seed=0, loss_chunk_size=chunk, loss_mode="stream"
    )
    captured = {}

    @contextlib.contextmanager
    def capture(img, txt, logit):  # the engine's "loss" hook: entered before the step updates
        captured.update(img=img.detach().clone(), txt=txt.detach().clone())
        captured.update(logit=logit.detach().clone())
        yield

    engine.add_hook("loss", capture)
    result = engine.train_step(LazyBatches(accum, topo.coords.dp, micro, cfg))
    torch.save(
        {
            "img": captured["img"],
            "txt": captured["txt"],
            "logit": captured["logit"],
            "loss": result.loss,
            "step_s": result.step_time,
            "peak_bytes": peak_bytes(),
        },
        out / f"rank{rank}.pt",
    )
    clean_exit()


def reference_loss(
    img, txt, log_scale: float, max_log_scale: float, rows: int = 128, cols: int = 8192
) -> float:
    """Symmetric InfoNCE in float64 over row blocks of the N x N logits (no megaclip.loss).

    One exp per logit serves both directions: E = exp(x - m) with the fixed shift m = s * max|I|
    * max|T| >= every logit (Cauchy-Schwarz), so row sums give the i2t log-sum-exps and column
    sums, added over the row blocks, the t2i ones; float64 holds exp(x - m) >= exp(-2m) for any
    s <= 100 with unit-norm features. Tiles of rows x cols (8 MiB) keep both threads busy.
    """
    import torch

    img, txt = img.double(), txt.double()
    scale = torch.tensor(min(max(log_scale, 0.0), max_log_scale), dtype=torch.float64).exp()
    n = img.shape[0]
    shift = scale * img.norm(dim=1).max() * txt.norm(dim=1).max()
    pos = scale * (img * txt).sum(dim=1)
    row_sum = torch.zeros(n, dtype=torch.float64)
    col_sum = torch.zeros(n, dtype=torch.float64)
    img_s = scale * img
    blocks = [txt[c0 : c0 + cols].T.contiguous() for c0 in range(0, n, cols)]  # [d, cols] each
    tile = torch.empty(rows * cols, dtype=torch.float64)
    for r0 in range(0, n, rows):
        a = img_s[r0 : r0 + rows]
        for c0, b in zip(range(0, n, cols), blocks):
            e = torch.mm(a, b, out=tile[: a.shape[0] * b.shape[1]].view(a.shape[0], -1))
            e.sub_(shift).exp_()  # [rows, cols]
            row_sum[r0 : r0 + rows] += e.sum(dim=1)
            col_sum[c0 : c0 + cols] += e.sum(dim=0)
    lse = row_sum.log().add_(shift), col_sum.log().add_(shift)
    return float(((lse[0] - pos).sum() + (lse[1] - pos).sum()) / (2 * n))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--micro-batch", type=int, default=8192)
    p.add_argument("--accum", type=int, default=16)
    p.add_argument("--chunk", type=int, default=4096, help="loss chunk (rows and columns)")
    p.add_argument("--out", default="runs/huge_batch")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    out = (REPO / args.out).resolve()
    if args.worker:
        worker(out, args.micro_batch, args.accum, args.chunk)
        return
    import torch

    from megaclip.config.model import model_from_dict

    out.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1",
        "--master_addr=127.0.0.1", f"--master_port={29700 + os.getpid() % 500}",
        str(Path(__file__).resolve()), "--worker", "--micro-batch", str(args.micro_batch),
        "--accum", str(args.accum), "--chunk", str(args.chunk), "--out", args.out,
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True)
    wall = time.perf_counter() - t0
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(2)]
    img = torch.cat([r["img"] for r in ranks])
    txt = torch.cat([r["txt"] for r in ranks])
    cfg = model_from_dict(NANO, where="nano")
    torch.set_num_threads(os.cpu_count() or 1)
    t1 = time.perf_counter()
    want = reference_loss(img, txt, float(ranks[0]["logit"][0]), cfg.max_logit_scale)
    got = ranks[0]["loss"]
    print(
        json.dumps(
            {
                "global_batch": img.shape[0],
                "micro_batch": args.micro_batch,
                "accum": args.accum,
                "loss": got,
                "loss_fp64": want,
                "loss_abs_err": abs(got - want),
                "peak_mib_per_rank": [round(r["peak_bytes"] / 2**20, 1) for r in ranks],
                "step_s": round(max(r["step_s"] for r in ranks), 2),
                "reference_s": round(time.perf_counter() - t1, 2),
                "wall_s": round(wall, 1),
                "total_s": round(time.perf_counter() - t0, 1),  # the whole benchmark
            }
        )
    )


if __name__ == "__main__":
    main()
