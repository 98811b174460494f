"""Stand-in for `megaclip train` launched through launch/*.sh: records what each rank was given.

Accepts the train command line (``--config FILE [--deepspeed FILE] key=value ...``), takes its
output directory from the ``train.out_dir=DIR`` override, joins the process group the way
`megaclip train` does, all-reduces (rank + 1) and writes ``DIR/rank<R>.pt`` with rank, world size,
local rank, the all-reduce result, the launcher env vars and argv.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megaclip.parallel.device import device
from megaclip.parallel.runtime import clean_exit, init_distributed


def out_dir_from_argv(argv: list[str]) -> Path:
    """The value of the ``train.out_dir=DIR`` override in ``argv``."""
    for arg in argv:
        if arg.startswith("train.out_dir="):
            return Path(arg.split("=", 1)[1])
    raise SystemExit("launch_probe: pass train.out_dir=DIR")


def main() -> None:
    argv = sys.argv[1:]
    out = out_dir_from_argv(argv)
    rank, world = init_distributed(timeout_s=60)
    total = torch.tensor([float(rank + 1)], device=device())  # nccl needs a GPU tensor
    dist.all_reduce(total)
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID")
    record = {
        "rank": rank,
        "world": world,
        "local_rank": int(os.environ["LOCAL_RANK"]),
        "all_reduce": float(total.item()),
        "env": {k: os.environ.get(k) for k in keys},
        "argv": argv,
        "host": socket.gethostname(),
        "device": str(total.device),
    }
    out.mkdir(parents=True, exist_ok=True)
    torch.save(record, out / f"rank{rank}.pt")
    clean_exit()


if __name__ == "__main__":
    main()
