"""Reliability of `megaclip train`: pre-checks, data accounting, lost ranks, launcher death.

- Pre-checks (before any process group): :func:`check_run_settings` (ranges, NaN/inf),
  :func:`check_deepspeed_sections` (shapes of the DeepSpeed JSON sections megaclip reads),
  :func:`check_output_dir` (a writable ``train.out_dir``), :func:`check_checkpoint_inputs` (the
  checkpoint to be resumed or ``train.init_from``: architecture, truncated files).
- :class:`SkipTally` / :func:`skip_record`: skipped-sample counts of the data stream across
  epochs, summed over the DP ranks, for the metrics record; :func:`batch_fingerprint`: a
  per-step hash of the data, so a resumed run's sample stream can be compared with an
  uninterrupted one (benchmarks/soak.py).
- :class:`TrainingGuard`: around the training steps. When a peer process dies or stops
  answering, the collective this rank is in raises (gloo: "Connection closed by peer" at once;
  a hung peer: after ``train.dist_timeout_s``), or the step watchdog fires; the guard turns
  that into one line naming the lost rank(s) and the checkpoint to restart from, and ends this
  process with :data:`LOST_RANK_EXIT_CODE` instead of a traceback or a hang.
- :func:`exit_with_launcher`: under torchrun, a rank dies with its launcher (no orphans).
- Fault injection for tests: ``MEGACLIP_FAULT_KILL_RANK`` / ``MEGACLIP_FAULT_KILL_STEP``
  (``MEGACLIP_FAULT_MODE``: ``exit`` or ``hang``; ``MEGACLIP_FAULT_POINT``: ``forward`` or
  ``backward``) make that rank ``os._exit`` (or stop responding) during that step.

See docs/reliability.md.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TextIO

import torch
import torch.distributed as dist

from megaclip.data.stats import SkipStats
from megaclip.errors import CheckpointError, ConfigError

KILL_RANK_ENV = "MEGACLIP_FAULT_KILL_RANK"
KILL_STEP_ENV = "MEGACLIP_FAULT_KILL_STEP"
MODE_ENV = "MEGACLIP_FAULT_MODE"
POINT_ENV = "MEGACLIP_FAULT_POINT"
KILLED_EXIT_CODE = 87  # the injected fault's own exit status
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


# ----------------------------------------------------------------------------- pre-checks


def check_output_dir(path: str | Path, what: str = "train.out_dir") -> None:
    """ConfigError unless ``path`` is (or can be created as) a writable directory.

    Creates nothing: checks ``path`` if it exists, else its nearest existing ancestor
    (``os.access`` also reports read-only mounts, even to root).
    """
    if "\x00" in str(path):
        raise ConfigError(f"{what} {str(path)!r} contains a NUL character")
    path = Path(path).expanduser()
    try:
        probe = path
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        is_dir = probe.is_dir()
        writable = is_dir and os.access(probe, os.W_OK | os.X_OK)
    except OSError as err:
        raise ConfigError(f"{what} {path} cannot be used: {err.strerror or err}") from None
    if not is_dir:
        kind = "is" if probe == path else f"is under {probe}, which is"
        raise ConfigError(f"{what} {path} {kind} a file, not a directory; choose another {what}")
    if not writable:
        where = "" if probe == path else f" (its nearest existing parent {probe} is not)"
        raise ConfigError(
            f"{what} {path} is not writable{where}: fix the permissions or choose another "
            f"{what} (runs write config.yaml, metrics.jsonl and checkpoints/ there)"
        )


def check_checkpoint_inputs(cfg: Any) -> None:
    """CheckpointError, before start-up, for the checkpoint the run would load.

    That is ``OUT/checkpoints/latest`` when resuming, else ``train.init_from`` (a megaclip
    checkpoint directory or root: its meta record, architecture and file sizes; other forms:
    existence). The loaders check again; this only moves the error before the process groups.
    """
    from megaclip.checkpoint.atomic import read_latest
    from megaclip.checkpoint.meta import META_FILE, check_same_model, read_meta, verify_files
    from megaclip.checkpoint.reader import resolve_checkpoint_dir
    from megaclip.checkpoint.universal import UNIVERSAL_META

    def check_dir(path: Path) -> None:
        if (path / UNIVERSAL_META).is_file() or not (path / META_FILE).is_file():
            return  # universal layout / open_clip: checked by its loader
        meta = read_meta(path)
        check_same_model(meta.model, cfg.model, str(path))
        verify_files(path, meta)

    t = cfg.train
    root = Path(t.out_dir) / "checkpoints"
    tag = read_latest(root) if t.resume and root.is_dir() else None
    if tag is not None:
        if not (root / tag).is_dir():
            raise CheckpointError(
                f"{root}/latest names '{tag}' but {root / tag} does not exist: restore it, or "
                f"point {root}/latest at an older step-N directory"
            )
        check_dir(root / tag)
        return
    if t.init_from:
        path = Path(t.init_from)
        if not path.exists():
            raise CheckpointError(f"train.init_from {path} does not exist")
        if path.is_dir() and not (path / UNIVERSAL_META).is_file():
            check_dir(resolve_checkpoint_dir(path))


def _finite(
    where: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """ConfigError unless ``value`` is finite and inside the given interval."""
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        left = "(-inf" if low is None else ("(" if low_open else "[") + f"{low:g}"
        right = "inf)" if high is None else f"{high:g}" + (")" if high_open else "]")
        raise ConfigError(f"{where} must be a finite number in {left}, {right}, got {value}")


def check_run_settings(cfg: Any) -> None:
    """ConfigError for run settings that would fail or misbehave only after start-up.

    The config schema checks types; this checks ranges the sections' own validation leaves
    open: NaN/inf numbers, zero or negative counts, AdamW betas outside [0, 1), a skip
    fraction outside [0, 1], a non-positive ``train.dist_timeout_s``.
    """
    t, o, d, z, m = cfg.train, cfg.optim, cfg.data, cfg.zeroshot, cfg.model
    for name in ("log_every", "loss_chunk_size"):
        if getattr(t, name) < 1:
            raise ConfigError(f"train.{name} must be >= 1, got {getattr(t, name)}")
    for where, value in (
        ("train.save_every", t.save_every),
        ("train.keep_last", t.keep_last),
        ("train.exit_after", t.exit_after),
        ("data.shuffle_buffer", d.shuffle_buffer),
        ("zeroshot.every", z.every),
        ("zeroshot.max_samples", z.max_samples),
    ):
        if value < 0:
            raise ConfigError(f"{where} must be >= 0 (0 turns it off), got {value}")
    _finite("train.dist_timeout_s", t.dist_timeout_s, 0.0, low_open=True)
    _finite("optim.lr", o.lr, 0.0, low_open=True)
    _finite("optim.min_lr", o.min_lr, 0.0, o.lr)
    _finite("optim.weight_decay", o.weight_decay, 0.0)
    _finite("optim.beta1", o.beta1, 0.0, 1.0, high_open=True)
    _finite("optim.beta2", o.beta2, 0.0, 1.0, high_open=True)
    _finite("optim.eps", o.eps, 0.0)
    _finite("optim.grad_clip", o.grad_clip, 0.0)
    _finite("data.max_skip_fraction", d.max_skip_fraction, 0.0, 1.0)
    _finite("model.init_logit_scale", m.init_logit_scale)
    _finite("model.max_logit_scale", m.max_logit_scale, 0.0, low_open=True)
    _finite("model.layer_norm_eps", m.layer_norm_eps, 0.0, low_open=True)


_DS_SECTIONS = ("bf16", "fp16", "zero_optimization", "activation_checkpointing")
_DS_BATCH_KEYS = (
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
)


def check_deepspeed_sections(ds: Mapping[str, Any], where: str = "DeepSpeed config") -> None:
    """ConfigError unless the DeepSpeed keys megaclip reads have the shapes it expects.

    Sections (``bf16``, ``fp16``, ``zero_optimization``, ``activation_checkpointing``) must
    be objects, ``enabled`` a boolean, ``stage`` an integer, batch sizes integers or "auto".
    """
    for key in _DS_SECTIONS:
        if key in ds and not isinstance(ds[key], dict):
            raise ConfigError(
                f"{where}: '{key}' must be a JSON object such as {{\"enabled\": true}}, "
                f"got {ds[key]!r}"
            )
    for key in ("bf16", "fp16"):
        enabled = ds.get(key, {}).get("enabled", False)
        if not isinstance(enabled, bool):
            raise ConfigError(f"{where}: {key}.enabled must be true or false, got {enabled!r}")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int):
        raise ConfigError(f"{where}: zero_optimization.stage must be 0-3, got {stage!r}")
    for key in _DS_BATCH_KEYS:
        value = ds.get(key, "auto")
        if value != "auto" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f'{where}: {key} must be an integer or "auto", got {value!r}')


# ----------------------------------------------------------------------------- data accounting


class SkipTally:
    """Skip statistics of one rank's data stream across epochs (a loader resets per epoch).

    A training stream (megaclip.data.stream.TrainStream) already counts across epochs and
    resumes (its counts are part of the checkpointed data position): watch it and never call
    :meth:`end_epoch`.
    """

    def __init__(self) -> None:
        self._finished = SkipStats()
        self._loader: Any = None

    def watch(self, loader: Any) -> None:
        """Follow ``loader.skip_stats`` (a WebLoader or a TrainStream) from now on."""
        self._loader = loader

    def end_epoch(self) -> None:
        """Fold the loader's finished epoch into the running totals."""
        if self._loader is not None:
            self._finished = self._finished + self._loader.skip_stats

    @property
    def total(self) -> SkipStats:
        """Finished epochs plus the epoch in progress."""
        live = self._loader.skip_stats if self._loader is not None else SkipStats()
        return self._finished + live


