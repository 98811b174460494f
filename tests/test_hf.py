"""Hugging Face transformers CLIPModel directories: export equals open_clip, import, errors."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from megaclip.checkpoint.hf import (
    SafetensorsWriter,
    from_hf,
    from_hf_key,
    hf_config,
    hf_eos_token_id,
    hf_layout,
    hf_shapes,
    open_clip_shapes,
    to_hf,
    write_hf_dir,
)
from megaclip.checkpoint.openclip import open_clip_model, to_open_clip
from megaclip.checkpoint.universal import PARAM_DIR, read_universal_meta, write_universal
from megaclip.cli.main import main as cli
from megaclip.config.model import load_preset, model_from_dict
from megaclip.data.transforms import ClipEvalTransform
from megaclip.errors import CheckpointError
from megaclip.model.clip import ClipModel
from megaclip.model.init import init_parameters
from megaclip.tokenizer import build_tokenizer

transformers = pytest.importorskip("transformers")

TOL = 1e-5  # fp32 features of the same weights (measured: <= 3e-6, ViT-B-32)
TEXTS = [
    "a photo of a cat.",
    "Hello, World! It's 2 o'clock; a!b!!c",
    "café, naïve, 日本語 and 🙂",
    "",
    "the number seven written by hand " * 8,  # longer than the context: truncated, EOT kept
]


def _cfg(activation: str = "gelu", **text):
    return model_from_dict(
        {
            "preset": "tiny",
            "name": f"tiny-{activation}",
            "activation": activation,
            "text": {"vocab_size": 49408, "context_length": 24, **text},
        }
    )


def _universal(tmp_path, cfg, seed: int = 0):
    model = ClipModel(cfg)
    init_parameters(model, cfg, seed=seed)
    params = {k: v.detach() for k, v in model.named_parameters()}
    return write_universal(tmp_path / f"uni-{cfg.name}", cfg, params), model.eval()


def _features(out) -> torch.Tensor:
    return getattr(out, "pooler_output", out)  # transformers 5: an output object


def _compare(hf_model, oc_model, images, tokens) -> None:
    with torch.no_grad():
        hf_img = _features(hf_model.get_image_features(pixel_values=images))
        hf_txt = _features(hf_model.get_text_features(input_ids=tokens))
        torch.testing.assert_close(hf_img, oc_model.encode_image(images), atol=TOL, rtol=0)
        torch.testing.assert_close(hf_txt, oc_model.encode_text(tokens), atol=TOL, rtol=0)


def _read_universal(path):
    record = read_universal_meta(path)
    return {n: torch.load(path / PARAM_DIR / f"{n}.pt")["fp32"] for n in record["params"]}


@pytest.mark.parametrize("activation", ["gelu", "quick_gelu"])
def test_hf_export_equals_open_clip_and_imports_back(tmp_path, capsys, activation):
    cfg = _cfg(activation)
    uni, model = _universal(tmp_path, cfg)
    out = tmp_path / "hf"
    assert cli(["convert", str(uni), "--to", "hf", "--out", str(out), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "token ids equal" in printed and "vocab.json" in printed
    hf_model = transformers.CLIPModel.from_pretrained(str(out)).eval()
    assert hf_model.config.text_config.hidden_act == activation
    assert hf_model.config.text_config.eos_token_id == 2  # transformers' argmax pooling
    oc = open_clip_model(cfg).eval()
    oc.load_state_dict(to_open_clip(dict(model.named_parameters())), strict=True)
    tok = build_tokenizer("clip_bpe", None, cfg.text.context_length)
    tokens = tok(TEXTS)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    _compare(hf_model, oc, images, tokens)
    for cls in (transformers.CLIPTokenizer, transformers.CLIPTokenizerFast):
        hf_tok = cls.from_pretrained(str(out))
        ids = hf_tok(TEXTS, padding="max_length", truncation=True, return_tensors="pt")
        assert torch.equal(ids["input_ids"], tokens), cls
    processor = transformers.CLIPProcessor.from_pretrained(str(out))
    assert processor.image_processor.crop_size["height"] == 32
    # back to megaclip: the very same tensors, the same config
    back = tmp_path / "back"
    assert cli(["convert", str(out), "--to", "megaclip", "--out", str(back)]) == 0
    params = _read_universal(back)
    assert params.keys() == dict(model.named_parameters()).keys()
    assert all(torch.equal(params[k], v) for k, v in model.named_parameters())
    assert model_from_dict(read_universal_meta(back)["model"]) == cfg


def test_pil_image_processor_equals_megaclips_eval_transform(tmp_path):
    from megaclip.checkpoint.hf import hf_preprocessor_config

    pil_cls = getattr(transformers, "CLIPImageProcessorPil", None)
    if pil_cls is None:
        pytest.skip("transformers without CLIPImageProcessorPil")
    (tmp_path / "preprocessor_config.json").write_text(
        json.dumps(hf_preprocessor_config(load_preset("demo")))
    )
    processor = pil_cls.from_pretrained(str(tmp_path))
    rng = np.random.default_rng(0)
    for w, h in ((45, 32), (32, 70), (32, 32)):
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        got = processor(images=[image], return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(got, ClipEvalTransform(32)(image), atol=1e-6, rtol=0)


def test_vit_b32_sized_export_equals_open_clip(tmp_path):
    """One quick comparison at ViT-B-32 size, streamed from an open_clip state dict."""
    cfg = load_preset("ViT-B-32")
    torch.manual_seed(0)
    oc = open_clip_model(cfg).eval()
    write_hf_dir(tmp_path, cfg, oc.state_dict().items())  # open_clip keys, one at a time
    hf_model = transformers.CLIPModel.from_pretrained(str(tmp_path)).eval()
    tokens = build_tokenizer("clip_bpe", None, 77)(TEXTS[:2])
    _compare(hf_model, oc, torch.randn(1, 3, 224, 224), tokens)


@pytest.mark.parametrize("eos", [2, 49407], ids=["argmax", "eos"])
def test_import_of_a_transformers_saved_sharded_model(tmp_path, eos):
    """transformers' own CLIPModel (its init, sharded files) -> megaclip: the same features."""
    config = transformers.CLIPConfig(
        text_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "max_position_embeddings": 16,
            "eos_token_id": eos,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=24,
    )
    torch.manual_seed(0)
    hf_model = transformers.CLIPModel(config).eval()
    hf_model.save_pretrained(str(tmp_path / "hf"), max_shard_size="1MB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    back = tmp_path / "back"
    assert cli(["convert", str(tmp_path / "hf"), "--to", "megaclip", "--out", str(back)]) == 0
    cfg = model_from_dict(read_universal_meta(back)["model"])
    assert cfg.activation == "quick_gelu" and cfg.embed_dim == 24
    assert (cfg.text.pool_type, cfg.text.eos_id) == (("argmax", None) if eos == 2 else ("eos", eos))
    model = ClipModel(cfg).eval()
    model.load_state_dict(_read_universal(back), strict=True)
    tokens = build_tokenizer("clip_bpe", None, 16)(TEXTS)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(images, normalize=False),
            _features(hf_model.get_image_features(pixel_values=images)),
            atol=TOL,
            rtol=0,
        )
        torch.testing.assert_close(
            model.encode_text(tokens, normalize=False),
            _features(hf_model.get_text_features(input_ids=tokens)),
            atol=TOL,
            rtol=0,
        )


