"""Text pooling as a model-config field: open_clip's semantics, start-up checks, SentencePiece."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

from megaclip.checkpoint.openclip import open_clip_config, open_clip_model, to_open_clip
from megaclip.config.model import TextConfig, load_preset, model_from_dict
from megaclip.errors import ConfigError
from megaclip.model.clip import ClipModel
from megaclip.model.init import init_parameters
from megaclip.model.text import pool_index
from megaclip.pipeline.partition import StagePlan
from megaclip.pipeline.stages import PipeStage, split_outputs
from megaclip.tokenizer import build_tokenizer
from megaclip.tokenizer.pooling import check_tokenizer
from tests.mp_util import REPO

TOL = 1e-5  # fp32 features, same weights
EOS = 5


def _tokens() -> torch.Tensor:
    """Rows with the EOS (5) at varied places, once twice, once missing, larger ids elsewhere."""
    return torch.tensor(
        [
            [1, 40, 41, EOS, 0, 0, 0, 0],
            [1, 63, EOS, 9, EOS, 0, 0, 0],  # two EOS: the first counts
            [1, 2, 3, 4, 6, 7, 8, EOS],
            [1, 60, 61, 62, 0, 0, 0, 0],  # no EOS: position 0, as open_clip
        ]
    )


@pytest.mark.parametrize("pool_type", ["argmax", "eos", "first", "last"])
def test_pool_index_is_open_clips_text_global_pool(pool_type):
    from open_clip.transformer import text_global_pool

    tokens = _tokens()
    x = torch.randn(*tokens.shape, 3)
    eos = EOS if pool_type == "eos" else None
    want = text_global_pool(x, tokens, pool_type, eos_token_id=eos)
    got = x[torch.arange(len(x)), pool_index(tokens, pool_type, eos)]
    assert torch.equal(got, want)
    expected = {
        "argmax": [2, 1, 6, 3],
        "eos": [3, 2, 7, 0],
        "first": [0, 0, 0, 0],
        "last": [7, 7, 7, 7],
    }[pool_type]
    assert pool_index(tokens, pool_type, eos).tolist() == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ({"pool_type": "eos"}, "text.pool_type eos needs text.eos_id"),
        ({"pool_type": "argmax", "eos_id": 2}, "text.eos_id 2 is only used with text.pool_type"),
        ({"pool_type": "eos", "eos_id": 64}, "text.eos_id 64 is outside the vocabulary [0, 64)"),
        ({"pool_type": "mean"}, "pool_type"),
    ],
)
def test_pool_config_errors(text, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        model_from_dict({"preset": "tiny", "text": text})
    assert TextConfig().pool_type == "argmax" and TextConfig().eos_id is None


def _eos_model(pool: dict) -> tuple:
    cfg = model_from_dict({"preset": "tiny", "text": {"context_length": 8, **pool}})
    model = ClipModel(cfg)
    init_parameters(model, cfg, seed=3)
    return cfg, model.eval()


def test_eos_pooling_equals_open_clip_and_the_pipeline_stage():
    cfg, model = _eos_model({"pool_type": "eos", "eos_id": EOS})
    assert (
        open_clip_config(cfg)["text_cfg"] | {"pool_type": "eos", "eos_id": EOS}
        == (open_clip_config(cfg)["text_cfg"])
    )
    oc = open_clip_model(cfg).eval()
    oc.load_state_dict(to_open_clip(model.state_dict()), strict=True)
    tokens = _tokens()
    images = torch.randn(len(tokens), 3, 32, 32)
    plan = StagePlan(0, 1, (0, cfg.vision.layers), (0, cfg.text.layers), 0)
    stage = PipeStage(cfg, plan).eval()
    stage.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        ours = model.encode_text(tokens, normalize=False)
        theirs = oc.encode_text(tokens)
        torch.testing.assert_close(ours, theirs, atol=TOL, rtol=0)
        _, staged, _ = split_outputs(stage((images, tokens)), cfg.embed_dim)
        torch.testing.assert_close(staged, model.encode_text(tokens), atol=TOL, rtol=0)
        _, argmax_model = _eos_model({"pool_type": "argmax"})
        argmax_model.load_state_dict(model.state_dict())
        other = argmax_model.encode_text(tokens, normalize=False)
    assert (other - ours).abs().amax(dim=1)[2] > 1e-3  # row 2: argmax (8) != first EOS (7)


def _spm(directory, name="spm", **kw) -> str:
    """A tiny SentencePiece model (unk 0, bos 1, eos 2: its defaults) trained on digit captions."""
    import sentencepiece

    from megaclip.data.demo import CAPTION_TEMPLATES, CLASSNAMES, ZERO_SHOT_TEMPLATES, caption_for

    rng = random.Random(0)
    lines = [
        caption_for(rng.randrange(10), rng.randrange(len(CAPTION_TEMPLATES))) for _ in range(400)
    ]
    lines += [t.replace("{}", c) for t in ZERO_SHOT_TEMPLATES for c in CLASSNAMES]
    prefix = os.path.join(str(directory), name)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=prefix,
        vocab_size=kw.get("vocab_size", 64),
        model_type="unigram",
        num_threads=1,
        minloglevel=2,
    )
    return prefix + ".model"


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    pytest.importorskip("sentencepiece")
    return _spm(tmp_path_factory.mktemp("spm"))


def test_tokenizer_checks(spm_path):
    sp = build_tokenizer("sentencepiece", spm_path, 16)
    clip = build_tokenizer("clip_bpe", None, 16)
    assert sp.eot_token_id == 2 and clip.eot_token_id == clip.vocab_size - 1
    tiny = load_preset("tiny").text
    big = TextConfig(context_length=16, vocab_size=49408, width=32, layers=1, heads=4, mlp_dim=64)
    check_tokenizer(big, clip, "clip_bpe")  # argmax: the default fits CLIP BPE
    check_tokenizer(TextConfig(**{**vars(big), "pool_type": "eos", "eos_id": 49407}), clip, "c")
    sp_model = TextConfig(**{**vars(tiny), "context_length": 16})
    with pytest.raises(ConfigError) as err:
        check_tokenizer(sp_model, sp, "sentencepiece")
    assert str(err.value) == (
        "text pooling contradicts the sentencepiece tokenizer: text.pool_type argmax pools at the "
        "largest token id, but the tokenizer's end-of-text id is 2 (its ids go up to 63); set "
        "text.pool_type: eos and text.eos_id: 2 in the model config"
    )
    check_tokenizer(TextConfig(**{**vars(sp_model), "pool_type": "eos", "eos_id": 2}), sp, "s")
    for pool, message in [
        ({"pool_type": "eos", "eos_id": 1}, "text.eos_id is 1 but the tokenizer's end-of-text id"),
        ({"pool_type": "first"}, "pools position 0, which holds the start token"),
        ({"pool_type": "last"}, "pools position 15, which the tokenizer fills with padding"),
    ]:
        with pytest.raises(ConfigError, match=message):
            check_tokenizer(TextConfig(**{**vars(sp_model), **pool}), sp, "sentencepiece")
    with pytest.raises(ConfigError, match="clip_bpe tokenizer has 49408 token ids but the model's"):
        check_tokenizer(tiny, clip, "clip_bpe")


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, capture_output=True, text=True, env=full, timeout=300
    )


def _model_file(directory, pool: dict, vocab: int = 64) -> str:
    path = os.path.join(str(directory), f"model-{pool['pool_type']}.json")
    text = {"vocab_size": vocab, "context_length": 16, **pool}
    with open(path, "w") as f:
        json.dump({"preset": "tiny", "text": text}, f)
    return path


@pytest.mark.slow
def test_sentencepiece_training_and_eval_pool_at_the_eos(tmp_path, spm_path):
    """A real `megaclip train` + `megaclip eval` with SentencePiece: every pooled token is EOS."""
    from megaclip.data.demo import DemoConfig, make_demo

    data = tmp_path / "data"
    make_demo(str(data), DemoConfig(image_size=32, shards=1))
    common = [
        "data.kind=webdataset",
        f"data.train={data}/train-000000.tar",
        "data.tokenizer=sentencepiece",
        f"data.tokenizer_path={spm_path}",
        f"zeroshot.data={data}/val-000000.tar",
        f"zeroshot.classnames={data}/classnames.txt",
        f"zeroshot.templates={data}/templates.txt",
        "parallel.dp=1",
        "parallel.micro_batch_size=16",
        "deepspeed=null",
        "train.steps=3",
    ]
    spy = [os.path.join(REPO, "tests", "workers", "pool_spy.py")]
    bad = _model_file(tmp_path, {"pool_type": "argmax"})
    out = _cli(*spy, "train", f"model={bad}", *common, f"train.out_dir={tmp_path / 'bad'}")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "text pooling contradicts the sentencepiece tokenizer" in out.stderr
    assert "set text.pool_type: eos and text.eos_id: 2" in out.stderr

    good = _model_file(tmp_path, {"pool_type": "eos", "eos_id": 2})
    record = tmp_path / "pooled.jsonl"
    run = tmp_path / "run"
    out = _cli(
        *spy,
        "train",
        f"model={good}",
        *common,
        f"train.out_dir={run}",
        env={"POOL_SPY_OUT": str(record)},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    trained = [json.loads(line) for line in record.read_text().splitlines()]
    out = _cli(
        *spy,
        "eval",
        "zeroshot",
        "--checkpoint",
        str(run / "final_open_clip.pt"),
        "--data",
        f"{data}/val-000000.tar",
        "--classnames",
        f"{data}/classnames.txt",
        "--templates",
        f"{data}/templates.txt",
        "--tokenizer",
        "sentencepiece",
        "--tokenizer-path",
        spm_path,
        "--json",
        env={"POOL_SPY_OUT": str(tmp_path / "eval.jsonl")},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert 0 <= json.loads(out.stdout.splitlines()[-1])["top1"] <= 1
    evaluated = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    for calls, min_calls in ((trained, 3), (evaluated, 1)):
        assert len(calls) >= min_calls
        assert {tok for c in calls for tok in c["pooled_tokens"]} == {2}  # the EOS, every row
        assert len({p for c in calls for p in c["positions"]}) > 3  # varied lengths


def test_open_clip_exports_carry_the_pooling(tmp_path):
    """--to open_clip (directory and .pt) rebuilds open_clip's CLIP with eos pooling; re-import."""
    import open_clip
    from open_clip.model import CLIP

    from megaclip.checkpoint.openclip import OPEN_CLIP_DIR_CONFIG, read_open_clip_dir
    from megaclip.checkpoint.universal import write_universal
    from megaclip.cli.main import main as cli
    from megaclip.errors import CheckpointError

    cfg, model = _eos_model({"pool_type": "eos", "eos_id": EOS})
    uni = write_universal(tmp_path / "uni", cfg, dict(model.named_parameters()))
    oc_dir, pt = tmp_path / "oc", tmp_path / "m.pt"
    assert cli(["convert", str(uni), "--to", "open_clip", "--out", str(oc_dir)]) == 0
    assert cli(["convert", str(uni), "--to", "open_clip", "--out", str(pt)]) == 0
    oc = open_clip.create_model(f"local-dir:{oc_dir}").eval()
    assert (oc.text_pool_type, oc.text_eos_id) == ("eos", EOS)
    saved = torch.load(pt, weights_only=True)
    from_pt = CLIP(**saved["open_clip_config"]).eval()
    from_pt.load_state_dict(saved["state_dict"], strict=True)
    tokens = _tokens()
    with torch.no_grad():
        want = model.encode_text(tokens, normalize=False)
        for other in (oc, from_pt):
            torch.testing.assert_close(other.encode_text(tokens), want, atol=TOL, rtol=0)
    # A third-party open_clip directory carries only open_clip's own model_cfg.
    config_path = oc_dir / OPEN_CLIP_DIR_CONFIG
    config = json.loads(config_path.read_text())
    del config["megaclip_model_config"]
    config_path.write_text(json.dumps(config))
    assert read_open_clip_dir(oc_dir)[0] == cfg.with_overrides(name="oc")
    back = tmp_path / "back"
    assert cli(["convert", str(oc_dir), "--to", "megaclip", "--out", str(back)]) == 0
    from megaclip.checkpoint.universal import read_universal_meta

    assert model_from_dict(read_universal_meta(back)["model"]) == cfg.with_overrides(name="oc")
    config["model_cfg"]["text_cfg"]["hf_model_name"] = "roberta-base"
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="text_cfg.hf_model_name='roberta-base' is a variant"):
        read_open_clip_dir(oc_dir)
