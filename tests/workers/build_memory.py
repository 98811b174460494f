"""Worker: build this rank's module for a layout; record the peak RSS growth of construction."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from megaclip.config.model import model_from_dict
from megaclip.config.parallel import ParallelConfig
from megaclip.parallel.runtime import clean_exit, init_distributed
from megaclip.parallel.topology import Topology
from megaclip.train.build import build_module
from megaclip.train.ds_config import resolve_ds_config
from megaclip.train.memlog import current_bytes, peak_bytes, reset_peak

# ~100M parameters (fp32 ~400 MB): construction memory stands well above allocator noise.
MODEL = {
    "name": "build-probe",
    "embed_dim": 512,
    "vision": {
        "image_size": 32,
        "patch_size": 16,
        "width": 1024,
        "layers": 6,
        "heads": 8,
        "mlp_dim": 4096,
    },
    "text": {
        "context_length": 16,
        "vocab_size": 64,
        "width": 1024,
        "layers": 2,
        "heads": 8,
        "mlp_dim": 4096,
    },
}


def main(out_dir: str, spec_json: str) -> None:
    spec = json.loads(spec_json)
    rank, world = init_distributed()
    par = ParallelConfig(
        tp=spec["tp"], dp=world // spec["tp"], zero_stage=spec["zero"], micro_batch_size=1
    )
    topo = Topology(par)
    cfg = model_from_dict(MODEL, where="probe")
    ds = resolve_ds_config({}, par)
    torch.distributed.barrier()
    start = current_bytes()
    reset_peak()
    module = build_module(cfg, par, topo, ds, seed=0).module
    growth = peak_bytes() - start
    owned = sum(
        (p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()) * p.element_size()
        for p in module.parameters()
    )
    largest = max(
        int(torch.Size(getattr(p, "ds_shape", p.shape)).numel()) * p.element_size()
        for p in module.parameters()
    )
    Path(out_dir, f"rank{rank}.json").write_text(
        json.dumps({"growth": growth, "owned": owned, "largest": largest})
    )
    clean_exit()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
