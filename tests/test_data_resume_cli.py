"""`megaclip train` stopped after step k and started again sees exactly the uninterrupted samples.

2 ranks (torchrun), real JPEG photos, both data modes, 0 and 2 DataLoader workers. Every rank
traces the sample keys of each micro-batch (MEGACLIP_DATA_TRACE); the runs that stop (after
steps 2 and 4 with ``train.exit_after``, or killed by fault injection) and resume must trace,
for every micro-batch, the keys of the uninterrupted stream. That stream comes from the training
loop's own stream function in this process (the data does not depend on the model); the killed
run is also compared with an uninterrupted `megaclip train` run, losses included.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megaclip.data.photos import make_photo_shards
from tests.mp_util import torchrun

STEPS = 6


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    d = tmp_path_factory.mktemp("photos")
    return make_photo_shards(str(d), 70, 5, seed=1)


def uninterrupted(args: list[str], tmp: Path) -> dict[str, list[tuple[int, list[str]]]]:
    """Micro-batch keys of both DP ranks' uninterrupted streams, from the loop's stream code."""
    from types import SimpleNamespace

    from megaclip.config.train import load_run_config
    from megaclip.parallel.topology import Topology
    from megaclip.train.loop import _tokenizer, micro_batch_stream

    cfg = load_run_config(None, [*args, f"train.out_dir={tmp / 'unused'}"])
    out = {}
    for dp in range(2):
        topo = SimpleNamespace(coords=SimpleNamespace(dp=dp, tp=0, pp=0))
        topo.data_seed = lambda seed, t=topo: Topology.data_seed(t, seed)
        stream = micro_batch_stream(cfg, topo, _tokenizer(cfg))
        rows = []
        for i in range(1, 2 * STEPS + 1):
            next(stream)
            rows.append((i, list(stream.loader.last_keys)))
        out[f"rank{dp}.jsonl"] = rows
    return out


def common(spec: str, mode: str, workers: int) -> list[str]:
    return [
        "model=demo",
        "data.kind=webdataset",
        f"data.train={spec}",
        f"data.mode={mode}",
        f"data.workers={workers}",
        "data.shuffle_buffer=6",
        "zeroshot.data=",
        "deepspeed=null",
        "parallel.dp=2",
        "parallel.micro_batch_size=4",
        "parallel.grad_accum_steps=2",
        f"train.steps={STEPS}",
        "train.log_every=1",
        "train.save_every=0",
        "train.tensorboard=false",
    ]


def run(args: list[str], out: Path, trace: Path, env: dict | None = None, check: bool = True):
    full = {
        "MEGACLIP_DATA_TRACE": str(trace),
        "MEGACLIP_TAR_INDEX_DIR": str(out.parent / "tar-index"),
        **(env or {}),
    }
    cmd = ["-m", "megaclip", "train", *args, f"train.out_dir={out}"]
    if check:
        return torchrun(2, *cmd, timeout=300, env=full)
    import subprocess

    try:
        return torchrun(2, *cmd, timeout=300, env=full)
    except AssertionError as err:  # the injected kill: torchrun reports the failed rank
        return subprocess.CompletedProcess(cmd, 1, "", str(err))


def traces(d: Path) -> dict[str, list[tuple[int, list[str]]]]:
    out = {}
    for f in sorted(d.glob("rank*.jsonl")):
        rows = [json.loads(x) for x in f.read_text().splitlines()]
        out[f.name] = [(r["batch"], r["keys"]) for r in rows]
    return out


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def check_same(tmp: Path, name: str, want: dict | None = None) -> None:
    """The parts' traces against ``want`` (else the whole run's trace, and its losses)."""
    whole = want is None
    want = traces(tmp / f"{name}-whole-trace") if whole else want
    got = traces(tmp / f"{name}-parts-trace")
    assert sorted(want) == sorted(got) == ["rank0.jsonl", "rank1.jsonl"]
    for rank, rows in want.items():
        by_batch = dict(rows)
        assert [b for b, _ in rows] == list(range(1, 2 * STEPS + 1))
        seen = {b for b, _ in got[rank]}
        assert seen == set(by_batch), (rank, sorted(seen))
        for batch, keys in got[rank]:  # a batch traced twice (work redone) must match too
            assert keys == by_batch[batch], f"{rank} micro-batch {batch} differs after resume"
    if not whole:
        return
    a, b = losses(tmp / f"{name}-whole"), losses(tmp / f"{name}-parts")
    assert sorted(b) == list(range(1, STEPS + 1))
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-6 * abs(a[step]), (step, a, b)


@pytest.mark.multiproc
# both modes and both worker settings are covered (every combination, in process, by
# tests/test_data_resume.py); the killed run below adds resampled x 2 workers
@pytest.mark.parametrize(("mode", "workers"), [("epoch", 2), ("resampled", 0)])
def test_exit_after_k_and_resume_sees_the_same_samples(tmp_path, photos, mode, workers):
    args = common(photos, mode, workers)
    name = f"{mode}{workers}"
    parts, trace = tmp_path / f"{name}-parts", tmp_path / f"{name}-parts-trace"
    run([*args, "train.exit_after=2"], parts, trace)  # stops after step 2
    run([*args, "train.exit_after=2"], parts, trace)  # resumes at 2, stops after step 4
    out = run(args, parts, trace)  # resumes at 4
    assert "resumed from" in out.stdout and "replaying" not in out.stdout
    assert sorted(losses(parts)) == list(range(1, STEPS + 1))
    check_same(tmp_path, name, uninterrupted(args, tmp_path))


@pytest.mark.multiproc
def test_killed_rank_and_resume_sees_the_same_samples(tmp_path, photos):
    """Rank 1 dies in the forward of step 4 (checkpoints every step): the restart resumes at
    step 3 and traces the same samples for the steps the killed run had loaded."""
    args = [*common(photos, "epoch", 0), "train.save_every=1"]
    run(args, tmp_path / "kill-whole", tmp_path / "kill-whole-trace")
    parts, trace = tmp_path / "kill-parts", tmp_path / "kill-parts-trace"
    kill = {"MEGACLIP_FAULT_KILL_RANK": "1", "MEGACLIP_FAULT_KILL_STEP": "4"}
    killed = run([*args, "train.dist_timeout_s=30"], parts, trace, env=kill, check=False)
    assert killed.returncode != 0
    run(args, parts, trace)
    check_same(tmp_path, "kill")
