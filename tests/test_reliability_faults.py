"""Process faults: a rank killed or hung mid-step ends the whole job within the timeout with one
line naming the lost rank and the checkpoint to restart from; the restart resumes exactly."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megaclip.bench.launch import torchrun_cmd
from megaclip.data.stats import SkipStats, SkipTally
from megaclip.data.stream import batch_fingerprint
from megaclip.errors import ConfigError
from megaclip.train.ds_config import check_deepspeed_sections
from megaclip.train.fault_injection import KILLED_EXIT_CODE, FaultPlan, fault_plan_from_env
from megaclip.train.faults import (
    LOST_RANK_EXIT_CODE,
    Peer,
    TrainingGuard,
    is_peer_failure,
    lost_contact_message,
    lost_ranks,
)
from megaclip.train.host import children_of
from megaclip.train.host import pid_alive as alive
from megaclip.train.preflight import check_output_dir
from tests.mp_util import REPO, subprocess_env, torchrun
from tests.workers.rel_launch import launch_ranks

# ----------------------------------------------------------------------------- units


def test_fault_plan_from_env():
    assert fault_plan_from_env({}) is None
    env = {"MEGACLIP_FAULT_KILL_RANK": "1", "MEGACLIP_FAULT_KILL_STEP": "3"}
    assert fault_plan_from_env(env) == FaultPlan(1, 3, "exit", "forward")
    env.update(MEGACLIP_FAULT_MODE="hang", MEGACLIP_FAULT_POINT="backward")
    assert fault_plan_from_env(env) == FaultPlan(1, 3, "hang", "backward")
    for bad in (
        {"MEGACLIP_FAULT_KILL_RANK": "1"},
        {"MEGACLIP_FAULT_KILL_RANK": "x", "MEGACLIP_FAULT_KILL_STEP": "3"},
        {**env, "MEGACLIP_FAULT_MODE": "explode"},
        {**env, "MEGACLIP_FAULT_KILL_STEP": "0"},
    ):
        with pytest.raises(ConfigError):
            fault_plan_from_env(bad)


def test_lost_contact_message_names_ranks_step_and_checkpoint():
    line = lost_contact_message(
        [1, 3], True, 7, "/o/checkpoints/step-6", "[x/pair.cc:545] Connection reset", 0
    )
    assert line == (
        "lost contact with rank(s) 1, 3 at step 7; restart to resume from "
        "/o/checkpoints/step-6 [rank 0: Connection reset]"
    )
    assert "a restart begins at step 0" in lost_contact_message([], True, 1, None, "x", 2)
    assert "still running but does not answer" in lost_contact_message([], True, 1, None, "", 0)
    assert "a rank on another host" in lost_contact_message([], False, 1, None, "", 0)
    stalled = lost_contact_message([1], True, 3, "/c/step-2", "train.dist_timeout_s=4", 0, 6.4)
    assert stalled == (
        "step 3 made no progress for 6 s (train.dist_timeout_s=4); rank(s) 1 are gone: a rank "
        "is hung or lost; restart to resume from /c/step-2 [rank 0]"
    )
    assert len(lost_contact_message([1], True, 1, None, "y" * 1000, 0)) < 300


def test_lost_ranks_checks_only_this_hosts_processes():
    peers = [Peer(1, "a", 11), Peer(2, "a", 12), Peer(3, "b", 13)]
    alive = {11: False, 12: True, 13: False}.__getitem__
    assert lost_ranks(peers, "a", alive) == ([1], False)
    assert lost_ranks(peers[:2], "a", alive) == ([1], True)


def test_is_peer_failure():
    yes = [
        RuntimeError("[../pair.cc:545] Read error [127.0.0.1]:1: Connection reset by peer"),
        RuntimeError("Connection closed by peer [127.0.0.1]:5"),
        RuntimeError("Timed out waiting 5000ms for recv operation to complete"),
        RuntimeError("NCCL error: remote process exited or there was a network error"),
    ]
    no = [
        RuntimeError("mat1 and mat2 shapes cannot be multiplied"),
        RuntimeError("DataLoader timed out after 30 seconds"),
        ValueError("Timed out waiting"),
    ]
    assert all(is_peer_failure(e) for e in yes)
    assert not any(is_peer_failure(e) for e in no)


def test_check_output_dir(tmp_path):
    check_output_dir(tmp_path / "new" / "run")  # creatable
    check_output_dir(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ConfigError, match="which is a file"):
        check_output_dir(tmp_path / "f" / "run")
    with pytest.raises(ConfigError, match="is a file"):
        check_output_dir(tmp_path / "f")
    with pytest.raises(ConfigError, match="NUL"):
        check_output_dir("a\x00b")
    assert not (tmp_path / "new").exists()  # nothing created


def test_check_deepspeed_sections():
    check_deepspeed_sections({"bf16": {"enabled": True}, "zero_optimization": {"stage": 2}})
    check_deepspeed_sections({"train_batch_size": "auto"})
    for bad in (
        {"bf16": 5},
        {"fp16": {"enabled": "yes"}},
        {"zero_optimization": [1]},
        {"zero_optimization": {"stage": "2"}},
        {"train_batch_size": 1.5},
    ):
        with pytest.raises(ConfigError):
            check_deepspeed_sections(bad)


def test_batch_fingerprint():
    tokens = torch.arange(12).reshape(3, 4)
    images = torch.zeros(3, 3, 2, 2)
    fp = batch_fingerprint((images, tokens))
    assert len(fp) == 16 and fp == batch_fingerprint((images + 1, tokens.clone()))
    assert fp != batch_fingerprint((images, tokens + 1))
    assert fp != batch_fingerprint((images, tokens.reshape(4, 3)))


def test_skip_tally_accumulates_over_epochs():
    loader = SimpleNamespace(skip_stats=SkipStats(ok=5, undecodable_image=2))
    tally = SkipTally()
    tally.watch(loader)
    assert (tally.total.ok, tally.total.skipped) == (5, 2)
    tally.end_epoch()
    loader.skip_stats = SkipStats(ok=1)  # the next epoch restarts the loader's counts
    assert (tally.total.ok, tally.total.skipped) == (6, 2)


def test_guard_reports_a_dead_peer_in_one_line(tmp_path):
    """Unit test of the report path with a stand-in engine and a peer process that is gone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "latest").write_text("step-4\n")
    (tmp_path / "step-4").mkdir()
    stream, codes = io.StringIO(), []
    guard = TrainingGuard(
        SimpleNamespace(step_count=5), tmp_path, env={}, stream=stream, exit_fn=codes.append
    )
    guard.world = 2  # pretend: a two-rank job whose rank 1 was ``dead``
    guard.peers = [Peer(1, socket.gethostname(), dead.pid)]
    assert guard.__exit__(RuntimeError, RuntimeError("Connection closed by peer"), None)
    assert codes == [LOST_RANK_EXIT_CODE]
    assert stream.getvalue() == (
        f"megaclip train: error: lost contact with rank(s) 1 at step 6; restart to resume from "
        f"{tmp_path}/step-4 [rank 0: Connection closed by peer]\n"
    )
    other = RuntimeError("a genuine bug")
    assert guard.__exit__(RuntimeError, other, None) is False  # not swallowed


