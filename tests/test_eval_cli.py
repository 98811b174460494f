"""`megaclip eval zeroshot|retrieval` on the digits demo data with a tiny exported model."""

from __future__ import annotations

import json
import os

import pytest
import torch

from megaclip.cli.main import main
from megaclip.config.model import resolve_model
from megaclip.data.demo import DemoConfig, make_demo
from megaclip.eval.data import caption_loader, labeled_loader
from megaclip.eval.model import load_eval_model, save_eval_checkpoint
from megaclip.eval.retrieval import retrieval_eval
from megaclip.eval.zeroshot import build_classifier, read_classnames, read_templates, zeroshot_eval
from megaclip.model.clip import ClipModel
from megaclip.model.init import init_parameters
from megaclip.tokenizer import build_tokenizer
from tests.mp_util import megaclip_cli, subprocess_env


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """(demo dir, wrapped checkpoint path, val sample count): tiny model with the BPE vocabulary."""
    root = tmp_path_factory.mktemp("eval_cli")
    manifest = make_demo(str(root / "demo"), DemoConfig(image_size=32, shards=1, val_fraction=0.05))
    cfg = resolve_model({"preset": "tiny", "text": {"vocab_size": 49408}})
    model = ClipModel(cfg)
    init_parameters(model, cfg, seed=0)
    ckpt = str(root / "tiny.pt")
    save_eval_checkpoint(ckpt, cfg, model.state_dict())
    return str(root / "demo"), ckpt, manifest["splits"]["val"]["count"]


def test_zeroshot_cli_json_matches_library(demo):
    data, ckpt, n_val = demo
    args = [
        "eval",
        "zeroshot",
        "--checkpoint",
        ckpt,
        "--data",
        os.path.join(data, "val-000000.tar"),
        "--classnames",
        os.path.join(data, "classnames.txt"),
        "--templates",
        os.path.join(data, "templates.txt"),
        "--batch-size",
        "128",
        "--device",
        "cpu",
        "--json",
    ]
    proc = megaclip_cli(*args, env=subprocess_env())
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["task"] == "zeroshot" and out["source"] == "webdataset"
    assert (out["n"], out["classes"], out["templates"], out["skipped"]) == (n_val, 10, 5, 0)

    # the same numbers through the library, computed here
    model = load_eval_model(ckpt, "cpu")
    classes = read_classnames(os.path.join(data, "classnames.txt"))
    tok = build_tokenizer("clip_bpe", context_length=model.cfg.text.context_length)
    w = build_classifier(
        model, tok, classes, read_templates(os.path.join(data, "templates.txt")), "cpu"
    )
    loader = labeled_loader(os.path.join(data, "val-000000.tar"), classes, 32, 64)
    want = zeroshot_eval(model, w, loader, "cpu")
    assert out["top1"] == pytest.approx(want["top1"], abs=1e-9)
    assert out["top5"] == pytest.approx(want["top5"], abs=1e-9)
    assert 0 <= out["top1"] <= out["top5"] <= 1


def test_retrieval_cli_json(demo, capsys):
    data, ckpt, n_val = demo
    spec = os.path.join(data, "val-000000.tar")
    rc = main(
        ["eval", "retrieval", "--checkpoint", ckpt, "--data", spec, "--device", "cpu", "--json"]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["n_images"], out["n_texts"], out["skipped"]) == (n_val, n_val, 0)
    model = load_eval_model(ckpt, "cpu")
    tok = build_tokenizer("clip_bpe", context_length=model.cfg.text.context_length)
    want = retrieval_eval(model, tok, caption_loader(spec, 32, 100), "cpu")
    for direction in ("image_to_text", "text_to_image"):
        values = [out[f"{direction}_R@{k}"] for k in (1, 5, 10)]
        assert values == pytest.approx([want[f"{direction}_R@{k}"] for k in (1, 5, 10)], abs=1e-9)
        assert values == sorted(values)


def test_eval_cli_errors_are_one_line(demo, tmp_path, capsys):
    data, ckpt, _ = demo
    bad = tmp_path / "templates.txt"
    bad.write_text("a photo of a digit\n")
    common = ["--checkpoint", ckpt, "--device", "cpu", "--classnames"]
    rc = main(
        [
            "eval",
            "zeroshot",
            *common,
            os.path.join(data, "classnames.txt"),
            "--templates",
            str(bad),
            "--data",
            data,
        ]  # fmt: skip
    )
    err = capsys.readouterr().err
    assert rc == 2 and "line 1: 'a photo of a digit' has no '{}'" in err
    # the demo directory as an image folder: its subfolders are not the class names
    rc = main(
        [
            "eval",
            "zeroshot",
            *common,
            os.path.join(data, "classnames.txt"),
            "--templates",
            os.path.join(data, "templates.txt"),
            "--data",
            data,
        ]  # fmt: skip
    )
    err = capsys.readouterr().err
    assert rc == 2 and "no folder for class 'zero'" in err
    bare = tmp_path / "bare.pt"
    torch.save(torch.load(ckpt, weights_only=True)["state_dict"], bare)
    rc = main(["eval", "retrieval", "--checkpoint", str(bare), "--data", data, "--model", "tiny"])
    err = capsys.readouterr().err
    assert rc == 2 and "shape mismatch at 'token_embedding.weight'" in err
    assert err.count("\n") == 1