def test_key_mapping_is_transformers_layout_and_inverts():
    cfg = _cfg("quick_gelu")
    layout = hf_layout(cfg)
    hf_model = transformers.CLIPModel(transformers.CLIPConfig(**hf_config(cfg)))
    want = {k: tuple(v.shape) for k, v in hf_model.state_dict().items()}
    assert dict(layout) == want
    state = {k: torch.randn(s) for k, s in open_clip_shapes(cfg).items()}
    hf_state = [e for k, v in state.items() for e in to_hf(k, v)]
    assert [(k, tuple(v.shape)) for k, v in hf_state] == layout
    back = dict(from_hf(reversed(hf_state)))  # any order: q/k/v wait for each other
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())
    for key, shape in open_clip_shapes(cfg).items():
        for i, (hf_key, _) in enumerate(hf_shapes(key, shape)):
            assert from_hf_key(hf_key) == (key, i if "in_proj" in key else None)
    with pytest.raises(CheckpointError, match="HF key 'text_model.pooler.weight' has no"):
        from_hf_key("text_model.pooler.weight")
    with pytest.raises(CheckpointError, match="lack k_proj"):
        list(from_hf([("text_model.encoder.layers.0.self_attn.q_proj.bias", torch.zeros(2))]))


def test_safetensors_writer(tmp_path):
    from safetensors.torch import load_file

    layout = [("a", (2, 3)), ("b", ()), ("c", (4,))]
    tensors = {"a": torch.randn(2, 3), "b": torch.tensor(1.5), "c": torch.arange(4.0)}
    with SafetensorsWriter(tmp_path / "x.safetensors", layout, torch.bfloat16) as w:
        for name in ("c", "a", "b"):  # any order
            w.write(name, tensors[name])
    got = load_file(str(tmp_path / "x.safetensors"))
    assert all(torch.equal(got[k], v.bfloat16()) for k, v in tensors.items())
    writer = SafetensorsWriter(tmp_path / "y.safetensors", layout)
    writer.write("a", tensors["a"])
    writer.write("c", tensors["c"])
    with pytest.raises(CheckpointError, match="no tensor was given for 'b'"):
        writer.close()
    assert not list(tmp_path.glob("*y.safetensors*"))  # nothing half-written is left
    shape = r"'a' has shape \(3, 2\), the model needs \(2, 3\)"
    with (
        pytest.raises(CheckpointError, match=shape),
        SafetensorsWriter(tmp_path / "z.safetensors", layout) as w,
    ):
        w.write("a", tensors["a"].t())
    assert not list(tmp_path.glob("*z.safetensors*"))


def test_pooling_that_transformers_cannot_express():
    assert hf_eos_token_id(_cfg(pool_type="eos", eos_id=49407).text) == 49407
    with pytest.raises(CheckpointError, match="eos_id is 2, which transformers' CLIPModel reads"):
        hf_eos_token_id(_cfg(pool_type="eos", eos_id=2).text)
    for pool in ("first", "last"):
        with pytest.raises(CheckpointError, match=f"pool_type {pool}: transformers' CLIPModel"):
            hf_eos_token_id(_cfg(pool_type=pool).text)


def _one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()  # drop what came before (transformers' progress bars)
    assert cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_bad_input_errors(tmp_path, capsys):
    bert = tmp_path / "bert"
    transformers.BertModel(
        transformers.BertConfig(
            hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
        )
    ).save_pretrained(str(bert))
    err = _one_line_error(capsys, ["convert", str(bert), "--to", "megaclip", "--out", "x"])
    assert f"{bert} holds a 'bert' model (BertModel), not a CLIP model" in err
    siglip = tmp_path / "siglip"
    config = transformers.SiglipConfig()
    config.architectures = ["SiglipModel"]
    config.save_pretrained(str(siglip))
    err = _one_line_error(
        capsys,
        ["eval", "retrieval", "--checkpoint", str(siglip), "--data", "x.tar", "--device", "cpu"],
    )
    assert "holds a 'siglip' model (SiglipModel), not a CLIP model" in err
    small, _ = _universal(tmp_path, load_preset("tiny"))  # vocabulary 64
    err = _one_line_error(
        capsys, ["convert", str(small), "--to", "hf", "--out", str(tmp_path / "a")]
    )
    assert "clip_bpe tokenizer has 49408 token ids but the model's text.vocab_size is 64" in err
    wrong, _ = _universal(
        tmp_path, _cfg("gelu", pool_type="eos", eos_id=49406).with_overrides(name="w")
    )
    err = _one_line_error(
        capsys, ["convert", str(wrong), "--to", "hf", "--out", str(tmp_path / "b")]
    )
    assert "text pooling contradicts the clip_bpe tokenizer: text.eos_id is 49406" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_transformers_stays_optional(tmp_path, capsys, monkeypatch):
    """Writing an HF directory needs no transformers; --verify names the extra to install."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    uni, _ = _universal(tmp_path, _cfg())
    assert cli(["convert", str(uni), "--to", "hf", "--out", str(tmp_path / "hf")]) == 0
    argv = ["convert", str(uni), "--to", "hf", "--out", str(tmp_path / "hf2"), "--verify"]
    err = _one_line_error(capsys, argv)
    assert err.endswith("this needs Hugging Face transformers: pip install megaclip[hf]")
    assert not (tmp_path / "hf2").exists()
