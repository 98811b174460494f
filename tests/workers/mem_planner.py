"""Worker: count one rank's model-state bytes at the optimizer step (megaclip.bench.memory).

argv: OUT_DIR SPEC_JSON (a megaclip.bench.harness.BenchSpec). Writes OUT_DIR/rank<r>.pt with the
counted categories, the rank's pipeline stage and its local parameter count.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from megaclip.bench.spec import BenchSpec
from megaclip.bench.workers import memory_worker
from megaclip.parallel.runtime import clean_exit, init_distributed

out_dir, spec_json = sys.argv[1:3]
init_distributed()  # memory_worker's setup finds the process group already initialised
result = memory_worker(BenchSpec.from_json(spec_json))
keep = ("rank", "pp", "counted", "params_local", "optimizer_class")
torch.save({k: result[k] for k in keep}, Path(out_dir) / f"rank{result['rank']}.pt")
clean_exit(0)
