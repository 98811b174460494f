"""``torchrun ... -m megaclip.cli.bench_worker KIND OUT_DIR SPEC_JSON``: one benchmark worker rank.

KIND is "comm", "memory" or "steps" (:mod:`megaclip.bench.workers`); each rank writes
OUT_DIR/rank<r>.json. :func:`megaclip.bench.compare.run_workers` launches it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from megaclip.bench.comm import CommCounter
from megaclip.bench.harness import quiet_deepspeed
from megaclip.bench.spec import BenchSpec
from megaclip.bench.workers import comm_worker, memory_worker, steps_worker


def main(argv: list[str]) -> None:
    """Entry point under torchrun: KIND OUT_DIR SPEC_JSON; writes OUT_DIR/rank<r>.json."""
    from megaclip.parallel.runtime import clean_exit

    kind, out_dir, spec_json = argv
    spec = BenchSpec.from_json(spec_json)
    quiet_deepspeed()
    counter = CommCounter().install()  # before init_distributed (DeepSpeed captures functions)
    if kind == "comm":
        result = comm_worker(spec, counter)
    elif kind == "memory":
        result = memory_worker(spec)
    elif kind == "steps":
        result = steps_worker(spec, counter)
    else:
        raise SystemExit(f"unknown worker kind {kind!r}; valid: comm, memory, steps")
    path = Path(out_dir) / f"rank{result['rank']}.json"
    path.write_text(json.dumps(result), encoding="utf-8")
    clean_exit(0)


if __name__ == "__main__":
    main(sys.argv[1:])
