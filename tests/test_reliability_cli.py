"""`megaclip train` on bad input: exit 2, one clear line, no traceback, nothing damaged.

The cases that touch checkpoints or the file system run as real ``python -m megaclip train``
subprocesses, concurrently (one module fixture); there "before process groups" is checked by
the absence of the "resolved config" print, which happens only after they exist. The other
cases call the same CLI entry point in this process with ``init_distributed`` replaced by a
tripwire (each subprocess costs ~4 s of imports on this machine).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.data_util import write_shards
from tests.mp_util import REPO, subprocess_env
from tests.tripwire import stop_before_process_groups

TINY = [
    "data.kind=synthetic",
    "model=tiny",
    "parallel.dp=1",
    "parallel.micro_batch_size=4",
    "deepspeed=null",
    "train.tensorboard=false",
    "zeroshot.data=",
]


@dataclass
class Result:
    rc: int
    out: str
    err: str


def _env() -> dict:
    return subprocess_env(WORLD_SIZE="1")


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "megaclip", "train", *TINY, *args]


def start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(procs: dict[str, subprocess.Popen], timeout: float = 120) -> dict[str, Result]:
    """Wait for the processes; their results by name."""
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=timeout)
        results[name] = Result(proc.returncode, out, err)
    return results


def tree_hashes(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``root``."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_only_wrapper(directory: Path) -> list[str] | None:
    """A command prefix under which ``directory`` is read-only, or None if none is available.

    Not root: chmod. Root ignores permissions, so a private mount namespace with a read-only
    bind mount of ``directory`` (``unshare -m``, needs CAP_SYS_ADMIN).
    """
    if os.geteuid() != 0:
        directory.chmod(0o555)
        return []
    if shutil.which("unshare") is None:
        return None
    script = (
        f'mount --bind {directory} {directory} && mount -o remount,ro,bind {directory} && exec "$@"'
    )
    probe = subprocess.run(
        ["unshare", "-m", "sh", "-c", script, "sh", "touch", str(directory / "probe")],
        capture_output=True,
    )
    if probe.returncode == 0 or (directory / "probe").exists():
        return None
    return ["unshare", "-m", "sh", "-c", script, "sh"]


@pytest.fixture(scope="module")
def cases(tmp_path_factory) -> dict:
    """Run every bad-input case once; returns their results plus the files they must not touch."""
    tmp = tmp_path_factory.mktemp("cli")
    # a real saved run, for the resume / init_from cases; the others run meanwhile
    saved = tmp / "saved"
    saving = start(command(f"train.out_dir={saved}", "train.steps=2", "train.save_every=1"))
    readonly = tmp / "readonly"
    readonly.mkdir()
    wrapper = read_only_wrapper(readonly)
    commands = {"unknown_preset": command("model=ViT-Q-99", f"train.out_dir={tmp / 'r1'}")}
    if wrapper is not None:
        commands["read_only_out_dir"] = wrapper + command(f"train.out_dir={readonly}/run")
    procs = {name: start(cmd) for name, cmd in commands.items()}
    first = finish({"saved": saving})["saved"]
    assert first.rc == 0, first.err[-3000:]

    truncated = tmp / "truncated"
    shutil.copytree(saved, truncated)
    latest = (truncated / "checkpoints" / "latest").read_text().strip()
    victim = truncated / "checkpoints" / latest / "mp_rank_00_model_states.pt"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    other_model = tmp / "other_model"
    before = {"truncated": tree_hashes(truncated), "saved": tree_hashes(saved)}
    procs["init_from_other_model"] = start(
        command(
            "model=demo", f"train.init_from={saved / 'checkpoints'}", f"train.out_dir={other_model}"
        )
    )
    procs["truncated_shard"] = start(command(f"train.out_dir={truncated}", "train.steps=4"))
    return {
        "results": finish(procs),
        "before": before,
        "dirs": {"truncated": truncated, "saved": saved, "readonly": readonly, "tmp": tmp},
        "victim": victim,
        "other_model": other_model,
        "read_only_available": wrapper is not None,
    }


def check_clean_failure(result: Result, *messages: str, before_groups: bool = True) -> str:
    """Exit 2, the messages on one 'megaclip train: error:' line, no traceback."""
    assert result.rc == 2, f"rc={result.rc}\n{result.err[-3000:]}"
    assert "Traceback" not in result.err + result.out, result.err[-3000:]
    lines = [x for x in result.err.splitlines() if x.startswith("megaclip train: error:")]
    assert len(lines) == 1, result.err[-3000:]
    for message in messages:
        assert message in lines[0], lines[0]
    if before_groups:
        assert "resolved config" not in result.out
    return lines[0]


def test_unknown_preset(cases):
    check_clean_failure(
        cases["results"]["unknown_preset"], "unknown model 'ViT-Q-99'", "Did you mean"
    )


def test_init_from_a_checkpoint_of_another_model(cases):
    line = check_clean_failure(
        cases["results"]["init_from_other_model"],
        "holds a different architecture (model 'tiny')",
        "this run's model 'demo'",
        "embed_dim: 32 -> 64",
    )
    assert "checkpoints" in line
    assert not cases["other_model"].exists()  # failed before creating the output directory


def test_truncated_checkpoint_shard_names_the_file_and_changes_nothing(cases):
    victim = cases["victim"]
    check_clean_failure(
        cases["results"]["truncated_shard"],
        f"checkpoint file {victim} has {victim.stat().st_size} bytes, expected",
        "truncated",
    )
    assert tree_hashes(cases["dirs"]["truncated"]) == cases["before"]["truncated"]


def test_read_only_output_dir_fails_before_process_groups(cases):
    if not cases["read_only_available"]:
        pytest.skip("no way to make a read-only directory here (root without unshare -m)")
    check_clean_failure(
        cases["results"]["read_only_out_dir"], "train.out_dir", "is not writable", "readonly"
    )
    assert list(cases["dirs"]["readonly"].iterdir()) == []


# In-process variants (same CLI entry point, no subprocess): init_distributed is a tripwire.


@pytest.fixture
def cli(monkeypatch, capsys):
    """Call `megaclip train ARGS` in this process; returns (exit code, stderr)."""
    from megaclip.cli.main import main

    stop_before_process_groups(monkeypatch)

    def call(*args: str) -> tuple[int, str]:
        rc = main(["train", *TINY, *args])
        return rc, capsys.readouterr().err

    return call


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, str]:
    """A directory with two valid shards and their spec."""
    directory = tmp_path_factory.mktemp("shards")
    spec, _ = write_shards(str(directory), [8, 8])
    return directory, spec


def test_missing_shards(cli, tmp_path):
    rc, err = cli("model=demo", "data.kind=webdataset", f"data.train={tmp_path}/t-{{0..3}}.tar")
    check_in_process(rc, err, "matches no existing file (4 candidate path(s)", "t-0.tar")


def test_spec_that_names_a_directory(cli, shards):
    rc, err = cli("model=demo", "data.kind=webdataset", f"data.train={shards[0]}")
    check_in_process(rc, err, "matches no existing file", "is a directory: name the shards")


def test_tokenizer_file_that_is_not_sentencepiece(cli, shards, tmp_path):
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"this is not a sentencepiece model\n" * 10)
    rc, err = cli(
        "model=demo",
        "data.kind=webdataset",
        f"data.train={shards[1]}",
        "data.tokenizer=sentencepiece",
        f"data.tokenizer_path={garbage}",
    )
    check_in_process(rc, err, "garbage.model is not a valid SentencePiece model")


def check_in_process(rc: int, err: str, *messages: str) -> None:
    assert rc == 2, err
    line = [x for x in err.splitlines() if x.startswith("megaclip train: error:")]
    assert len(line) == 1 and all(m in line[0] for m in messages), err


def test_in_process_cases(cases, cli):
    saved, tmp = cases["dirs"]["saved"], cases["dirs"]["tmp"]
    (tmp / "a_file").write_text("x")
    expected = {
        ("model=demo", f"train.out_dir={saved}", "train.steps=4"): [
            "saved/checkpoints/step-2 holds a different architecture (model 'tiny')"
        ],
        (f"train.init_from={tmp / 'nothing'}",): ["train.init_from", "does not exist"],
        (f"train.out_dir={tmp / 'a_file'}/run",): ["train.out_dir", "which is a file"],
        (f"train.out_dir={tmp / 'a_file'}",): ["is a file, not a directory"],
    }
    for args, messages in expected.items():
        check_in_process(*cli(*args), *messages)
    assert tree_hashes(saved) == cases["before"]["saved"]
