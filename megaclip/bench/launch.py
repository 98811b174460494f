"""Start benchmark workers: detect a launcher's environment or spawn torchrun on this node."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def launched() -> bool:
    """True inside a torchrun / deepspeed / SLURM launched process."""
    return (
        "LOCAL_RANK" in os.environ
        or "SLURM_PROCID" in os.environ
        or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)
    )


def free_port() -> int:
    """An unused local TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def single_process_env() -> None:
    """Rendezvous variables for a one-process world on a free port (no launcher)."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")


def worker_env(nproc: int) -> dict[str, str]:
    """Environment of spawned ranks: this repo importable, CPU threads shared out evenly."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def torchrun_cmd(nproc: int, target: Sequence[str]) -> list[str]:
    """``python -m torch.distributed.run`` on ``nproc`` local ranks running ``target``.

    ``target`` is a script path followed by its arguments, or ``["-m", module, ...]``.
    """
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *target,
    ]


def spawn(
    nproc: int, target: Sequence[str], *, capture: bool = False, timeout: float | None = None
) -> subprocess.CompletedProcess:
    """Run ``target`` under torchrun with ``nproc`` ranks from the repository root."""
    return subprocess.run(
        torchrun_cmd(nproc, target),
        cwd=REPO,
        env=worker_env(nproc),
        capture_output=capture,
        text=True,
        timeout=timeout,
        check=False,
    )
