"""Launch the ranks of a `megaclip train` job as independent processes (helper of the rel tests).

Unlike torchrun, no agent watches the ranks and kills the survivors when one dies: this is the
situation of ranks on different nodes, where only megaclip's own fault handling (the
TrainingGuard: communication errors and the step watchdog) can end a survivor.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.mp_util import REPO, free_port


@dataclass
class RankResult:
    """How one rank ended: exit code (None: killed at the deadline), output, seconds after start."""

    rank: int
    rc: int | None
    out: str
    err: str
    seconds: float


def launch_ranks(
    nproc: int,
    args: list[str],
    log_dir: Path,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 120.0,
) -> list[RankResult]:
    """Run ``python -m megaclip train ARGS`` as ``nproc`` ranks; kill those left at ``timeout``."""
    log_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    procs = []
    t0 = time.monotonic()
    for rank in range(nproc):
        full = dict(os.environ)
        full.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(nproc),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            OMP_NUM_THREADS="1",
            DS_ACCELERATOR="cpu",
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join([str(REPO), full.get("PYTHONPATH", "")]),
        )
        full.update(env or {})
        out = open(log_dir / f"rank{rank}.out", "w")  # noqa: SIM115 - closed below
        err = open(log_dir / f"rank{rank}.err", "w")  # noqa: SIM115
        cmd = [sys.executable, "-m", "megaclip", "train", *args]
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=full, stdout=out, stderr=err), out, err))
    ended: dict[int, tuple[int | None, float]] = {}
    while len(ended) < nproc:
        for rank, (proc, _, _) in enumerate(procs):
            if rank not in ended and proc.poll() is not None:
                ended[rank] = (proc.returncode, time.monotonic() - t0)
        if time.monotonic() - t0 > timeout:
            for rank, (proc, _, _) in enumerate(procs):
                if rank not in ended:
                    proc.kill()
                    proc.wait()
                    ended[rank] = (None, time.monotonic() - t0)
        time.sleep(0.05)
    results = []
    for rank, (_, out, err) in enumerate(procs):
        out.close()
        err.close()
        rc, seconds = ended[rank]
        results.append(
            RankResult(
                rank,
                rc,
                (log_dir / f"rank{rank}.out").read_text(),
                (log_dir / f"rank{rank}.err").read_text(),
                seconds,
            )
        )
    return results
