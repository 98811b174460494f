"""launch/deepspeed.sh, launch/slurm.sbatch, launch/torchrun.sh: dry runs and real localhost runs.

Real runs start 2 CPU (gloo) processes of tests/workers/launch_probe.py through each script
(MEGACLIP_ENTRY replaces `-m megaclip.cli.main train`); every rank all-reduces and records the rank,
world size, local rank and argv it was given. SLURM is simulated by stub `srun` / `scontrol`
commands that start the tasks locally with SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.mp_util import REPO, free_port

PROBE = REPO / "tests" / "workers" / "launch_probe.py"
PROBE_MODULE = "tests.workers.launch_probe"
CONFIG = REPO / "configs" / "demo.yaml"  # tp 1, pp 1: dp = number of processes

# Launcher variables of the calling shell must not leak into a test's plan.
_CLEAR = (
    "SLURM_JOB_ID", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_NNODES", "SLURM_NTASKS_PER_NODE",
    "SLURM_TASKS_PER_NODE", "SLURM_CPUS_PER_TASK", "SLURM_SUBMIT_DIR", "MASTER_ADDR", "MASTER_PORT",
    "NNODES", "NODE_RANK", "NPROC_PER_NODE", "HOSTFILE", "NUM_NODES", "GPUS_PER_NODE", "DS_CONFIG",
    "MEGACLIP_ENTRY", "LAUNCHER_ARGS", "DEEPSPEED", "TORCHRUN", "SRUN", "RANK", "WORLD_SIZE",
    "LOCAL_RANK", "MEGACLIP_ROOT", "DRY_RUN", "NCCL_DEBUG",
)  # fmt: skip


def run_script(script: str, env: dict[str, str], *args: str, timeout: float = 120, cwd=None):
    """Run ``bash launch/<script> ARGS`` with ``env`` on top of a cleaned environment."""
    full = {k: v for k, v in os.environ.items() if k not in _CLEAR}
    full.update(
        PATH=os.pathsep.join([str(Path(sys.executable).parent), full.get("PATH", "")]),
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        DS_ACCELERATOR="cpu",
        CONFIG=str(CONFIG),
    )
    full.update(env)
    return subprocess.run(
        ["bash", str(REPO / "launch" / script), *args],
        cwd=cwd or REPO,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def node_lines(out: str) -> list[tuple[int, str, str, str]]:
    """(node, host, ranks, local ranks) of each 'node N HOST: ranks A-B, local ranks C-D' line."""
    pat = re.compile(r"^node (\d+) (\S+|\(any host\)): ranks (\S+), local ranks (\S+)$", re.M)
    return [(int(n), h, r, lr) for n, h, r, lr in pat.findall(out)]


def run_lines(out: str) -> list[str]:
    """The per-node rank commands ('  run: ...')."""
    return [line[len("  run: ") :] for line in out.splitlines() if line.startswith("  run: ")]


# ----------------------------------------------------------------------------- dry runs


def test_deepspeed_dry_run_two_nodes(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# two nodes\nworker-0 slots=8\n\nworker-1 slots=8\nworker-2 slots=8\n")
    env = {
        "DRY_RUN": "1",
        "HOSTFILE": str(hostfile),
        "NUM_NODES": "2",
        "GPUS_PER_NODE": "4",
        "DS_CONFIG": "ds_configs/zero1_bf16.json",
        "MASTER_PORT": "29777",
        "NCCL_SOCKET_IFNAME": "ib0",
        "LAUNCHER_ARGS": "--bind_cores_to_rank --bind_core_list 0-31",
    }
    proc = run_script("deepspeed.sh", env, "parallel.tp=2", "train.steps=10")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "8 processes = tp 2 x pp 1 x dp 4, master worker-0:29777" in out
    assert "# env: NCCL_DEBUG=WARN NCCL_SOCKET_IFNAME=ib0" in out
    tail = (
        f"--config {CONFIG} --deepspeed ds_configs/zero1_bf16.json parallel.tp=2 train.steps=10 "
        "parallel.dp=4"
    )
    assert (
        f"deepspeed --hostfile {hostfile} --num_nodes 2 --num_gpus 4 --master_addr worker-0 "
        "--master_port 29777 --bind_cores_to_rank --bind_core_list 0-31 --no_local_rank "
        f"--module megaclip.cli.main train {tail}"
    ) in out.splitlines()
    assert node_lines(out) == [(0, "worker-0", "0-3", "0-3"), (1, "worker-1", "4-7", "0-3")]
    assert run_lines(out) == [f"{sys.executable} -u -m megaclip.cli.main train {tail}"] * 2
    assert "RANK=4-7 LOCAL_RANK=0-3" in out and "WORLD_SIZE=8" in out
    assert proc.stderr == ""


def test_deepspeed_dry_run_errors(tmp_path):
    bad = tmp_path / "hostfile"
    bad.write_text("worker-0 slots=8\nworker-1\n")
    proc = run_script("deepspeed.sh", {"DRY_RUN": "1", "HOSTFILE": str(bad)})
    assert proc.returncode == 2
    assert "line 2 ('worker-1'): missing slots=N" in proc.stderr
    bad.write_text("worker-0 slots=3\n")
    proc = run_script("deepspeed.sh", {"DRY_RUN": "1", "HOSTFILE": str(bad)}, "parallel.tp=2")
    assert proc.returncode == 2 and "3 processes cannot be split" in proc.stderr
    proc = run_script("deepspeed.sh", {"DRY_RUN": "1", "HOSTFILE": str(tmp_path / "none")})
    assert proc.returncode == 2 and "hostfile not found" in proc.stderr


def test_slurm_dry_run_nodelist():
    env = {
        "DRY_RUN": "1",
        "SLURM_JOB_NODELIST": "gpu[01-03]",
        "SLURM_NNODES": "3",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_CPUS_PER_TASK": "12",
        "SLURM_JOB_ID": "123456",
    }
    proc = run_script("slurm.sbatch", env, "parallel.pp=2", "optim.lr=1e-4")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    # MASTER_PORT derives from the job id so that jobs sharing a node do not collide.
    assert "12 processes = tp 1 x pp 2 x dp 6, master gpu01:23456" in out
    tail = f"--config {CONFIG} parallel.pp=2 optim.lr=1e-4 parallel.dp=6"
    srun = (
        "srun --nodes=3 --ntasks=12 --ntasks-per-node=4 --cpus-per-task=12 --kill-on-bad-exit=1 "
        f"python -u -m megaclip.cli.main train {tail}"
    )
    assert srun.replace("python", sys.executable, 1) in out.splitlines()
    assert node_lines(out) == [
        (0, "gpu01", "0-3", "0-3"),
        (1, "gpu02", "4-7", "0-3"),
        (2, "gpu03", "8-11", "0-3"),
    ]
    assert "SLURM_PROCID=8-11 SLURM_LOCALID=0-3" in out
    assert run_lines(out) == [f"{sys.executable} -u -m megaclip.cli.main train {tail}"] * 3


def test_slurm_dry_run_heterogeneous_tasks():
    env = {
        "DRY_RUN": "1",
        "SLURM_JOB_NODELIST": "a,b[7-8]",
        "SLURM_NNODES": "3",
        "SLURM_TASKS_PER_NODE": "2(x2),4",
    }
    proc = run_script("slurm.sbatch", env)
    assert proc.returncode == 0, proc.stderr
    assert node_lines(proc.stdout) == [(0, "a", "0-1", "0-1"), (1, "b7", "2-3", "0-1"),
                                       (2, "b8", "4-7", "0-3")]  # fmt: skip


def test_torchrun_dry_run_multi_node():
    env = {"DRY_RUN": "1", "NNODES": "2", "NODE_RANK": "1", "NPROC_PER_NODE": "4",
           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29888", "TORCHRUN": "torchrun"}  # fmt: skip
    proc = run_script("torchrun.sh", env, "data.workers=2")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    tail = f"--config {CONFIG} data.workers=2 parallel.dp=8"
    here = (
        "torchrun --nnodes=2 --nproc_per_node=4 --node_rank=1 --master_addr=10.0.0.1 "
        f"--master_port=29888 -m megaclip.cli.main train {tail}"
    )
    assert out.splitlines()[3] == here  # header, note, env, then the command run on this node
    assert node_lines(out) == [(0, "10.0.0.1", "0-3", "0-3"), (1, "(any host)", "4-7", "0-3")]
    assert f"  launch: {here}" in out
    assert f"  launch: {here.replace('--node_rank=1', '--node_rank=0')}" in out
    assert run_lines(out) == [f"{sys.executable} -u -m megaclip.cli.main train {tail}"] * 2


# ----------------------------------------------------------------------------- real runs


def _records(out: Path, world: int) -> list[dict]:
    files = sorted(out.glob("rank*.pt"))
    assert [f.name for f in files] == [f"rank{r}.pt" for r in range(world)]
    return [torch.load(f) for f in files]


def _check(records: list[dict], world: int, override: str) -> None:
    """Every rank saw the right world, a distinct rank and local rank, and the launch's argv."""
    assert [r["rank"] for r in records] == list(range(world))
    assert [r["local_rank"] for r in records] == list(range(world))
    assert all(r["world"] == world for r in records)
    assert all(r["all_reduce"] == world * (world + 1) / 2 for r in records)
    for rec in records:
        argv = rec["argv"]
        assert argv[:2] == ["--config", str(CONFIG)]
        assert override in argv and argv[-1] == f"parallel.dp={world}"


