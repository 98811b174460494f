"""Bad samples are skipped and counted in metrics.jsonl; too many of them stop the run clearly."""

from __future__ import annotations

import io
import json
import subprocess
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from megaclip.train.faults import LOST_RANK_EXIT_CODE
from tests.mp_util import megaclip_cli, subprocess_env
from tests.workers.rel_launch import launch_ranks

COMMON = [
    "model=demo",
    "data.kind=webdataset",
    "parallel.micro_batch_size=8",
    "train.log_every=1",
    "train.tensorboard=false",
    "zeroshot.data=",
    "deepspeed=null",
]


def _member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), ((i * 37) % 256, (i * 91) % 256, (i * 13) % 256)).save(buf, "PNG")
    return buf.getvalue()


def write_shard(path: Path, first: int, n: int, bad: set[int], no_caption: set[int] = frozenset()):
    """A shard of ``n`` samples; indices in ``bad`` hold undecodable image bytes, those in
    ``no_caption`` have no .txt member."""
    with tarfile.open(path, "w") as tf:
        for i in range(first, first + n):
            key = f"s{i:06d}"
            _member(tf, key + ".png", b"\x89PNG broken" if i in bad else _png(i))
            if i not in no_caption:
                _member(tf, key + ".txt", f"a photo of colour {i % 10}".encode())


def train(run: Path, spec: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """One-process `megaclip train` of the shards ``spec`` into ``run``: COMMON, then ``args``."""
    settings = [*COMMON, "parallel.dp=1", f"data.train={spec}", f"train.out_dir={run}", *args]
    return megaclip_cli("train", *settings, env=subprocess_env(), timeout=timeout)


def records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_corrupt_samples_are_skipped_and_counted(tmp_path):
    """One shard of 32 samples, 6 undecodable + 2 without caption, read in epochs of 24 good
    samples = 3 steps: the counts after whole epochs are exact (8 skipped per epoch). The spec's
    missing second shard is skipped with a warning."""
    write_shard(tmp_path / "e-000000.tar", 0, 32, bad={0, 4, 8, 12, 16, 20}, no_caption={24, 28})
    run = tmp_path / "run"
    out = train(run, f"{tmp_path}/e-{{000000..000001}}.tar", "data.mode=epoch", "train.steps=6")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1 of 2 shards of spec" in out.stderr and "e-000001.tar" in out.stderr
    rows = records(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    skipped = [r["data_skipped"] for r in rows]
    assert skipped[0] >= 1 and skipped == sorted(skipped)  # counted as met, cumulative
    by_step = {r["step"]: r for r in rows}
    assert by_step[3]["data_ok"] == 24 and by_step[3]["data_skipped"] == 8, by_step[3]
    assert by_step[6]["data_ok"] == 48 and by_step[6]["data_skipped"] == 16, by_step[6]
    assert by_step[6]["data_skip_fraction"] == pytest.approx(0.25)
    assert all(r["data_shard_errors"] == 0 for r in rows)


def test_max_skip_fraction_stops_the_run_with_one_clear_line(tmp_path):
    write_shard(tmp_path / "f-000000.tar", 0, 64, bad=set(range(0, 64, 4)))
    write_shard(tmp_path / "f-000001.tar", 64, 64, bad=set(range(64, 128, 4)))
    run = tmp_path / "run"
    spec = f"{tmp_path}/f-{{000000..000001}}.tar"
    out = train(run, spec, "data.max_skip_fraction=0.1", "train.steps=40")
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    line = [x for x in out.stderr.splitlines() if x.startswith("megaclip train: error:")]
    assert len(line) == 1, out.stderr[-3000:]
    assert "were skipped, above max_skip_fraction=0.1: undecodable_image=" in line[0]
    assert "megaclip data inspect" in line[0]
    assert len(records(run)) < 40  # stopped early


@pytest.mark.multiproc
def test_bad_data_on_one_rank_ends_every_rank(tmp_path):
    """Epoch mode, 2 shards, 2 DP ranks: rank 1's shard is all corrupt. Rank 1 stops with the
    data error; rank 0 reports the lost rank instead of waiting forever."""
    write_shard(tmp_path / "g-000000.tar", 0, 32, bad=set())
    write_shard(tmp_path / "g-000001.tar", 32, 32, bad=set(range(32, 64)))
    results = launch_ranks(
        2,
        [
            *COMMON,
            "parallel.dp=2",
            f"data.train={tmp_path}/g-{{000000..000001}}.tar",
            "data.mode=epoch",
            "train.steps=8",
            f"train.out_dir={tmp_path / 'run'}",
            "train.dist_timeout_s=20",
        ],
        tmp_path / "logs",
        timeout=90,
    )
    r0, r1 = results
    assert r1.rc == 2, r1.err[-3000:]
    assert "32 of 32 samples (100.0%) were skipped" in r1.err
    assert "undecodable_image=32" in r1.err
    assert r0.rc == LOST_RANK_EXIT_CODE, r0.err[-3000:]
    assert "megaclip train: error: lost contact with rank(s) 1 at step 1" in r0.err
    assert "no checkpoint was saved yet" in r0.err
    for r in results:
        assert "Traceback" not in r.err, r.err[-3000:]
    assert abs(r0.seconds - r1.seconds) < 20  # the survivor did not wait for a timeout
