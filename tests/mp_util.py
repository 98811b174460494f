"""Launch real multi-process (gloo, CPU) runs from pytest with torchrun."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from megaclip.bench.launch import free_port as free_port
from megaclip.bench.launch import torchrun_cmd

REPO = Path(__file__).resolve().parents[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a test subprocess: this repo importable, CPU accelerator, 1 thread
    (``MEGACLIP_WORKER_THREADS`` sets another count: benchmarks/tolerance_spread.py)."""
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=os.environ.get("MEGACLIP_WORKER_THREADS", "1"),
        DS_ACCELERATOR="cpu",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
        # the venv's tools first (its ninja builds DeepSpeed's JIT ops; another ninja version
        # would find the torch extensions cache stale and rebuild it)
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def megaclip_cli(
    *args: str, env: dict | None = None, timeout: float | None = None
) -> subprocess.CompletedProcess:
    """``python -m megaclip ARGS`` from the repository root, output captured as text.

    ``env``: the subprocess's environment (default: this process's own).
    """
    return subprocess.run(
        [sys.executable, "-m", "megaclip", *map(str, args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def torchrun(
    nproc: int, script: str | Path, *args: str, timeout: float = 300.0, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run ``script`` on ``nproc`` local processes; raise with the full log if any rank fails."""
    target = [str(script)] if str(script) != "-m" else ["-m"]
    cmd = torchrun_cmd(nproc, [*target, *map(str, args)])
    full_env = subprocess_env()
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
