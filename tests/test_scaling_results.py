"""Reading scaling results: CSV tables (header synonyms, model spellings, errors) and run dirs."""

from __future__ import annotations

import json

import pytest

from megaclip.config.model import load_preset
from megaclip.errors import ConfigError, DataError
from megaclip.model.flops import model_cost
from megaclip.scaling import canonical_model_name, load_results, read_run, read_table
from megaclip.scaling.results import parse_count

B32 = model_cost(load_preset("ViT-B-32")).train_flops


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_model_names_normalised():
    assert canonical_model_name("ViT-B/32") == "ViT-B-32"
    assert canonical_model_name("ViT_L_14") == "ViT-L-14"
    assert canonical_model_name("vit-b-16") == "ViT-B-16"
    assert canonical_model_name("ViT-bigG/14") == "ViT-G-14"
    assert canonical_model_name("ViT-g/14") == "ViT-g-14"
    with pytest.raises(ConfigError, match="ambiguous.*ViT-G-14 and ViT-g-14"):
        canonical_model_name("vit-G-14".lower())
    with pytest.raises(ConfigError, match="unknown model 'ViT-Q-14'"):
        canonical_model_name("ViT-Q/14")


def test_parse_count():
    assert parse_count("34e9", "x") == 34e9
    assert parse_count("34B", "x") == 34e9
    assert parse_count("400M", "x") == 4e8
    for bad in ("abc", "-3e9", "0", "nan"):
        with pytest.raises(ConfigError):
            parse_count(bad, "--samples")


def test_csv_with_synonyms_comments_and_slash_names(tmp_path):
    p = write(
        tmp_path / "r.csv",
        "# a comment line\n"
        "Model,Samples Seen,Data,Zero-shot Top1,Top5\n"
        "ViT-B/32,3e9,toy,51.9,80.0\n"
        "\n"
        "ViT-B/32,13e9,toy,,81.0\n"  # empty metric cell: skipped
        "ViT-B/16,13e9,toy,60.2,85.0\n",
    )
    r = read_table(p)
    assert r.metric == "Zero-shot Top1"
    assert [pt.model for pt in r.points] == ["ViT-B-32", "ViT-B-16"]
    assert r.points[0].compute == pytest.approx(B32 * 3e9)
    assert r.points[0].error == pytest.approx(48.1)
    assert r.points[0].dataset == "toy" and r.points[0].dataset_size is None
    assert r.points[1].source.endswith("r.csv:6")
    assert read_table(p, metric="top5").points[0].value == 80.0


def test_dataset_from_size_when_no_dataset_column(tmp_path):
    p = write(tmp_path / "r.csv", "model,samples_seen,dataset_size,top1\nViT-B-32,3e9,4e8,57\n")
    (pt,) = read_table(p).points
    assert pt.dataset == "400M samples" and pt.dataset_size == 4e8


@pytest.mark.parametrize(
    "text, err, match",
    [
        ("model,top1\nViT-B-32,50\n", DataError, "missing column.*samples_seen"),
        ("samples_seen,top1\n3e9,50\n", DataError, "missing column.*model"),
        ("model,samples_seen,loss\nViT-B-32,3e9,1.2\n", DataError, "no column for metric 'top1'"),
        ("model,samples_seen,val_top1,test_top1\nViT-B-32,3e9,1,2\n", DataError, "ambiguous"),
        (
            "model,samples_seen,top1\nViT-B-32,three,50\n",
            DataError,
            r"r.csv:2: column 'samples_seen'",
        ),
        (
            "model,samples_seen,top1\nViT-B-32,3e9,high\n",
            DataError,
            "column 'top1' is not a number",
        ),
        ("model,samples_seen,top1\nViT-B-32,0,50\n", DataError, "samples_seen must be positive"),
        ("model,samples_seen,top1\nViT-B-32,-3e9,50\n", DataError, "samples_seen must be positive"),
        ("model,samples_seen,top1\nViT-B-32,3e9,150\n", DataError, "not an accuracy in percent"),
        ("model,samples_seen,top1\nViT-B-32,3e9\n", DataError, "2 cells but the header has 3"),
        ("model,samples_seen,dataset_size,top1\nViT-B-32,3e9,0,5\n", DataError, "dataset_size"),
        ("model,samples_seen,top1\nViT-Q-14,3e9,50\n", ConfigError, "r.csv:2: unknown model"),
        ("model,samples_seen,top1\n", DataError, "no result rows"),
        ("# only a comment\n", DataError, "no header"),
    ],
)
def test_malformed_csv_is_one_clear_error(tmp_path, text, err, match):
    p = write(tmp_path / "r.csv", text)
    with pytest.raises(err, match=match):
        read_table(p)