def skip_record(tally: SkipTally | None, dp_group: dist.ProcessGroup | None) -> dict[str, Any]:
    """Metrics fields of the data skipped so far, summed over the DP group (collective).

    ``data_ok``: samples used; ``data_skipped``: samples skipped (all sample reasons) plus one
    per shard that could not be read to its end (unreachable URL, failing ``pipe:`` command,
    truncated or corrupt tar: how many samples it held is unknown); ``data_shard_errors``: those
    shards alone. Empty without a tally.
    """
    if tally is None:
        return {}
    s = tally.total
    counts = torch.tensor([s.ok, s.skipped + s.shard_errors, s.shard_errors], dtype=torch.int64)
    if dp_group is not None and dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(counts, group=dp_group)
    ok, skipped, shard_errors = (int(v) for v in counts.tolist())
    seen = ok + skipped
    return {
        "data_ok": ok,
        "data_skipped": skipped,
        "data_skip_fraction": skipped / seen if seen else 0.0,
        "data_shard_errors": shard_errors,
    }


def batch_fingerprint(micro_batch: tuple[torch.Tensor, torch.Tensor]) -> str:
    """16 hex digits of blake2b over the micro-batch's token ids (its shape included)."""
    tokens = micro_batch[1].detach().to("cpu", torch.int64).contiguous()
    h = hashlib.blake2b(digest_size=8)
    h.update(repr(tuple(tokens.shape)).encode())
    h.update(tokens.numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- fault injection


@dataclass(frozen=True)
class FaultPlan:
    """Test-only fault: global rank ``rank`` exits or hangs in the forward/backward of ``step``."""

    rank: int
    step: int
    mode: Literal["exit", "hang"] = "exit"
    point: Literal["forward", "backward"] = "forward"


def fault_plan_from_env(env: Mapping[str, str]) -> FaultPlan | None:
    """The FaultPlan the ``MEGACLIP_FAULT_*`` variables describe, or None when unset."""
    rank, step = env.get(KILL_RANK_ENV, ""), env.get(KILL_STEP_ENV, "")
    if not rank and not step:
        return None
    mode = env.get(MODE_ENV, "") or "exit"
    point = env.get(POINT_ENV, "") or "forward"
    try:
        plan = FaultPlan(int(rank), int(step), mode, point)  # type: ignore[arg-type]
    except ValueError:
        raise ConfigError(
            f"{KILL_RANK_ENV}={rank!r} and {KILL_STEP_ENV}={step!r} must both be integers"
        ) from None
    if mode not in ("exit", "hang") or point not in ("forward", "backward"):
        raise ConfigError(
            f"bad fault injection {plan}: {MODE_ENV} is 'exit' or 'hang', "
            f"{POINT_ENV} is 'forward' or 'backward'"
        )
    if plan.step < 1 or plan.rank < 0:
        raise ConfigError(f"bad fault injection {plan}: step must be >= 1 and rank >= 0")
    return plan


def _inject(plan: FaultPlan, rank: int) -> None:
    print(
        f"megaclip fault injection: rank {rank} {plan.mode}s in the {plan.point} of step "
        f"{plan.step}",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    if plan.mode == "exit":
        os._exit(KILLED_EXIT_CODE)
    while True:  # "hang": alive, connections open, never answering
        time.sleep(3600)


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
    if os.getppid() != parent or _adopted_by_init(parent):
        print(
            "megaclip train: error: the launcher of this rank is gone (killed during start-up); "
            "not training as an orphan",
            file=sys.stderr,
            flush=True,
        )
        os._exit(KILLED_EXIT_CODE)
    return True


def _adopted_by_init(parent: int) -> bool:
    """Whether ``parent`` is PID 1 that is not a torch launcher (we were orphaned and adopted).

    A launcher that died before this rank armed its death signal leaves the rank to PID 1;
    torchrun itself may be PID 1 in a container, so PID 1 running torch does not count.
    """
    if parent != 1:
        return False
    try:
        init = Path("/proc/1/cmdline").read_bytes()
    except OSError:
        return False
    return b"torch" not in init


# ----------------------------------------------------------------------------- lost ranks


@dataclass(frozen=True)
class Peer:
    """Where a rank runs: host name and process id."""

    rank: int
    host: str
    pid: int


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited child that nobody reaped yet is a zombie: dead for our purpose
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def lost_ranks(
    peers: list[Peer], host: str, alive: Callable[[int], bool] = _pid_alive
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
            gathered: list[Any] = [None] * self.world
            dist.all_gather_object(gathered, me)
            self.peers = [p for p in gathered if p.rank != self.rank]
            if self.watchdog_limit_s is not None:
                self._watchdog = threading.Thread(
                    target=self._watch, name="megaclip-watchdog", daemon=True
                )
                self._watchdog.start()
        if self.plan is not None and self.plan.rank == self.rank:
            self._handles.append(self._arm(self.plan))
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

    def _arm(self, plan: FaultPlan) -> Any:
        """Install the injected fault as a forward pre-hook or a gradient hook; its handle."""
        module = self.clip_engine.engine.module

        def fire(*_: Any) -> None:
            if self.step == plan.step:
                _inject(plan, self.rank)

        if plan.point == "forward":
            return module.register_forward_pre_hook(fire)
        trainable = [p for p in module.parameters() if p.requires_grad]
        if not trainable:
            raise ConfigError("fault injection in the backward pass: no trainable parameter")
        return trainable[0].register_hook(fire)

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
