"""Worker: the counting shim records known collectives exactly (2 ranks); saves records + values."""

from __future__ import annotations

import sys
from dataclasses import asdict

import torch
import torch.distributed as dist

from megaclip.bench.comm import CommCounter
from megaclip.parallel.runtime import clean_exit, init_distributed


def main(out_dir: str) -> None:
    counter = CommCounter().install()  # before init_distributed, as the benchmarks do
    rank, world = init_distributed()
    assert world == 2
    before = torch.ones(4)
    dist.all_reduce(before)  # not recorded: recording is off
    x = torch.full((3, 5), float(rank + 1))  # 60 bytes of float32
    gathered = torch.empty(2 * 7, dtype=torch.float64)
    with counter.recording():
        dist.all_reduce(x)
        with counter.phase("loss"):
            dist.all_gather_into_tensor(
                gathered, torch.full((7,), float(rank), dtype=torch.float64)
            )
        if rank == 0:
            dist.send(torch.arange(6, dtype=torch.int64), dst=1)
        else:
            buf = torch.empty(6, dtype=torch.int64)
            dist.recv(buf, src=0)
    counter.uninstall()
    torch.save(
        {
            "records": [asdict(r) for r in counter.records],
            "reduced": x,
            "gathered": gathered,
            "before": before,
        },
        f"{out_dir}/rank{rank}.pt",
    )
    clean_exit()


if __name__ == "__main__":
    main(sys.argv[1])
