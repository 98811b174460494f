"""megaclip.launch.plan (+ its command line, megaclip.cli.launch): hostfiles, nodelists, rank
layout, dp derivation and launch commands."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from megaclip.cli.launch import main
from megaclip.errors import ConfigError
from megaclip.launch.plan import (
    Entry,
    Host,
    TrainCommand,
    deepspeed_plan,
    derive_dp,
    expand_nodelist,
    format_plan,
    format_ranks,
    parse_hostfile,
    parse_tasks_per_node,
    rank_blocks,
    read_hostfile,
    read_parallel,
    resolve_entry,
    slurm_plan,
    split_tp_groups,
    torchrun_plan,
)

TRAIN = TrainCommand("run.yaml", "ds.json", ("train.steps=5",))
RUN = ["python", "-u", "-m", "megaclip.cli.main", "train", "--config", "run.yaml"]


# ----------------------------------------------------------------------------- hostfiles


def test_hostfile_comments_blank_lines_and_extra_keys():
    text = (
        "# cluster\n\nworker-0 slots=8\n  worker-1   slots=4  # half node\nw2 slots=2 max_slots=2\n"
    )
    assert parse_hostfile(text) == [Host("worker-0", 8), Host("worker-1", 4), Host("w2", 2)]


@pytest.mark.parametrize(
    "text, match",
    [
        ("worker-0\n", r"line 1 .*missing slots=N.*'worker-0 slots=8'"),
        ("a slots=2\nb slots=x\n", r"line 2 .*slots must be a positive integer.*'x'"),
        ("a slots=0\n", r"slots must be a positive integer.*'0'"),
        ("a slots=2\n# c\na slots=4\n", r"line 3 .*'a' is listed twice \(first on line 1\)"),
        ("a slots=2 gpus\n", r"unexpected 'gpus'"),
        ("slots=2\n", r"must start with a host name"),
        ("a slots=2 slots=3\n", r"slots= is given twice"),
        ("# only comments\n\n", r"lists no hosts"),
    ],
)
def test_hostfile_errors_name_line_and_fix(text, match):
    with pytest.raises(ConfigError, match=match):
        parse_hostfile(text)


def test_read_hostfile_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"hostfile not found: .*nope.*HOSTFILE"):
        read_hostfile(tmp_path / "nope")
    (tmp_path / "hf").write_text("node1 slots=3\n")
    assert read_hostfile(tmp_path / "hf") == [Host("node1", 3)]


# ----------------------------------------------------------------------------- nodelists


@pytest.mark.parametrize(
    "spec, names",
    [
        ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
        ("a,b", ["a", "b"]),
        ("gpu5", ["gpu5"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("x[1-2],y,z[09-10]", ["x1", "x2", "y", "z09", "z10"]),
        ("r[1-2]n[1-2]", ["r1n1", "r1n2", "r2n1", "r2n2"]),
        ("node[3]-ib", ["node3-ib"]),
    ],
)
def test_expand_nodelist(spec, names):
    assert expand_nodelist(spec) == names


@pytest.mark.parametrize(
    "spec, match",
    [
        ("node[01-03", "never closed"),
        ("node01]", "without"),
        ("n[1-[2]]", "nested"),
        ("n[3-1]", "backwards"),
        ("n[a-c]", "bad range"),
        ("a,,b", "empty host name"),
        ("", "empty nodelist"),
    ],
)
def test_expand_nodelist_errors(spec, match):
    with pytest.raises(ConfigError, match=match):
        expand_nodelist(spec)


@given(
    st.lists(st.integers(0, 300), min_size=1, max_size=20, unique=True).map(sorted),
    st.integers(1, 4),
)
def test_expand_nodelist_matches_naive_ranges(numbers, width):
    """Compress sorted numbers into [a-b,c] ranges; expansion gives back the zero-padded names."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    body = ",".join(
        f"{r[0]:0{width}d}" + (f"-{r[-1]:0{width}d}" if len(r) > 1 else "") for r in runs
    )
    assert expand_nodelist(f"gpu[{body}]") == [f"gpu{n:0{width}d}" for n in numbers]


def test_tasks_per_node_forms():
    assert parse_tasks_per_node("4", 3) == [4, 4, 4]
    assert parse_tasks_per_node("4(x2),2", 3) == [4, 4, 2]
    with pytest.raises(ConfigError, match="describes 2 nodes but the job has 3"):
        parse_tasks_per_node("4(x2)", 3)
    with pytest.raises(ConfigError, match="expected a number"):
        parse_tasks_per_node("four", 1)


# ----------------------------------------------------------------------------- ranks, dp


def test_rank_blocks_and_tp_groups():
    blocks = rank_blocks([4, 4, 2])
    assert [list(b) for b in blocks] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert split_tp_groups(rank_blocks([4, 4]), 2) == []
    assert split_tp_groups(rank_blocks([3, 3]), 2) == [(2, 3)]
    assert split_tp_groups(rank_blocks([2, 2]), 4) == [(0, 3)]