@pytest.mark.multiproc
def test_deepspeed_script_real_localhost(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    out = tmp_path / "out"
    # A module entry takes the launcher's --module path, as the default megaclip.cli.main does.
    env = {
        "HOSTFILE": str(hostfile),
        "MASTER_PORT": str(free_port()),
        "MEGACLIP_ENTRY": PROBE_MODULE,
    }
    proc = run_script("deepspeed.sh", env, f"train.out_dir={out}", "train.steps=3", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    # one local host: --no_ssh_check, so no ssh / pdsh is needed
    assert f"--no_ssh_check --no_local_rank --module {PROBE_MODULE} --config" in proc.stderr
    records = _records(out, 2)
    _check(records, 2, "train.steps=3")
    assert all(r["env"]["MASTER_ADDR"] == "127.0.0.1" for r in records)


@pytest.mark.multiproc
def test_torchrun_script_real_localhost(tmp_path):
    out = tmp_path / "out"
    port = str(free_port())
    env = {"NPROC_PER_NODE": "2", "MASTER_PORT": port, "MEGACLIP_ENTRY": str(PROBE)}
    proc = run_script("torchrun.sh", env, f"train.out_dir={out}", "x.y=1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = _records(out, 2)
    _check(records, 2, "x.y=1")
    assert all(r["env"]["MASTER_PORT"] == port for r in records)


FAKE_SCONTROL = """#!/usr/bin/env bash
# stub: `scontrol show hostnames LIST` for a single-host list
[[ "$1 $2" == "show hostnames" ]] || exit 1
echo "$3"
"""

FAKE_SRUN = """#!/usr/bin/env bash
# stub srun: record the options, start --ntasks local tasks with SLURM task variables
echo "$@" > "$SRUN_LOG"
ntasks=1
while [[ "$1" == -* ]]; do
    case "$1" in --ntasks=*) ntasks="${1#--ntasks=}" ;; esac
    shift
done
pids=()
for ((i = 0; i < ntasks; i++)); do
    SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NTASKS=$ntasks SLURM_NODEID=0 "$@" &
    pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
exit $rc
"""


@pytest.mark.multiproc
def test_slurm_script_real_with_stub_srun(tmp_path):
    """The sbatch script's real path: scontrol -> MASTER_ADDR, srun -> tasks mapped by megaclip."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, text in (("scontrol", FAKE_SCONTROL), ("srun", FAKE_SRUN)):
        (bindir / name).write_text(text)
        (bindir / name).chmod(0o755)
    out = tmp_path / "out"
    port = free_port()
    env = {
        "SLURM_JOB_NODELIST": "127.0.0.1",
        "SLURM_NNODES": "1",
        "SLURM_NTASKS_PER_NODE": "2",
        "SLURM_CPUS_PER_TASK": "1",
        "SLURM_JOB_ID": "4242",
        "MASTER_PORT": str(port),  # else 20000 + job id % 10000 (see the dry-run test)
        "SLURM_SUBMIT_DIR": str(REPO),
        "SRUN_LOG": str(tmp_path / "srun.log"),
        "MEGACLIP_ENTRY": PROBE_MODULE,
    }
    env["PATH"] = os.pathsep.join(
        [str(bindir), str(Path(sys.executable).parent), os.environ["PATH"]]
    )
    proc = run_script("slurm.sbatch", env, f"train.out_dir={out}", "a.b=2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    srun_opts = (tmp_path / "srun.log").read_text().split()
    assert srun_opts[:5] == ["--nodes=1", "--ntasks=2", "--ntasks-per-node=2",
                             "--cpus-per-task=1", "--kill-on-bad-exit=1"]  # fmt: skip
    records = _records(out, 2)
    _check(records, 2, "a.b=2")
    for rec in records:
        assert rec["env"]["SLURM_PROCID"] == str(rec["rank"])
        assert rec["env"]["MASTER_ADDR"] == "127.0.0.1"
        assert rec["env"]["MASTER_PORT"] == str(port)


STUB_LAUNCHER = """#!/usr/bin/env bash
echo "MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT ARGS=$*"
"""


def test_plan_exec_mode_exports_master_for_srun(tmp_path):
    """Without DRY_RUN the plan execs the launcher; for srun it exports MASTER_ADDR/PORT first."""
    stub = tmp_path / "stub"
    stub.write_text(STUB_LAUNCHER)
    stub.chmod(0o755)
    env = {"SLURM_JOB_NODELIST": "h[3-4]", "SLURM_NTASKS_PER_NODE": "1", "SRUN": str(stub)}
    env["PATH"] = os.pathsep.join([str(tmp_path), os.environ["PATH"]])  # no scontrol here
    proc = run_script("slurm.sbatch", env, "k=v")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("MASTER_ADDR=h3 MASTER_PORT=29500 ARGS=--nodes=2 --ntasks=2 ")
    assert proc.stdout.rstrip().endswith("k=v parallel.dp=2")
    proc = run_script("torchrun.sh", {"TORCHRUN": str(tmp_path / "missing"), "NPROC_PER_NODE": "1"})
    assert proc.returncode == 127 and "not found on PATH" in proc.stderr
