"""Measured throughput / MFU / memory of one layout: ``megaclip bench`` as a script.

    python benchmarks/throughput.py --model tiny --tp 2 --micro-batch 8 --steps 5 --json
    torchrun --nproc_per_node 4 benchmarks/throughput.py --model tiny-pp --pp 2 --accum 4 --json

Spawns tp x pp x dp ranks with torchrun unless it is already running under a launcher
(torchrun, deepspeed, SLURM). Prints one JSON line with --json. See docs/benchmarks.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megaclip.cli.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
