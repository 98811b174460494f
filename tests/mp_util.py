"""Launch real multi-process (gloo, CPU) runs from pytest: torchrun's environment, or torchrun."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
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


def rank_env(base: dict[str, str], rank: int, nproc: int, port: int) -> dict[str, str]:
    """What torchrun gives rank ``rank`` of ``nproc`` on one node (no elastic restarts)."""
    return {
        **base,
        "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
        "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc), "ROLE_WORLD_SIZE": str(nproc),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    }  # fmt: skip


def _end(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every rank still running (its session: DataLoader workers too), then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        alive = [p for p in procs if p.poll() is None]
        for p in alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)
        deadline = time.monotonic() + grace
        while any(p.poll() is None for p in alive) and time.monotonic() < deadline:
            time.sleep(0.05)


def launch_ranks(
    nproc: int, argv: list[str], env: dict[str, str], timeout: float
) -> subprocess.CompletedProcess:
    """Start ``argv`` as ranks 0..nproc-1 (torchrun's environment), as torchrun would: when one
    fails the others are ended and its exit status is returned. stdout / stderr: every rank's,
    rank 0 first."""
    port = free_port()
    with contextlib.ExitStack() as files:
        logs = [
            (files.enter_context(tempfile.TemporaryFile("w+")), files.enter_context(
                tempfile.TemporaryFile("w+")))
            for _ in range(nproc)
        ]  # fmt: skip
        procs = [
            subprocess.Popen(
                argv,
                cwd=REPO,
                env=rank_env(env, r, nproc, port),
                stdout=out,
                stderr=err,
                text=True,
                start_new_session=True,
            )  # fmt: skip
            for r, (out, err) in enumerate(logs)
        ]
        deadline, rc = time.monotonic() + timeout, 0
        try:
            while rc == 0 and any(p.poll() is None for p in procs):
                if time.monotonic() > deadline:
                    raise subprocess.TimeoutExpired(argv, timeout)
                time.sleep(0.05)
                rc = next((p.returncode for p in procs if p.returncode), 0)
            rc = rc or next((p.returncode for p in procs if p.returncode), 0)
        finally:
            _end(procs)
        texts = []
        for out, err in logs:
            out.seek(0)
            err.seek(0)
            texts.append((out.read(), err.read()))
    # like torchrun's failure summary: which rank ended first, with what status
    failed = [f"rank {r} exitcode : {p.returncode}" for r, p in enumerate(procs) if p.returncode]
    summary = "".join(f"{line}\n" for line in failed if rc)
    return subprocess.CompletedProcess(
        argv, rc, "".join(o for o, _ in texts), "".join(e for _, e in texts) + summary
    )


def torchrun(
    nproc: int,
    script: str | Path,
    *args: str,
    timeout: float = 300.0,
    env: dict | None = None,
    launcher: str = "direct",
) -> subprocess.CompletedProcess:
    """Run ``script`` (or ``"-m", module``) on ``nproc`` local ranks; raise with the full log if
    any rank fails.

    ``launcher="direct"`` starts the ranks itself with torchrun's environment and torchrun's
    rule (one failed rank ends the others): the same processes without torchrun's own start-up,
    about 3 s a launch here. Tests whose subject is the launcher pass ``"torchrun"``.
    """
    target = [str(script)] if str(script) != "-m" else ["-m"]
    full_env = subprocess_env()
    full_env.update(env or {})
    if launcher == "torchrun":
        cmd = torchrun_cmd(nproc, [*target, *map(str, args)])
        proc = subprocess.run(
            cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout
        )
    else:
        proc = launch_ranks(
            nproc, [sys.executable, "-u", *target, *map(str, args)], full_env, timeout
        )
    if proc.returncode != 0:
        raise AssertionError(
            f"{launcher} {script} exited {proc.returncode}\n--- stdout ---\n{proc.stdout[-6000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc
