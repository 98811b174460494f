"""Process faults of `megaclip train`: lost ranks, hung steps, launcher death.

- :class:`TrainingGuard`: around the training steps. When a peer process dies or stops
  answering, the collective this rank is in raises (gloo: "Connection closed by peer" at once;
  a hung peer: after ``train.dist_timeout_s``), or the step watchdog fires; the guard turns
  that into one line naming the lost rank(s) and the checkpoint to restart from, and ends this
  process with :data:`LOST_RANK_EXIT_CODE` instead of a traceback or a hang. It also arms the
  test-only fault injection (megaclip.train.fault_injection).
- :func:`exit_with_launcher`: under torchrun, a rank dies with its launcher (no orphans).

The checks before start-up live with what they check: config ranges in the config sections,
DeepSpeed JSON shapes in megaclip.train.ds_config, the output directory in
megaclip.train.preflight, the checkpoint to load in megaclip.checkpoint.resume; skipped-data
tallies in megaclip.data.stats. See docs/reliability.md.
"""

from __future__ import annotations

import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import torch.distributed as dist

from megaclip.parallel import collectives
from megaclip.train.fault_injection import KILLED_EXIT_CODE, arm, fault_plan_from_env
from megaclip.train.host import adopted_by_init, pid_alive

LOST_RANK_EXIT_CODE = 3  # a surviving rank that lost contact with a peer
_EXIT_GRACE_S = 2.0  # how long a dead peer may take from closing its sockets to being gone

# Substrings of the errors torch.distributed backends raise when a peer died or went silent
# (gloo: "Connection closed by peer", "Connection reset by peer", "Timed out waiting 10000ms
# for recv operation"; NCCL: "remote process exited or there was a network error", the
# watchdog's "collective operation timeout"). torch's DistError subclasses count as well.
_PEER_ERROR_MARKS = (
    "connection closed by peer",
    "connection reset by peer",
    "connection refused",
    "broken pipe",
    "timed out waiting",
    "operation timed out",
    "collective operation timeout",
    "remote process exited",
    "ncclremoteerror",
)


# ----------------------------------------------------------------------------- launcher death

EXIT_WITH_LAUNCHER_ENV = "MEGACLIP_EXIT_WITH_LAUNCHER"
_PR_SET_PDEATHSIG = 1


def exit_with_launcher(env: Mapping[str, str] | None = None) -> bool:
    """Have Linux SIGKILL this rank when its launcher process dies; whether that was armed.

    torchrun starts every rank in its own session: a SIGKILLed torchrun (OOM killer, a
    scheduler killing the launcher only, ``kill -9``) leaves its ranks training on, orphaned,
    next to the restarted job and writing into the same checkpoints. Armed by default under
    torchrun (``TORCHELASTIC_RUN_ID`` set); ``MEGACLIP_EXIT_WITH_LAUNCHER=1`` / ``0`` forces
    it on / off (e.g. for launch scripts that start ranks in the background and exit). A rank
    whose launcher died before this call (it was adopted by a PID 1 that is not a torch
    launcher) exits at once with :data:`KILLED_EXIT_CODE`.
    """
    env = os.environ if env is None else env
    wanted = env.get(EXIT_WITH_LAUNCHER_ENV, "")
    armed = wanted == "1" or (wanted != "0" and "TORCHELASTIC_RUN_ID" in env)
    if not armed or not sys.platform.startswith("linux"):
        return False
    import ctypes
    import signal

    parent = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        return False
    if os.getppid() != parent or adopted_by_init(parent):
        print(
            "megaclip train: error: the launcher of this rank is gone (killed during start-up); "
            "not training as an orphan",
            file=sys.stderr,
            flush=True,
        )
        os._exit(KILLED_EXIT_CODE)
    return True


# ----------------------------------------------------------------------------- lost ranks


@dataclass(frozen=True)
class Peer:
    """Where a rank runs: host name and process id."""

    rank: int
    host: str
    pid: int


def lost_ranks(
    peers: list[Peer], host: str, alive: Callable[[int], bool] = pid_alive
) -> tuple[list[int], bool]:
    """(ranks on ``host`` whose process is gone, whether every peer could be checked)."""
    lost = [p.rank for p in peers if p.host == host and not alive(p.pid)]
    return lost, all(p.host == host for p in peers)


def is_peer_failure(err: BaseException) -> bool:
    """Whether ``err`` is a communication failure: a peer died, hung, or the store went away."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    if not isinstance(err, (RuntimeError, ConnectionError, TimeoutError)):
        return False
    text = str(err).lower()
    return any(mark in text for mark in _PEER_ERROR_MARKS)


def lost_contact_message(
    lost: list[int] | None,
    complete: bool,
    step: int,
    restart_from: str | None,
    cause: str,
    rank: int,
    stalled_s: float | None = None,
) -> str:
    """The one line a rank prints when it gives up on its peers (pure).

    ``cause``: the communication error's text, or with ``stalled_s`` the watchdog's reason
    (then this rank itself may be the stuck one, so the line does not blame a peer).
    """
    where = (
        f"restart to resume from {restart_from}"
        if restart_from
        else "no checkpoint was saved yet: a restart begins at step 0"
    )
    cause = re.sub(r"\[[^\]]*\.(?:cc|cpp|h|hpp):\d+\]\s*", "", " ".join(cause.split()))
    if len(cause) > 160:
        cause = cause[:157] + "..."
    if stalled_s is not None:
        gone = f"; rank(s) {', '.join(map(str, lost))} are gone" if lost else ""
        return (
            f"step {step} made no progress for {stalled_s:.0f} s ({cause}){gone}: a rank is "
            f"hung or lost; {where} [rank {rank}]"
        )
    if lost:
        who = "rank(s) " + ", ".join(map(str, lost))
    elif complete:
        who = "a rank that is still running but does not answer (hung?)"
    else:
        who = "a rank on another host"
    return f"lost contact with {who} at step {step}; {where} [rank {rank}: {cause}]"


class TrainingGuard:
    """Context manager around the training steps of every rank: a lost peer ends the run cleanly.

    On entry it records every rank's (host, pid) (one all_gather), starts a watchdog thread and
    arms the fault injection of :func:`fault_plan_from_env`. The run ends with one line
    (``megaclip train: error: lost contact with rank(s) R at step N; restart to resume from
    OUT/checkpoints/step-M``) and :data:`LOST_RANK_EXIT_CODE`, without interpreter teardown
    (it can block on a broken process group), when

    - a communication error escapes the block (a dead peer: at once; a silent one: after the
      process group's timeout), or
    - the watchdog sees a step in progress for longer than ``timeout_s`` (plus a margin):
      collectives in groups created with torch's default timeout (DeepSpeed's own data-parallel
      and pipeline groups: 30 min on gloo) would otherwise wait that long.

    Other errors pass through. Nothing is armed in a single-process run.
    """

    def __init__(
        self,
        clip_engine: Any,
        ckpt_dir: str | Path,
        *,
        timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
        stream: TextIO | None = None,
        exit_fn: Callable[[int], None] = os._exit,
    ) -> None:
        self.clip_engine = clip_engine
        self.ckpt_dir = Path(ckpt_dir)
        self.timeout_s = timeout_s
        self.plan = fault_plan_from_env(os.environ if env is None else env)
        self.stream = stream
        self.exit_fn = exit_fn
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.peers: list[Peer] = []
        self._handles: list[Any] = []
        self._started: tuple[int, float] | None = None  # (step, monotonic start) of the step
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self._report_lock = threading.Lock()

    @property
    def step(self) -> int:
        """The step in progress (1-based)."""
        return int(self.clip_engine.step_count) + 1

    @property
    def watchdog_limit_s(self) -> float | None:
        """Seconds a step may run before the watchdog ends it (None: no watchdog)."""
        if self.timeout_s is None or self.timeout_s <= 0:
            return None
        return self.timeout_s * 1.1 + 2.0  # the backends' own timeouts should fire first

    def __enter__(self) -> TrainingGuard:
        if self.world > 1:
            me = Peer(self.rank, socket.gethostname(), os.getpid())
            gathered = collectives.all_gather_object(me)  # the host (gloo) group
            self.peers = [p for p in gathered if p.rank != self.rank]
            if self.watchdog_limit_s is not None:
                self._watchdog = threading.Thread(
                    target=self._watch, name="megaclip-watchdog", daemon=True
                )
                self._watchdog.start()
        if self.plan is not None and self.plan.rank == self.rank:
            self._handles.append(
                arm(self.plan, self.clip_engine.engine.module, lambda: self.step, self.rank)
            )
        return self

    def step_begins(self) -> None:
        """Start the watchdog's clock for the step about to run (call right before it)."""
        self._started = (self.step, time.monotonic())

    def _watch(self) -> None:
        limit = self.watchdog_limit_s
        assert limit is not None
        while not self._stop.wait(min(1.0, limit / 10)):
            started = self._started
            if started is None or started[0] != self.step:
                continue  # between steps: saving, evaluating, loading data
            waited = time.monotonic() - started[1]
            if waited > limit:
                self._report(f"train.dist_timeout_s={self.timeout_s:g}", stalled_s=waited)

    def restart_point(self) -> str | None:
        """The checkpoint a restart resumes from (``ckpt_dir/<latest tag>``), or None."""
        from megaclip.checkpoint.atomic import read_latest

        try:
            tag = read_latest(self.ckpt_dir)
        except OSError:
            return None
        return str(self.ckpt_dir / tag) if tag else None

    def _report(self, cause: str, stalled_s: float | None = None) -> None:
        """Print the lost-contact line once and end the process (first caller wins)."""
        if not self._report_lock.acquire(blocking=False):
            time.sleep(3600)  # the other thread is reporting and about to end the process
        host = socket.gethostname()
        lost, complete = lost_ranks(self.peers, host)
        deadline = time.monotonic() + _EXIT_GRACE_S
        while not lost and time.monotonic() < deadline:  # a dying peer closes sockets first
            time.sleep(0.05)
            lost, complete = lost_ranks(self.peers, host)
        line = lost_contact_message(
            lost, complete, self.step, self.restart_point(), cause, self.rank, stalled_s
        )
        print(f"megaclip train: error: {line}", file=self.stream or sys.stderr, flush=True)
        sys.stdout.flush()
        self.exit_fn(LOST_RANK_EXIT_CODE)

    def close(self) -> None:
        """Stop the watchdog and remove the hooks."""
        self._stop.set()
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.close()
        if exc is None or self.world == 1 or not is_peer_failure(exc):
            return False
        self._report(str(exc))
        return True  # only reached with a test exit_fn that returns
