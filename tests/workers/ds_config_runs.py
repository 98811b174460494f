"""Worker: `megaclip train`'s run_training once per (name, DeepSpeed JSON, overrides), in one
process group (one torchrun for a group of short runs; tests/test_plan_runs.py).

The start-up matmul probe behind the MFU figure is replaced by "no peak" (the loop prints nan):
on a CPU without bf16 units its 2048^3 bf16 products take minutes, and MFU is not under test.
Runs whose layouts change DeepSpeed's model-parallel groups (pp or tp > 1) go last: DeepSpeed
keeps those groups in module globals across engines in one process.
"""

from __future__ import annotations

import json
import os
import sys

from megaclip.config.train import load_run_config
from megaclip.parallel.runtime import clean_exit
from megaclip.train import loop


def main(out_dir: str, runs_json: str) -> None:
    loop.device_peak_tflops = lambda precision: (float("nan"), "not probed (test)")
    for name, ds_path, overrides in json.loads(runs_json):
        if os.environ.get("RANK", "0") == "0":
            print(f"=== run {name}", flush=True)
        cfg = load_run_config(None, [*overrides, f"train.out_dir={out_dir}/{name}"])
        loop.run_training(cfg, ds_path)
    clean_exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