# ----------------------------------------------------------------------------- processes

COMMON = [
    "data.kind=synthetic",
    "model=tiny",
    "zeroshot.data=",
    "deepspeed=null",
    "parallel.dp=2",
    "parallel.micro_batch_size=4",
    "train.steps=6",
    "train.log_every=1",
    "train.save_every=2",
    "train.tensorboard=false",
]


def by_step(run: Path) -> dict[int, dict]:
    """The last record of each step (a resumed run logs the steps after its checkpoint again)."""
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


def error_lines(text: str) -> list[str]:
    return [x for x in text.splitlines() if x.startswith("megaclip train: error:")]


@pytest.mark.multiproc
def test_killed_rank_ends_the_job_and_the_restart_resumes_exactly(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    torchrun(2, "-m", "megaclip", "train", *COMMON, f"train.out_dir={whole}", timeout=120)
    results = launch_ranks(
        2,
        [*COMMON, f"train.out_dir={parts}", "train.dist_timeout_s=30"],
        tmp_path / "logs",
        env={"MEGACLIP_FAULT_KILL_RANK": "1", "MEGACLIP_FAULT_KILL_STEP": "4"},
        timeout=90,
    )
    r0, r1 = results
    assert r1.rc == KILLED_EXIT_CODE, r1.err[-3000:]
    assert r0.rc == LOST_RANK_EXIT_CODE, r0.err[-3000:]
    lines = error_lines(r0.err)
    assert len(lines) == 1 and "Traceback" not in r0.err, r0.err[-3000:]
    assert lines[0].startswith(
        "megaclip train: error: lost contact with rank(s) 1 at step 4; restart to resume from "
        f"{parts}/checkpoints/step-2 [rank 0: "
    ), lines[0]
    assert r0.seconds - r1.seconds < 15, (r0.seconds, r1.seconds)  # far below the 30 s timeout
    assert sorted(by_step(parts)) == [1, 2, 3]  # step 4 died before it was logged

    out = torchrun(2, "-m", "megaclip", "train", *COMMON, f"train.out_dir={parts}", timeout=120)
    assert f"resumed from {parts}/checkpoints at step 2" in out.stdout
    a, b = by_step(whole), by_step(parts)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    for step in a:
        assert abs(a[step]["loss"] - b[step]["loss"]) <= 1e-6 * abs(a[step]["loss"]), (step, a, b)
        assert a[step]["data_fingerprint"] == b[step]["data_fingerprint"], step


@pytest.mark.multiproc
def test_hung_rank_ends_the_job_after_the_timeout(tmp_path):
    """Rank 1 stops answering in the backward of step 3: rank 0 waits in DeepSpeed's gradient
    all-reduce, whose process group has torch's 30-minute default; the step watchdog ends both
    ranks after ~train.dist_timeout_s instead."""
    timeout_s, run = 4, tmp_path / "run"
    results = launch_ranks(
        2,
        [*COMMON, f"train.out_dir={run}", f"train.dist_timeout_s={timeout_s}"],
        tmp_path / "logs",
        env={
            "MEGACLIP_FAULT_KILL_RANK": "1",
            "MEGACLIP_FAULT_KILL_STEP": "3",
            "MEGACLIP_FAULT_MODE": "hang",
            "MEGACLIP_FAULT_POINT": "backward",
        },
        timeout=80,
    )
    for r in results:
        assert r.rc == LOST_RANK_EXIT_CODE, (r.rank, r.rc, r.err[-3000:])
        lines = error_lines(r.err)
        assert len(lines) == 1 and "Traceback" not in r.err, r.err[-3000:]
        restart = f"restart to resume from {run}/checkpoints/step-2"
        assert "step 3" in lines[0] and restart in lines[0], lines[0]
    # rank 1 is stuck in its backward: its own watchdog ends it; rank 0 waits in DeepSpeed's
    # all-reduce (30 min default) and is ended by its watchdog, or sees rank 1 go
    assert "step 3 made no progress for" in error_lines(results[1].err)[0]
    assert "a rank is hung or lost" in error_lines(results[1].err)[0]
    assert abs(results[0].seconds - results[1].seconds) < 10


@pytest.mark.multiproc
def test_ranks_die_with_a_sigkilled_torchrun(tmp_path):
    """torchrun puts each rank in its own session; SIGKILL of torchrun alone must not leave them
    training on (they would write into the checkpoints of the restarted job)."""
    run = tmp_path / "run"
    launcher = subprocess.Popen(
        torchrun_cmd(
            2, ["-m", "megaclip", "train", *COMMON, "train.steps=100000", f"train.out_dir={run}"]
        ),
        cwd=REPO,
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 90
        while not ((run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size):
            assert launcher.poll() is None and time.monotonic() < deadline, "training never began"
            time.sleep(0.1)
        ranks = children_of(launcher.pid)
        assert len(ranks) == 2, ranks
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)  # torchrun's group only: not the ranks' sessions
        launcher.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in ranks) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = [pid for pid in ranks if alive(pid)]
    for pid in survivors:
        os.kill(pid, signal.SIGKILL)
    assert not survivors, "ranks outlived their SIGKILLed launcher"