def make_run(root, name, model, evals, data=None):
    d = root / name
    d.mkdir()
    cfg = f"model: {model}\n" + (f"data: {json.dumps(data)}\n" if data else "")
    write(d / "config.yaml", cfg)
    lines = [json.dumps({"step": 1, "samples_seen": 1000, "loss": 5.0})]
    for samples, top1 in evals:
        lines.append(json.dumps({"step": samples // 1000, "samples_seen": samples, "loss": 3.0}))
        lines.append(
            json.dumps({"step": samples // 1000, "samples_seen": samples, "zeroshot_top1": top1})
        )
    write(d / "metrics.jsonl", "\n".join(lines) + "\n")
    return d


def test_run_directory_last_and_every_eval(tmp_path):
    d = make_run(
        tmp_path,
        "b32",
        "{preset: ViT-B/32}",
        [(10**8, 0.2), (3 * 10**8, 0.3)],
        data={"name": "toy", "size": 1e7},
    )
    r = read_run(d)
    (pt,) = r.points
    assert r.metric == "zeroshot_top1"
    assert pt.model == "ViT-B-32" and pt.samples_seen == 3e8 and pt.value == pytest.approx(30.0)
    assert pt.dataset == "toy" and pt.dataset_size == 1e7
    assert pt.compute == pytest.approx(B32 * 3e8)
    assert pt.source.endswith("metrics.jsonl:5")
    assert [p.samples_seen for p in read_run(d, every_eval=True).points] == [1e8, 3e8]


def test_folder_of_runs_and_mixed_inputs(tmp_path):
    runs = tmp_path / "sweep"
    runs.mkdir()
    make_run(runs, "a", "ViT-B-32", [(10**8, 0.25)])
    make_run(runs, "b", "ViT-B-16", [(10**8, 0.31)])
    csv = write(tmp_path / "t.csv", "model,samples_seen,top1\nViT-L-14,3e9,61\n")
    r = load_results([runs, csv])
    assert [p.model for p in r.points] == ["ViT-B-32", "ViT-B-16", "ViT-L-14"]
    assert r.points[0].dataset == "unnamed"
    assert r.metric == "zeroshot_top1 / top1"


@pytest.mark.parametrize(
    "line, match",
    [
        ('{"samples_seen": 1000, "zeroshot_top1": 63.2}', "not a fraction in \\[0, 1\\]"),
        ('{"step": 3, "zeroshot_top1": 0.5}', "must also hold 'samples_seen'"),
        ('{"samples_seen": 0, "zeroshot_top1": 0.5}', "samples_seen must be positive"),
        ('{"samples_seen": 100, "zeroshot_top1": 0.5', "metrics.jsonl:1: not a JSON object"),
        ('{"samples_seen": 100, "loss": 2.0}', "no column for metric 'top1'"),
    ],
)
def test_malformed_run_is_one_clear_error(tmp_path, line, match):
    d = tmp_path / "run"
    d.mkdir()
    write(d / "config.yaml", "model: ViT-B-32\n")
    write(d / "metrics.jsonl", line + "\n")
    with pytest.raises(DataError, match=match):
        read_run(d)


def test_run_dir_config_errors(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    write(d / "metrics.jsonl", '{"samples_seen": 100, "zeroshot_top1": 0.5}\n')
    with pytest.raises(DataError, match="config.yaml is missing"):
        read_run(d)
    write(d / "config.yaml", "optimizer: adamw\n")
    with pytest.raises(ConfigError, match="no 'model' entry"):
        read_run(d)
    write(d / "config.yaml", "model: ViT-Q-14\n")
    with pytest.raises(ConfigError, match="unknown model"):
        read_run(d)
    with pytest.raises(DataError, match="results not found"):
        load_results([tmp_path / "nope.csv"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="neither a run directory"):
        load_results([empty])