def test_derive_dp():
    assert derive_dp(16, 2, 2) == 4
    assert derive_dp(8, 1, 1) == 8
    with pytest.raises(ConfigError, match=r"12 processes .* tp 4 x pp 2 = 8; launch a multiple"):
        derive_dp(12, 4, 2)


def test_read_parallel_applies_overrides(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: tiny\nparallel: {tp: 2, dp: 3}\n")
    assert read_parallel(cfg) == (2, 1)
    assert read_parallel(cfg, ["parallel.pp=4", "--resume", "train.steps=3"]) == (2, 4)
    (tmp_path / "bad.yaml").write_text("parallel: {tp: zero}\n")
    with pytest.raises(ConfigError, match="parallel.tp must be a positive integer"):
        read_parallel(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="config file not found"):
        read_parallel(tmp_path / "none.yaml")


def test_train_args_set_dp_and_check_user_value():
    cmd = TrainCommand("c.yaml", None, ("a=1", "parallel.dp=4", "--flag"))
    assert cmd.train_args(8, 2, 1) == ["--config", "c.yaml", "a=1", "--flag", "parallel.dp=4"]
    auto = TrainCommand("c.yaml", "d.json", ("parallel.dp=auto",))
    assert auto.train_args(8, 1, 1) == [
        "--config",
        "c.yaml",
        "--deepspeed",
        "d.json",
        "parallel.dp=8",
    ]
    with pytest.raises(ConfigError, match=r"'parallel.dp=4' contradicts the launch: 8 .* dp 8"):
        TrainCommand("c.yaml", None, ("parallel.dp=4",)).train_args(8, 1, 1)


def test_resolve_entry():
    assert resolve_entry(None).python_args() == ["-m", "megaclip.cli.main", "train"]
    assert resolve_entry("tests/workers/p.py").python_args() == ["tests/workers/p.py"]
    assert resolve_entry("pkg.mod sub") == Entry("pkg.mod", True, ("sub",))


# ----------------------------------------------------------------------------- plans


def test_deepspeed_plan_two_nodes():
    hosts = [Host("w0", 8), Host("w1", 8), Host("w2", 8)]
    plan = deepspeed_plan(hosts, TRAIN, 2, 2, num_nodes=2, gpus_per_node=4, hostfile="hf")
    assert plan.argv[:12] == (
        "deepspeed", "--hostfile", "hf", "--num_nodes", "2", "--num_gpus", "4",
        "--master_addr", "w0", "--master_port", "29500", "--no_local_rank",
    )  # fmt: skip
    assert plan.argv[12:] == (
        "--module", "megaclip.cli.main", "train", "--config", "run.yaml",
        "--deepspeed", "ds.json", "train.steps=5", "parallel.dp=2",
    )  # fmt: skip
    assert plan.world_size == 8 and plan.dp == 2
    assert [(n.host, n.ranks, n.local_ranks) for n in plan.nodes] == [
        ("w0", (0, 1, 2, 3), (0, 1, 2, 3)),
        ("w1", (4, 5, 6, 7), (0, 1, 2, 3)),
    ]
    assert list(plan.nodes[1].argv) == [
        *RUN,
        "--deepspeed",
        "ds.json",
        "train.steps=5",
        "parallel.dp=2",
    ]
    assert ("WORLD_SIZE", "8") in plan.nodes[1].env
    assert any("pdsh" in n for n in plan.notes)


def test_deepspeed_plan_single_host_modes_and_uneven_slots():
    local = deepspeed_plan([Host("localhost", 2)], TRAIN, 1, 1)
    assert "--no_ssh_check" in local.argv and local.master_addr == "127.0.0.1"
    remote = deepspeed_plan([Host("gpu7", 2)], TRAIN, 1, 1, master_port=1234)
    assert "--force_multi" in remote.argv and remote.master_addr == "gpu7"
    # DeepSpeed's launcher sets LOCAL_RANK = RANK % processes-on-node: uneven slots rotate it.
    uneven = deepspeed_plan([Host("a", 3), Host("b", 3), Host("c", 2)], TRAIN, 1, 1)
    assert [n.local_ranks for n in uneven.nodes] == [(0, 1, 2), (0, 1, 2), (0, 1)]
    uneven = deepspeed_plan([Host("a", 3), Host("b", 2)], TRAIN, 1, 1)
    assert uneven.nodes[1].ranks == (3, 4) and uneven.nodes[1].local_ranks == (1, 0)


def test_deepspeed_plan_errors():
    hosts = [Host("a", 4), Host("b", 2)]
    with pytest.raises(ConfigError, match=r"NUM_NODES=3 but hf lists 2 host"):
        deepspeed_plan(hosts, TRAIN, 1, 1, num_nodes=3, hostfile="hf")
    with pytest.raises(ConfigError, match=r"GPUS_PER_NODE=4 exceeds the 2 slots of host 'b'"):
        deepspeed_plan(hosts, TRAIN, 1, 1, gpus_per_node=4)
    with pytest.raises(ConfigError, match="6 processes cannot be split"):
        deepspeed_plan(hosts, TRAIN, 4, 1)


def test_slurm_plan():
    plan = slurm_plan(["n01", "n02"], [4, 4], TRAIN, 2, 1, cpus_per_task=12, master_port=777)
    assert plan.argv[:6] == (
        "srun", "--nodes=2", "--ntasks=8", "--ntasks-per-node=4", "--cpus-per-task=12",
        "--kill-on-bad-exit=1",
    )  # fmt: skip
    assert list(plan.argv[6:]) == list(plan.nodes[0].argv)
    assert plan.nodes[0].argv[-1] == "parallel.dp=4" and plan.master_addr == "n01"
    assert [(n.ranks, n.local_ranks) for n in plan.nodes] == [
        ((0, 1, 2, 3), (0, 1, 2, 3)),
        ((4, 5, 6, 7), (0, 1, 2, 3)),
    ]
    uneven = slurm_plan(["a", "b"], [3, 2], TRAIN, 1, 1)
    assert not any(a.startswith("--ntasks-per-node") for a in uneven.argv)
    assert uneven.nodes[1].ranks == (3, 4) and uneven.nodes[1].local_ranks == (0, 1)
    assert any("span two nodes" in n for n in slurm_plan(["a", "b"], [3, 3], TRAIN, 2, 1).notes)


def test_torchrun_plan_static_and_c10d():
    plan = torchrun_plan(2, 4, TRAIN, 1, 2, node_rank=1, master_addr="n0", master_port=99)
    assert plan.argv[:6] == (
        "torchrun", "--nnodes=2", "--nproc_per_node=4", "--node_rank=1", "--master_addr=n0",
        "--master_port=99",
    )  # fmt: skip
    assert plan.argv[6:9] == ("-m", "megaclip.cli.main", "train")
    assert plan.argv[-1] == "parallel.dp=4"
    assert plan.nodes[1].ranks == (4, 5, 6, 7) and plan.nodes[1].launch_argv == plan.argv
    assert "--node_rank=0" in plan.nodes[0].launch_argv
    c10d = torchrun_plan(2, 2, TRAIN, 1, 1, rdzv="c10d", master_addr="n0")
    assert "--rdzv_endpoint=n0:29500" in c10d.argv and "--rdzv_backend=c10d" in c10d.argv
    assert not any(a.startswith("--node_rank") for a in c10d.argv)
    assert not any("loopback" in n for n in c10d.notes)
    assert any("loopback" in n for n in torchrun_plan(2, 2, TRAIN, 1, 1).notes)
    with pytest.raises(ConfigError, match=r"NODE_RANK=2 must be in 0..1"):
        torchrun_plan(2, 2, TRAIN, 1, 1, node_rank=2)
    with pytest.raises(ConfigError, match="RDZV must be"):
        torchrun_plan(1, 2, TRAIN, 1, 1, rdzv="etcd")


def test_format_plan_lines():
    assert format_ranks([0, 1, 2]) == "0-2" and format_ranks([5]) == "5"
    assert format_ranks([1, 0]) == "1,0"
    plan = deepspeed_plan([Host("w0", 2), Host("w1", 2)], TRAIN, 1, 1)
    text = format_plan(plan, [("NCCL_DEBUG", "WARN")])
    lines = text.splitlines()
    assert lines[0].startswith("# megaclip launch plan (deepspeed): 2 nodes, 4 processes")
    assert "# env: NCCL_DEBUG=WARN" in lines
    assert "node 1 w1: ranks 2-3, local ranks 0-1" in lines
    env = "MASTER_ADDR=w0 MASTER_PORT=29500 WORLD_SIZE=4 CUDA_VISIBLE_DEVICES=0,1 RANK=2-3"
    assert f"  env: {env} LOCAL_RANK=0-1" in lines
    assert lines[-1].startswith("  run: python -u -m megaclip.cli.main train --config run.yaml")


def test_cli_dry_run_json_and_errors(tmp_path, capsys):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("parallel: {tp: 2}\n")
    rc = main(["--launcher", "slurm", "--dry-run", "--format", "json", "--config", str(cfg),
               "--nodelist", "g[1-2]", "--tasks-per-node", "4", "--", "x=1"])  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["world_size"] == 8 and out["dp"] == 4 and out["tp"] == 2
    assert [n["host"] for n in out["nodes"]] == ["g1", "g2"]
    rc = main(["--launcher", "slurm", "--dry-run", "--config", str(cfg), "--nodelist", "g[1-2]",
               "--nnodes", "3", "--tasks-per-node", "4"])  # fmt: skip
    assert rc == 2
    assert "SLURM_NNODES=3 but nodelist 'g[1-2]' names 2 node(s)" in capsys.readouterr().err
    assert main(["--launcher", "torchrun", "--dry-run"]) == 2
    assert "set CONFIG=" in capsys.readouterr().err
