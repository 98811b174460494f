"""CLIP_benchmark itself (its open_clip path, offline) and megaclip eval agree on exports."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from megaclip.checkpoint.universal import write_universal
from megaclip.cli.main import main as cli
from megaclip.config.model import model_from_dict
from megaclip.data.webdataset import ShardWriter
from megaclip.errors import DataError
from megaclip.eval.benchmark import benchmark_template, read_benchmark_dir
from megaclip.eval.data import LabeledShards
from megaclip.eval.model import load_eval_model
from megaclip.eval.zeroshot import build_classifier, fill_template
from megaclip.model.clip import ClipModel
from megaclip.model.init import init_parameters
from megaclip.tokenizer import build_tokenizer
from tests.mp_util import REPO

pytest.importorskip("clip_benchmark")
pytest.importorskip("transformers")

CLASSES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a photo of the number {}.", "a drawing of a {} (in {braces})", "{}"]
RECALL_K = (1, 5)
# CLIP_benchmark's top-1 is a float32 mean; megaclip's a Python fraction: they agree to float32.
ACC_TOL = 1e-6


def _image_bytes(rng: np.random.Generator, ext: str) -> bytes:
    pixels = rng.integers(0, 255, (int(rng.integers(32, 48)), int(rng.integers(32, 48)), 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buf, format="WEBP" if ext == "webp" else "JPEG")
    return buf.getvalue()


def _labelled_shards(directory, n: int = 60) -> str:
    """megaclip-style labelled shards (KEY.json {"label"}), .webp and .jpg images."""
    rng = np.random.default_rng(0)
    with ShardWriter(os.path.join(directory, "val-%02d.tar"), 25) as writer:
        for i in range(n):
            ext = "webp" if i % 2 else "jpg"
            label = json.dumps({"label": int(rng.integers(0, len(CLASSES)))}).encode()
            writer.write_raw(f"s{i:04d}", {ext: _image_bytes(rng, ext), "json": label})
    return os.path.join(directory, "val-{00..02}.tar")


def _retrieval_dir(root, n: int = 24) -> None:
    """A CLIP_benchmark retrieval split: dataset_type.txt, two captions (lines) per image."""
    rng = np.random.default_rng(1)
    os.makedirs(root / "test")
    with ShardWriter(str(root / "test" / "%d.tar"), 10) as writer:
        for i in range(n):
            caps = f"a picture of {CLASSES[i % 10]} number {i}\nthe {i}th {CLASSES[(i * 3) % 10]}"
            writer.write_raw(f"r{i:04d}", {"jpg": _image_bytes(rng, "jpg"), "txt": caps.encode()})
    (root / "test" / "nshards.txt").write_text(f"{len(writer.shards)}\n")
    (root / "dataset_type.txt").write_text("retrieval\n")


def _run_clip_benchmark(runs: list[list[str]]) -> None:
    """clip_benchmark's own CLI (`clip_benchmark eval ...`) in a fresh, offline process."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tests" / "workers" / "clip_benchmark_run.py"),
            json.dumps(runs),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]


