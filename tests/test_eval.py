"""Zero-shot classification, retrieval recall and checkpoint loading (megaclip.eval)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from megaclip.checkpoint.openclip import open_clip_model, to_open_clip
from megaclip.config.model import load_preset, resolve_model
from megaclip.data.webdataset import ShardWriter
from megaclip.errors import CheckpointError, DataError
from megaclip.eval.data import ImageFolder, LabeledShards, image_folder_loader, labeled_loader
from megaclip.eval.model import NormalizedEncoder, load_eval_model, save_eval_checkpoint
from megaclip.eval.retrieval import positive_ranks, recall_at_k
from megaclip.eval.zeroshot import (
    build_classifier,
    fill_template,
    read_classnames,
    read_templates,
    zeroshot_eval,
)
from megaclip.model.clip import ClipModel
from megaclip.model.init import init_parameters

CLASSES = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]
TEMPLATES = ["a photo of a {}.", "a {} again", "{}, {} and more"]


def toy_tokenizer(texts: list[str], vocab: int = 64, ctx: int = 16) -> torch.Tensor:
    """[N, ctx] ids in [1, vocab - 2] from the characters, then EOT (vocab - 1), zero padding."""
    out = torch.zeros(len(texts), ctx, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [1 + (ord(ch) * 7) % (vocab - 2) for ch in text][: ctx - 1] + [vocab - 1]
        out[row, : len(ids)] = torch.tensor(ids)
    return out


class ToyModel(torch.nn.Module):
    """encode_image = normalize(flatten(x) @ A); encode_text = normalize(sum of B[token] rows)."""

    def __init__(self, pixels: int, vocab: int = 64, dim: int = 8, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.A = torch.nn.Parameter(torch.randn(pixels, dim, generator=g))
        self.B = torch.nn.Parameter(torch.randn(vocab, dim, generator=g))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(images.flatten(1) @ self.A, dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.B[tokens].sum(dim=1), dim=-1)


def tiny_clip(seed: int = 0, **overrides) -> ClipModel:
    cfg = resolve_model({"preset": "tiny", **overrides}) if overrides else load_preset("tiny")
    model = ClipModel(cfg)
    init_parameters(model, cfg, seed=seed)
    return model.eval()


# ---------------------------------------------------------------- zero-shot


def test_classifier_equals_manual_loop():
    model = tiny_clip()
    # batch_size 4 cuts through the 3-prompt groups of each class
    got = build_classifier(model, toy_tokenizer, CLASSES, TEMPLATES, "cpu", batch_size=4)
    assert got.shape == (32, len(CLASSES))
    with torch.no_grad():
        columns = []
        for c in CLASSES:
            feats = [model.encode_text(toy_tokenizer([t.replace("{}", c)]))[0] for t in TEMPLATES]
            mean = torch.stack([f / f.norm() for f in feats]).mean(dim=0)
            columns.append(mean / mean.norm())
    want = torch.stack(columns, dim=1)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert fill_template("{}, {} and {x}", "cat") == "cat, cat and {x}"  # no str.format


def _hand_zeroshot(model: ToyModel, images: torch.Tensor, labels: torch.Tensor, classes):
    """Classifier and top-1/top-5 counts by plain tensor ops, independent of megaclip.eval."""
    with torch.no_grad():
        cols = []
        for c in classes:
            rows = []
            for t in TEMPLATES:
                tokens = toy_tokenizer([t.replace("{}", c)])[0]
                f = model.B[tokens].sum(dim=0)
                rows.append(f / f.norm())
            m = torch.stack(rows).mean(dim=0)
            cols.append(m / m.norm())
        w = torch.stack(cols, dim=1)
        x = images.flatten(1) @ model.A
        logits = (x / x.norm(dim=1, keepdim=True)) @ w
    order = logits.argsort(dim=1, descending=True)
    top1 = sum(int(order[i, 0] == labels[i]) for i in range(len(labels)))
    top5 = sum(int(labels[i] in order[i, :5].tolist()) for i in range(len(labels)))
    return w, top1, top5


@pytest.mark.parametrize("num_classes", [7, 3])
def test_zeroshot_eval_matches_hand_computation(num_classes):
    classes = CLASSES[:num_classes]
    g = torch.Generator().manual_seed(1)
    images = torch.randn(41, 3, 4, 4, generator=g)
    labels = torch.randint(0, num_classes, (41,), generator=g)
    model = ToyModel(3 * 4 * 4)
    w_hand, top1, top5 = _hand_zeroshot(model, images, labels, classes)
    w = build_classifier(model, toy_tokenizer, classes, TEMPLATES, "cpu", batch_size=5)
    torch.testing.assert_close(w, w_hand, atol=1e-6, rtol=0)
    loader = [(images[a : a + 16], labels[a : a + 16]) for a in range(0, 41, 16)]
    result = zeroshot_eval(model, w, loader, "cpu")
    assert result["n"] == 41
    assert result["top1"] == top1 / 41
    assert 0 < top1 < 41  # a case that can fail both ways
    if num_classes >= 5:
        assert result["top5"] == top5 / 41
        assert top1 < top5 < 41
    else:
        assert result["top5"] is None


def test_open_clip_model_wrapped_gives_same_results():
    cfg = load_preset("tiny")
    torch.manual_seed(0)
    reference = NormalizedEncoder(open_clip_model(cfg).eval())
    ours = ClipModel(cfg).eval()
    from megaclip.checkpoint.openclip import from_open_clip

    ours.load_state_dict(from_open_clip(reference.model.state_dict()), strict=True)
    w_ref = build_classifier(reference, toy_tokenizer, CLASSES, TEMPLATES, "cpu")
    w = build_classifier(ours, toy_tokenizer, CLASSES, TEMPLATES, "cpu")
    torch.testing.assert_close(w, w_ref, atol=1e-5, rtol=0)
    g = torch.Generator().manual_seed(2)
    batch = [(torch.randn(12, 3, 32, 32, generator=g), torch.randint(0, 7, (12,), generator=g))]
    assert zeroshot_eval(ours, w, batch, "cpu") == zeroshot_eval(reference, w_ref, batch, "cpu")


def test_zeroshot_rejects_non_finite_features():
    model = tiny_clip()
    with torch.no_grad():
        model.visual.head.proj.fill_(float("nan"))
    w = build_classifier(model, toy_tokenizer, CLASSES, TEMPLATES, "cpu")
    with pytest.raises(CheckpointError, match="non-finite image features"):
        zeroshot_eval(model, w, [(torch.zeros(2, 3, 32, 32), torch.tensor([0, 1]))], "cpu")


# ---------------------------------------------------------------- retrieval


def test_recall_engineered_half():
    eye = torch.eye(4)
    texts = eye[[0, 1, 3, 2]]  # captions of images 2 and 3 are swapped
    out = recall_at_k(eye, texts, ks=(1, 2, 5))
    assert out["image_to_text_R@1"] == 0.5
    assert out["text_to_image_R@1"] == 0.5
    # the swapped pair ties with nothing: the positive has score 0 and two other zeros, one 1
    assert out["image_to_text_R@2"] == pytest.approx(0.5 + 0.5 * (1 / 3))
    assert out["image_to_text_R@5"] == 1.0
    assert (out["n_images"], out["n_texts"]) == (4, 4)


def test_recall_equals_brute_force_with_several_captions_per_image():
    g = torch.Generator().manual_seed(3)
    n, m = 9, 20
    img = F.normalize(torch.randn(n, 6, generator=g), dim=-1)
    owner = torch.cat([torch.arange(n), torch.randint(0, n, (m - n,), generator=g)])
    txt = F.normalize(img[owner] + 0.9 * torch.randn(m, 6, generator=g), dim=-1)
    ks = (1, 2, 5)
    out = recall_at_k(img, txt, ks, text_to_image=owner, chunk_size=4)
    sims = (img @ txt.T).tolist()
    for k in ks:
        hits = 0
        for i in range(n):
            ranked = sorted(range(m), key=lambda j, i=i: -sims[i][j])[:k]
            hits += any(int(owner[j]) == i for j in ranked)
        assert out[f"image_to_text_R@{k}"] == pytest.approx(hits / n, abs=1e-7)
        hits = 0
        for j in range(m):
            ranked = sorted(range(n), key=lambda i, j=j: -sims[i][j])[:k]
            hits += int(owner[j]) in ranked
        assert out[f"text_to_image_R@{k}"] == pytest.approx(hits / m, abs=1e-7)
    assert 0 < out["image_to_text_R@1"] < 1 and 0 < out["text_to_image_R@1"] < 1


def test_recall_ties_are_chance_not_success():
    same = F.normalize(torch.ones(10, 4), dim=-1)
    out = recall_at_k(same, same, ks=(1, 5))
    assert out["image_to_text_R@1"] == pytest.approx(0.1)
    assert out["text_to_image_R@5"] == pytest.approx(0.5)
    # a perfect model on data with two identical pairs: each of those has R@1 = 1/2
    img = torch.eye(4)[[0, 1, 2, 2]]
    txt = img.clone()
    i2t, t2i = positive_ranks(img, txt)
    assert i2t.ties.tolist() == t2i.ties.tolist() == [0, 0, 1, 1]
    assert i2t.greater.tolist() == t2i.greater.tolist() == [0, 0, 0, 0]
    out = recall_at_k(img, txt, ks=(1, 2))
    assert out["image_to_text_R@1"] == out["text_to_image_R@1"] == pytest.approx(0.75)
    assert out["image_to_text_R@2"] == out["text_to_image_R@2"] == 1.0


def test_recall_rejects_uncaptioned_image():
    with pytest.raises(DataError, match="image 1 has no caption"):
        recall_at_k(torch.eye(3), torch.eye(3)[:2], text_to_image=torch.tensor([0, 2]))


# ---------------------------------------------------------------- checkpoints


def _features(model: ClipModel):
    g = torch.Generator().manual_seed(4)
    images = torch.randn(2, 3, 32, 32, generator=g)
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(toy_tokenizer(["hi", "there"]))


def test_wrapped_and_bare_checkpoints_load(tmp_path):
    model = tiny_clip(seed=5)
    want = _features(model)
    wrapped = str(tmp_path / "wrapped.pt")
    save_eval_checkpoint(wrapped, model.cfg, model.state_dict())
    raw = torch.load(wrapped, weights_only=True)
    assert set(raw) == {"model_config", "state_dict"}
    assert "visual.conv1.weight" in raw["state_dict"]
    open_clip_model(model.cfg).load_state_dict(raw["state_dict"], strict=True)
    oc = to_open_clip(model.state_dict())
    bare = str(tmp_path / "bare.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in oc.items()}, "epoch": 3}, bare)
    from safetensors.torch import save_file

    bare_st = str(tmp_path / "bare.safetensors")
    save_file({k: v.contiguous() for k, v in oc.items()}, bare_st)
    wrapped_st = str(tmp_path / "wrapped.safetensors")
    save_eval_checkpoint(wrapped_st, model.cfg, model.state_dict())
    cases = [(wrapped, None), (wrapped, "tiny"), (bare, "tiny"), (bare_st, "tiny")]
    for path, name in [*cases, (wrapped_st, None)]:
        loaded = load_eval_model(path, "cpu", name)
        assert not loaded.training
        for a, b in zip(_features(loaded), want):
            torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_checkpoint_errors(tmp_path):
    model = tiny_clip()
    bare = str(tmp_path / "bare.pt")
    torch.save(to_open_clip(model.state_dict()), bare)
    with pytest.raises(CheckpointError, match="not found"):
        load_eval_model(str(tmp_path / "nope.pt"), "cpu", "tiny")
    with pytest.raises(CheckpointError, match="is a directory"):
        load_eval_model(str(tmp_path), "cpu", "tiny")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_eval_model(str(junk), "cpu", "tiny")
    junk_st = tmp_path / "junk.safetensors"
    junk_st.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot read safetensors"):
        load_eval_model(str(junk_st), "cpu", "tiny")
    with pytest.raises(CheckpointError, match="pass --model"):
        load_eval_model(bare, "cpu")
    wide = {"preset": "tiny", "vision": {"width": 64, "heads": 4}}
    with pytest.raises(CheckpointError, match=r"shape mismatch at 'visual\.class_embedding'"):
        load_eval_model(bare, "cpu", resolve_model(wide))
    wrapped = str(tmp_path / "w.pt")
    save_eval_checkpoint(wrapped, model.cfg, model.state_dict())
    with pytest.raises(CheckpointError, match=r"differs .* at vision\.width \(64 vs 32\)"):
        load_eval_model(wrapped, "cpu", resolve_model(wide))
    partial = dict(to_open_clip(model.state_dict()))
    del partial["text_projection"]
    torch.save(partial, bare)
    with pytest.raises(CheckpointError, match="no 'text_projection'"):
        load_eval_model(bare, "cpu", "tiny")
    pooled = {**to_open_clip(model.state_dict()), "visual.attn_pool.query": torch.zeros(2)}
    torch.save(pooled, bare)
    with pytest.raises(CheckpointError, match=r"key 'visual\.attn_pool\.query' does not exist"):
        load_eval_model(bare, "cpu", "tiny")
    torch.save({"optimizer": {"lr": 1.0}}, bare)
    with pytest.raises(CheckpointError, match="not a tensor"):
        load_eval_model(bare, "cpu", "tiny")


# ---------------------------------------------------------------- data sources

COLORS = {"red": (220, 20, 20), "green": (20, 200, 30), "blue": (10, 30, 230)}


def _color_image(rgb, i: int) -> Image.Image:
    img = Image.new("RGB", (40, 36), tuple(max(0, c - 9 * i) for c in rgb))
    img.putpixel((3, 3), (i * 20 % 256, 0, 0))
    return img


@pytest.fixture()
def folder_and_shards(tmp_path):
    root = tmp_path / "folder"
    names = list(COLORS)
    with ShardWriter(str(tmp_path / "val-%06d.tar"), max_count=100) as w:
        for label, name in enumerate(names):
            (root / name).mkdir(parents=True)
            for i in range(3 + label):  # 3, 4, 5 images
                img = _color_image(COLORS[name], i)
                img.save(root / name / f"{i:03d}.png")
                w.write(f"{name}{i:03d}", img, f"a {name} square", {"label": label})
    (tmp_path / "classnames.txt").write_text("\n".join(names) + "\n")
    return str(root), str(tmp_path / "val-000000.tar"), names


def test_image_folder_equals_shards(folder_and_shards):
    root, shard, names = folder_and_shards
    folder = list(image_folder_loader(root, names, image_size=32, batch_size=5))
    labels = torch.cat([y for _, y in folder])
    assert labels.tolist() == [0] * 3 + [1] * 4 + [2] * 5
    model = ToyModel(3 * 32 * 32)
    w = build_classifier(model, toy_tokenizer, names, TEMPLATES, "cpu")
    shards = labeled_loader(shard, names, image_size=32, batch_size=5)
    assert isinstance(shards, LabeledShards)
    from_folder = zeroshot_eval(model, w, folder, "cpu")
    from_shards = zeroshot_eval(model, w, shards, "cpu")
    assert from_folder == from_shards and from_folder["n"] == 12
    two_workers = labeled_loader(shard, names, image_size=32, batch_size=5, workers=2)
    assert zeroshot_eval(model, w, two_workers, "cpu") == from_shards
    assert two_workers.skip_stats.ok == 12
    images_f = torch.cat([x for x, _ in folder])
    images_s = torch.cat([x for x, _ in shards])
    assert torch.equal(images_f, images_s)  # same files, same eval transform, same order


def test_image_folder_mismatch_is_one_clear_error(folder_and_shards):
    root, _, names = folder_and_shards
    with pytest.raises(DataError, match="no folder for class 'purple'"):
        ImageFolder(root, [*names, "purple"], 32)
    with pytest.raises(DataError, match="folder 'red' is not a class name"):
        ImageFolder(root, ["green", "blue"], 32)
    with pytest.raises(DataError, match="'red' appears twice"):
        ImageFolder(root, ["red", "green", "blue", "red"], 32)


def test_shard_label_errors(tmp_path):
    spec = str(tmp_path / "s-%06d.tar")
    with ShardWriter(spec, max_count=10) as w:
        w.write("a", _color_image((9, 9, 9), 0), "x", {"label": 1})
        w.write("b", _color_image((9, 9, 9), 1), "x", {"label": 5})
    with pytest.raises(DataError, match=r"s-000000\.tar:b: label 5 is outside \[0, 3\)"):
        list(LabeledShards(str(tmp_path / "s-000000.tar"), 3, 32, 4))
    with ShardWriter(str(tmp_path / "t-%06d.tar"), max_count=10) as w:
        w.write("a", _color_image((9, 9, 9), 0), "x", {"label": 1})
        w.write("b", _color_image((9, 9, 9), 1), "x")  # no .json
    with pytest.raises(DataError, match="missing_caption=1"):
        list(LabeledShards(str(tmp_path / "t-000000.tar"), 3, 32, 4))
    with ShardWriter(str(tmp_path / "c-%06d.tar"), max_count=10) as w:
        for i, label in enumerate([2, 0]):
            img = _color_image((9, 9, 9), i)
            w.write_raw(f"k{i}", {"png": _png(img), "cls": f"{label}\n".encode()})
    batches = list(LabeledShards(str(tmp_path / "c-000000.tar"), 3, 32, 4, label_ext="cls"))
    assert batches[0][1].tolist() == [2, 0]


def _png(img: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_classnames_and_templates_files(tmp_path):
    good = tmp_path / "t.txt"
    good.write_text("a photo of a {}.\n\n  itap of a {}  \n")
    assert read_templates(str(good)) == ["a photo of a {}.", "itap of a {}"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of a {}.\na photo of a thing\n")
    with pytest.raises(DataError, match=r"line 2: 'a photo of a thing' has no '\{\}'"):
        read_templates(str(bad))
    with pytest.raises(DataError, match="classnames file not found"):
        read_classnames(str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    with pytest.raises(DataError, match="is empty"):
        read_classnames(str(empty))
    with pytest.raises(DataError, match="no '\\{\\}' placeholder"):
        build_classifier(ToyModel(3), toy_tokenizer, ["a"], ["no placeholder"], "cpu")
