"""Launch real multi-process (gloo, CPU) runs from pytest with torchrun."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(
    nproc: int, script: str | Path, *args: str, timeout: float = 300.0, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run ``script`` on ``nproc`` local processes; raise with the full log if any rank fails."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        *([str(script)] if str(script) != "-m" else ["-m"]),
        *map(str, args),
    ]
    full_env = dict(os.environ)
    full_env.update(
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        PYTHONPATH=os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")]),
        PYTHONUNBUFFERED="1",
    )
    full_env.update(env or {})
    proc = subprocess.run(
        cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"torchrun {script} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc
