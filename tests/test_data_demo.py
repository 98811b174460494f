"""The digits demo dataset and the `megaclip data` CLI."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from megaclip.cli.main import main
from megaclip.data.demo import CLASSNAMES, DemoConfig, caption_for, stratified_split
from megaclip.data.webdataset import WebDataset
from megaclip.errors import ConfigError


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "digits")
    rc = main(["data", "make-demo", out, "--image-size", "16", "--shards", "3", "--seed", "5"])
    assert rc == 0
    return out


def _read(spec):
    return list(WebDataset(spec, decode_json=True))


def test_demo_files_split_and_labels(demo_dir, capsys):
    names = sorted(os.listdir(demo_dir))
    assert names == [
        "classnames.txt",
        "manifest.json",
        "templates.txt",
        "train-000000.tar",
        "train-000001.tar",
        "train-000002.tar",
        "val-000000.tar",
    ]
    manifest = json.loads(Path(demo_dir, "manifest.json").read_text())
    train = _read(os.path.join(demo_dir, manifest["splits"]["train"]["spec"]))
    val = _read(os.path.join(demo_dir, manifest["splits"]["val"]["spec"]))
    assert len(train) + len(val) == 1797  # every sklearn digit, once
    assert not {s.key for s in train} & {s.key for s in val}
    from sklearn.datasets import load_digits

    target = load_digits().target
    per_class = np.bincount(target, minlength=10)
    val_counts = Counter(s.meta["label"] for s in val)
    for c in range(10):  # stratified: round(20%) of each class held out
        assert val_counts[c] == round(0.2 * per_class[c])
    assert manifest["splits"]["val"]["count"] == len(val)
    assert manifest["splits"]["train"]["per_class"] == {
        CLASSNAMES[c]: int(per_class[c]) - val_counts[c] for c in range(10)
    }
    for s in train[:50] + val[:50]:
        label = s.meta["label"]
        assert target[s.meta["source_index"]] == label and int(s.key) == s.meta["source_index"]
        assert s.meta["classname"] == CLASSNAMES[label]
        assert CLASSNAMES[label] in s.caption or str(label) in s.caption
        assert s.image.size == (16, 16) and s.image.mode == "RGB" and s.image.format == "PNG"
    assert len({s.caption for s in train}) > 50  # varied templates
    shard_sizes = [len(_read(os.path.join(demo_dir, f"train-00000{i}.tar"))) for i in range(3)]
    assert max(shard_sizes) - min(shard_sizes) <= 2
    assert (
        len(Counter(s.meta["label"] for s in _read(os.path.join(demo_dir, "train-000000.tar"))))
        == 10
    )
    classnames = Path(demo_dir, "classnames.txt").read_text().split()
    assert classnames == list(CLASSNAMES)
    templates = Path(demo_dir, "templates.txt").read_text().splitlines()
    assert len(templates) >= 3 and all("{}" in t for t in templates)


def test_demo_refuses_to_overwrite(demo_dir, capsys):
    assert main(["data", "make-demo", demo_dir]) == 2
    assert "--overwrite" in capsys.readouterr().err


def test_split_is_deterministic_and_seeded():
    labels = np.repeat(np.arange(10), 17)
    a = stratified_split(labels, 0.2, 0)
    b = stratified_split(labels, 0.2, 0)
    c = stratified_split(labels, 0.2, 1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not np.array_equal(a[1], c[1])
    assert len(a[1]) == 10 * round(0.2 * 17) and len(np.intersect1d(*a)) == 0


def test_captions_read_well():
    assert caption_for(8, 3) == "an image of an eight"
    assert caption_for(7, 3) == "an image of a seven"
    assert caption_for(7, 1) == "a handwritten digit 7"
    with pytest.raises(ConfigError):
        DemoConfig(image_size=4)


def test_cli_inspect(demo_dir, capsys, tmp_path):
    spec = (
        os.path.join(demo_dir, "train-{000000..000002}.tar")
        + "::"
        + os.path.join(demo_dir, "val-000000.tar")
    )
    assert main(["data", "inspect", spec]) == 0
    out = capsys.readouterr().out
    assert out.count("0 skipped") == 4 and "total: 4 shard(s), ok=1797 skipped=0" in out
    broken = tmp_path / "broken.tar"
    data = Path(demo_dir, "val-000000.tar").read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    assert main(["data", "inspect", str(broken), "--strict"]) == 1
    assert "BROKEN (truncated_tar=1)" in capsys.readouterr().out
    assert main(["data", "inspect", str(tmp_path / "nothing-{0..3}.tar")]) == 2
    assert "matches no existing file" in capsys.readouterr().err