def _megaclip_json(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert cli([*argv, "--device", "cpu", "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_clip_benchmark_and_megaclip_agree(tmp_path, capsys):
    cfg = model_from_dict(
        {"preset": "tiny", "name": "bench", "text": {"vocab_size": 49408, "context_length": 20}}
    )
    model = ClipModel(cfg)
    init_parameters(model, cfg, seed=2)  # a random model whose predictions spread (see below)
    uni = write_universal(tmp_path / "uni", cfg, dict(model.named_parameters()))
    exports = {"open_clip_dir": tmp_path / "oc", "hf": tmp_path / "hf", "file": tmp_path / "m.pt"}
    for target, out in (("open_clip", "open_clip_dir"), ("hf", "hf"), ("open_clip", "file")):
        assert cli(["convert", str(uni), "--to", target, "--out", str(exports[out])]) == 0

    spec = _labelled_shards(str(tmp_path))
    (tmp_path / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (tmp_path / "templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    bench = tmp_path / "bench"
    assert cli(["eval", "to-clip-benchmark", "--data", spec, "--out", str(bench),
                "--classnames", str(tmp_path / "classnames.txt"),
                "--templates", str(tmp_path / "templates.txt")]) == 0  # fmt: skip
    layout = read_benchmark_dir(str(bench))
    assert layout.kind == "classification" and len(layout.shards) == 1
    assert layout.templates == [benchmark_template(t) for t in TEMPLATES]
    assert layout.templates[1] == "a drawing of a {c} (in {{braces}})"
    assert fill_template(layout.templates[1], "one") == fill_template(TEMPLATES[1], "one")
    retrieval = tmp_path / "retrieval"
    _retrieval_dir(retrieval)

    oc_dir = exports["open_clip_dir"]
    common = ["eval", "--model_type", "open_clip", "--model", f"local-dir:{oc_dir}",
              "--pretrained", "none", "--no_amp", "--num_workers", "0", "--batch_size", "16",
              "--quiet"]  # fmt: skip
    cls_out, ret_out = tmp_path / "cb-cls.json", tmp_path / "cb-ret.json"
    _run_clip_benchmark(
        [
            [*common, "--dataset", "wds/digits", "--dataset_root", str(bench),
             "--task", "zeroshot_classification", "--output", str(cls_out)],
            [*common, "--dataset", "wds/pairs", "--dataset_root", str(retrieval),
             "--task", "zeroshot_retrieval", "--recall_k", *map(str, RECALL_K),
             "--output", str(ret_out)],
        ]
    )  # fmt: skip
    theirs = json.loads(cls_out.read_text())["metrics"]
    for name in ("open_clip_dir", "hf", "file"):
        ours = _megaclip_json(
            capsys,
            ["eval", "zeroshot", "--checkpoint", str(exports[name]), "--data", str(bench)],
        )
        assert ours["n"] == 60 and ours["source"] == "clip_benchmark"
        assert abs(ours["top1"] - theirs["acc1"]) <= ACC_TOL, (name, ours, theirs)
        assert abs(ours["top5"] - theirs["acc5"]) <= ACC_TOL, (name, ours, theirs)
    ours = _megaclip_json(capsys, ["eval", "zeroshot", "--checkpoint", str(uni), "--data", spec,
                                   "--classnames", str(tmp_path / "classnames.txt"),
                                   "--templates", str(tmp_path / "templates.txt")])  # fmt: skip
    assert abs(ours["top1"] - theirs["acc1"]) <= ACC_TOL  # the source shards, the megaclip ckpt

    # The agreement means something: the random model predicts many classes, not one.
    net = load_eval_model(str(exports["hf"]), "cpu")
    tok = build_tokenizer("clip_bpe", None, cfg.text.context_length)
    weights = build_classifier(net, tok, CLASSES, TEMPLATES, "cpu")
    images = torch.cat([x for x, _ in LabeledShards(layout.shards, 10, 32, 64, label_ext="cls")])
    with torch.no_grad():
        predicted = (net.encode_image(images) @ weights).argmax(dim=1)
    assert len(predicted.unique()) >= 3  # measured: classes 3, 4, 7, 8 and 9 (init seed 2)
    assert 0 < theirs["acc1"] < 0.5

    theirs = json.loads(ret_out.read_text())["metrics"]
    ours = _megaclip_json(
        capsys, ["eval", "retrieval", "--checkpoint", str(exports["hf"]), "--data",
                 str(retrieval), "--ks", ",".join(map(str, RECALL_K))]
    )  # fmt: skip
    assert ours["n_images"] == 24 and ours["n_texts"] == 48
    for k in RECALL_K:
        assert abs(ours[f"text_to_image_R@{k}"] - theirs[f"image_retrieval_recall@{k}"]) < 1e-6
        assert abs(ours[f"image_to_text_R@{k}"] - theirs[f"text_retrieval_recall@{k}"]) < 1e-6


def test_benchmark_layout_errors(tmp_path, capsys):
    os.makedirs(tmp_path / "train")
    (tmp_path / "train" / "nshards.txt").write_text("2\n")
    with pytest.raises(DataError, match=r"has no split 'test' \(no test/nshards.txt\); its splits"):
        read_benchmark_dir(str(tmp_path))
    with pytest.raises(DataError, match="nshards.txt says 2 shards"):
        read_benchmark_dir(str(tmp_path), "train")
    assert cli(["eval", "zeroshot", "--checkpoint", "x.pt", "--data", "y.tar"]) == 2
    assert "--classnames is required unless --data is a CLIP_benchmark" in capsys.readouterr().err
