"""Checkpoint pieces that need no DeepSpeed run: rules, protocol, file formats, errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from megaclip.checkpoint.atomic import read_latest
from megaclip.checkpoint.export import import_open_clip
from megaclip.checkpoint.layout import parse_tag, step_tag
from megaclip.checkpoint.meta import (
    CheckpointMeta,
    check_same_model,
    file_manifest,
    read_meta,
    verify_files,
)
from megaclip.checkpoint.openclip import open_clip_model, to_open_clip
from megaclip.checkpoint.openclip_io import load_open_clip_file, save_open_clip_file
from megaclip.checkpoint.universal import _zero3_piece, read_universal_meta
from megaclip.cli.main import main as cli
from megaclip.config.model import load_preset
from megaclip.config.schema import to_dict
from megaclip.errors import CheckpointError
from megaclip.model.clip import ClipModel
from tests.mp_util import REPO

CFG = load_preset("tiny-pp")


def test_step_tags():
    assert step_tag(7) == "step-7"
    assert step_tag(7, {"step-7", "step-7-1"}) == "step-7-2"
    assert parse_tag("step-12") == (12, 0) and parse_tag("step-12-3") == (12, 3)
    assert parse_tag("tmp-step-12") is None and parse_tag("latest") is None


def test_architecture_check():
    saved = to_dict(CFG)
    check_same_model(saved, CFG.with_overrides(name="renamed"), "ckpt")  # names do not matter
    other = load_preset("tiny")
    with pytest.raises(CheckpointError, match=r"different architecture.*embed_dim: 16 -> 32"):
        check_same_model(saved, other, "ckpt")


def test_zero3_piece_pads_the_last_rank():
    full = torch.arange(5.0)
    parts = [_zero3_piece(full, r, 3) for r in range(2)]
    assert parts[0].tolist() == [0, 1, 2] and parts[1].tolist() == [3, 4, 0]


def test_save_killed_at_any_stage_keeps_previous_checkpoint(tmp_path):
    """A rank-0 crash after each protocol stage: `latest` always names a loadable checkpoint."""
    stages = ["none", "files", "meta", "rename", "latest", "rotate"]
    env = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "tests/workers/ckpt_fault.py", str(tmp_path), ",".join(stages)],
        cwd=REPO,
        env={**__import__("os").environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "fault.json").read_text())
    published = {"none": 3, "files": 2, "meta": 2, "rename": 2, "latest": 3, "rotate": 3}
    for stage, step in published.items():
        r = results[stage]
        assert r["save_exit"] == (0 if stage == "none" else 86), (stage, r)
        assert r["load_exit"] == 0, (stage, r)
        client, weight, count = r["loaded"]
        assert client == {"next": step} and weight == step and count == step, (stage, r)
        root = tmp_path / stage
        assert read_latest(root) == f"step-{step}"
        verify_files(root / f"step-{step}", read_meta(root / f"step-{step}"))
    dirs = {s: sorted(p.name for p in (tmp_path / s).iterdir() if p.is_dir()) for s in stages}
    assert dirs["none"] == ["step-2", "step-3"]  # keep_last=2 rotated step-1 away
    assert dirs["meta"] == ["step-1", "step-2", "tmp-step-3"]  # unpublished, never loaded
    assert dirs["rename"] == ["step-1", "step-2", "step-3"]  # complete but not yet latest
    assert dirs["latest"] == ["step-1", "step-2", "step-3"]  # killed before rotation
    assert dirs["rotate"] == ["step-2", "step-3"]


def test_manifest_names_missing_and_truncated_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.pt").write_bytes(b"x" * 100)
    (tmp_path / "sub" / "b.pt").write_bytes(b"y" * 10)
    meta = CheckpointMeta(model=to_dict(CFG), parallel={}, step=1, files=file_manifest(tmp_path))
    assert meta.files == {"a.pt": 100, "sub/b.pt": 10}
    verify_files(tmp_path, meta)
    (tmp_path / "a.pt").write_bytes(b"x" * 60)
    with pytest.raises(CheckpointError, match=r"a\.pt has 60 bytes, expected 100"):
        verify_files(tmp_path, meta)
    (tmp_path / "a.pt").write_bytes(b"x" * 100)
    (tmp_path / "sub" / "b.pt").unlink()
    with pytest.raises(CheckpointError, match=r"sub/b\.pt is missing"):
        verify_files(tmp_path, meta)


def _open_clip_state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return open_clip_model(CFG).state_dict()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_open_clip_file_roundtrip(tmp_path, suffix):
    state = _open_clip_state()
    path = save_open_clip_file(tmp_path / f"m{suffix}", CFG, state)
    config, loaded = load_open_clip_file(path)
    assert config == to_dict(CFG)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_bare_and_training_open_clip_files(tmp_path):
    state = _open_clip_state()
    torch.save(state, tmp_path / "bare.pt")
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}},
               tmp_path / "train.pt")  # fmt: skip
    for name in ("bare.pt", "train.pt"):
        config, loaded = load_open_clip_file(tmp_path / name)
        assert config is None and loaded.keys() == state.keys()
    out = import_open_clip(tmp_path / "train.pt", tmp_path / "init", model="tiny-pp", tp=2, pp=2)
    record = read_universal_meta(out)
    assert record["step"] == 0 and not record["has_optimizer"]
    loaded = torch.load(out / "params" / "visual.blocks.1.attn.qkv.weight.pt")["fp32"]
    assert torch.equal(loaded, state["visual.transformer.resblocks.1.attn.in_proj_weight"])


def test_import_errors(tmp_path, capsys):
    state = _open_clip_state()
    torch.save(state, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="pass --model"):
        import_open_clip(tmp_path / "bare.pt", tmp_path / "o1")
    with pytest.raises(CheckpointError, match=r"another architecture"):
        import_open_clip(tmp_path / "bare.pt", tmp_path / "o2", model="tiny")
    rc = cli(["convert", str(tmp_path / "bare.pt"), "--to", "megaclip", "--out",
              str(tmp_path / "o3"), "--model", "tiny-pp", "--tp", "3"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "cannot take layout tp=3 pp=1" in err and "vision.heads=4" in err
    rc = cli(["convert", str(tmp_path / "missing.pt"), "--to", "megaclip", "--out", "x"])
    assert rc == 2 and "does not exist" in capsys.readouterr().err


def test_to_open_clip_of_megaclip_state_loads_strictly():
    model = ClipModel(CFG)
    oc = open_clip_model(CFG)
    oc.load_state_dict(to_open_clip(model.state_dict()), strict=True)
