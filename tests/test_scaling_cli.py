"""`megaclip scaling fit|predict|plot` via `python -m megaclip`: output and one-line user errors."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.mp_util import megaclip_cli


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return megaclip_cli("scaling", *args)


def assert_user_error(out: subprocess.CompletedProcess, match: str) -> None:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("megaclip scaling: error: ")
    assert match in lines[0], lines[0]


def test_fit_json_on_shipped_table():
    out = run_cli("fit", "--json", "--bootstrap", "200")
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["metric"] == "imagenet_zeroshot_top1"
    groups = {g["name"]: g for g in res["groups"]}
    assert set(groups) == {"LAION-80M", "LAION-400M"}
    for g in groups.values():
        cf = g["compute_fit"]
        assert cf["alpha_ci"][0] <= cf["alpha"] <= cf["alpha_ci"][1]
        assert abs(g["leave_largest_out"]["residual"]) < 2.0
    assert groups["LAION-400M"]["compute_fit"]["alpha"] == pytest.approx(0.1236, abs=2e-3)


def test_fit_text_and_run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: {preset: ViT-B-32}\ndata: {name: toy}\n")
    lines = [
        json.dumps({"step": i, "samples_seen": s, "zeroshot_top1": t})
        for i, (s, t) in enumerate(
            [(1e8, 0.30), (2e8, 0.36), (4e8, 0.40), (8e8, 0.42), (16e8, 0.43)]
        )
    ]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    out = run_cli("fit", str(run), "--every-eval", "--bootstrap", "100")
    assert out.returncode == 0, out.stderr
    assert "toy: 5 points, 5 fitted" in out.stdout
    assert "alpha = " in out.stdout and "R^2 = " in out.stdout
    assert "ViT-B-32 vs samples seen: beta = " in out.stdout
    # Only the last evaluation by default: one point, too few to fit.
    assert_user_error(run_cli("fit", str(run)), "too few points")


def test_predict_json_cost():
    out = run_cli(
        "predict",
        "--model",
        "ViT-G-14",
        "--samples",
        "34B",
        "--device",
        "A100",
        "--mfu",
        "0.5",
        "--bootstrap",
        "200",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    pr = json.loads(out.stdout)
    assert pr["model"] == "ViT-G-14" and pr["fit_dataset"] == "LAION-400M"
    assert pr["compute_flops"] == pytest.approx(3196.08e9 * 34e9, rel=1e-4)
    assert pr["gpu_hours"] == pytest.approx(pr["compute_flops"] / (312e12 * 0.5) / 3600)
    assert pr["interval"][0] <= pr["predicted"] <= pr["interval"][1]
    assert pr["extrapolation"] > 5


def test_predict_text():
    out = run_cli(
        "predict",
        "--model",
        "ViT-L-14",
        "--samples",
        "34e9",
        "--dataset-size",
        "8e7",
        "--bootstrap",
        "100",
    )
    assert out.returncode == 0, out.stderr
    assert "from the LAION-80M (80M samples) fit" in out.stdout
    assert "GPU-hours" in out.stdout and "989 TFLOP/s" in out.stdout


@pytest.mark.parametrize(
    "args, match",
    [
        (("predict", "--model", "ViT-Q-14", "--samples", "34e9"), "unknown model 'ViT-Q-14'"),
        (("predict", "--model", "ViT-B-32", "--samples", "-5"), "must be a positive number"),
        (
            ("predict", "--model", "ViT-B-32", "--samples", "3e9", "--device", "tpu"),
            "unknown device",
        ),
        (
            ("predict", "--model", "ViT-B-32", "--samples", "3e9", "--mfu", "1.5"),
            "--mfu must be in",
        ),
        (("predict", "--model", "ViT-B-32"), "give both --model and --samples"),
    ],
)
def test_predict_user_errors(args, match):
    assert_user_error(run_cli(*args), match)


def test_fit_user_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("model,samples_seen,top1\nViT-B-32,3e9,abc\n")
    assert_user_error(run_cli("fit", str(bad)), "column 'top1' is not a number")
    few = tmp_path / "few.csv"
    few.write_text("model,samples_seen,top1\nViT-B-32,3e9,50\nViT-B-32,13e9,55\nViT-B-16,3e9,56\n")
    assert_user_error(run_cli("fit", str(few), "--points", "all"), "too few points")


def test_plot_png(tmp_path):
    out_png = tmp_path / "s.png"
    out = run_cli(
        "plot",
        "--out",
        str(out_png),
        "--model",
        "ViT-G-14",
        "--samples",
        "34e9",
        "--bootstrap",
        "200",
    )
    assert out.returncode == 0, out.stderr
    assert out_png.read_bytes()[:4] == b"\x89PNG"
