"""Check a trained run's exports against transformers, open_clip and CLIP_benchmark.

    python benchmarks/export_check.py --run runs/demo --data demo_data [--work DIR] [--json]

1. ``megaclip convert RUN/checkpoints --to hf`` and ``--to open_clip`` (an open_clip directory);
2. image features (every validation image, open_clip's eval transform) and text features (every
   class x template prompt) of transformers' ``CLIPModel`` vs open_clip's
   ``create_model("local-dir:...")``: largest absolute difference, fp32;
3. transformers' ``CLIPTokenizer`` ids vs megaclip's on the same prompts;
4. the validation split in CLIP_benchmark's layout (``megaclip eval to-clip-benchmark``), then
   CLIP_benchmark's own CLI (open_clip path, ``--no_amp``) vs ``megaclip eval zeroshot`` on the
   open_clip directory, the HF directory and the megaclip checkpoint: top-1 / top-5.

Needs the ``test`` extra (transformers, clip-benchmark). Prints what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _megaclip(*argv: str) -> str:
    """Run the megaclip CLI in-process; its stdout (SystemExit on failure)."""
    from megaclip.cli.main import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(list(argv))
    if rc:
        raise SystemExit(f"megaclip {' '.join(argv)} failed ({rc})")
    return buf.getvalue()


def _feature_differences(oc_dir: Path, hf_dir: Path, data: Path) -> dict:
    import open_clip
    import torch
    import transformers
    from PIL import Image

    from megaclip.eval.benchmark import labeled_samples
    from megaclip.eval.zeroshot import fill_template, read_classnames, read_templates
    from megaclip.tokenizer import build_tokenizer

    oc, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{oc_dir}")
    oc.eval()
    hf = transformers.CLIPModel.from_pretrained(str(hf_dir)).eval()
    images = torch.stack(
        [
            preprocess(Image.open(io.BytesIO(raw)))
            for _, _, raw, _ in labeled_samples(str(data / "val-000000.tar"))
        ]
    )
    classes = read_classnames(str(data / "classnames.txt"))
    prompts = [
        fill_template(t, c) for c in classes for t in read_templates(str(data / "templates.txt"))
    ]
    ctx = hf.config.text_config.max_position_embeddings
    tokens = build_tokenizer("clip_bpe", None, ctx)(prompts)
    hf_tok = transformers.CLIPTokenizer.from_pretrained(str(hf_dir))
    hf_ids = torch.tensor(hf_tok(prompts, padding="max_length", truncation=True)["input_ids"])
    with torch.no_grad():
        a = hf.get_image_features(pixel_values=images)
        b = hf.get_text_features(input_ids=tokens)
        hf_img = getattr(a, "pooler_output", a)
        hf_txt = getattr(b, "pooler_output", b)
        oc_img, oc_txt = oc.encode_image(images), oc.encode_text(tokens)
    return {
        "images": len(images),
        "prompts": len(prompts),
        "image_max_abs_diff": float((hf_img - oc_img).abs().max()),
        "text_max_abs_diff": float((hf_txt - oc_txt).abs().max()),
        "image_feature_max_abs": float(oc_img.abs().max()),
        "text_feature_max_abs": float(oc_txt.abs().max()),
        "token_ids_equal": bool(torch.equal(hf_ids, tokens)),
    }


def _clip_benchmark_top1(oc_dir: Path, bench: Path, out: Path) -> dict:
    argv = ["eval", "--model_type", "open_clip", "--model", f"local-dir:{oc_dir}",
            "--pretrained", "none", "--no_amp", "--num_workers", "0", "--dataset", "wds/digits",
            "--dataset_root", str(bench), "--task", "zeroshot_classification",
            "--output", str(out), "--quiet"]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    script = REPO / "tests" / "workers" / "clip_benchmark_run.py"
    subprocess.run([sys.executable, str(script), json.dumps([argv])], check=True, env=env)
    return json.loads(out.read_text())["metrics"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/demo", help="run directory (RUN/checkpoints)")
    parser.add_argument("--data", default="demo_data", help="demo data directory")
    parser.add_argument("--work", default=None, help="where the exports go (a temp dir)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    run, data = Path(args.run), Path(args.data)
    work = Path(args.work or tempfile.mkdtemp(prefix="export-check-"))
    ckpt = run / "checkpoints"
    oc_dir, hf_dir, bench = work / "open_clip", work / "hf", work / "bench"
    _megaclip("convert", str(ckpt), "--to", "open_clip", "--out", str(oc_dir))
    _megaclip("convert", str(ckpt), "--to", "hf", "--out", str(hf_dir))
    _megaclip("eval", "to-clip-benchmark", "--data", str(data / "val-000000.tar"),
              "--classnames", str(data / "classnames.txt"),
              "--templates", str(data / "templates.txt"), "--out", str(bench))  # fmt: skip
    result = {"features": _feature_differences(oc_dir, hf_dir, data)}
    result["clip_benchmark"] = _clip_benchmark_top1(oc_dir, bench, work / "cb.json")
    for name, path in (("open_clip_dir", oc_dir), ("hf_dir", hf_dir), ("checkpoint", ckpt)):
        text = _megaclip("eval", "zeroshot", "--checkpoint", str(path), "--data", str(bench),
                         "--device", "cpu", "--json")  # fmt: skip
        got = json.loads(text.strip().splitlines()[-1])
        result[f"megaclip_{name}"] = {"top1": got["top1"], "top5": got["top5"], "n": got["n"]}
    if args.json:
        print(json.dumps(result))
        return 0
    f, cb = result["features"], result["clip_benchmark"]
    print(f"exports in {work}")
    print(
        f"transformers vs open_clip, fp32: max |image feature diff| {f['image_max_abs_diff']:.2e} "
        f"({f['images']} images, features up to {f['image_feature_max_abs']:.2f}), max |text "
        f"feature diff| {f['text_max_abs_diff']:.2e} ({f['prompts']} prompts, up to "
        f"{f['text_feature_max_abs']:.2f}); token ids equal: {f['token_ids_equal']}"
    )
    print(f"CLIP_benchmark (open_clip dir):  top-1 {cb['acc1']:.6f}  top-5 {cb['acc5']:.6f}")
    for name in ("open_clip_dir", "hf_dir", "checkpoint"):
        m = result[f"megaclip_{name}"]
        print(f"megaclip eval ({name}):{' ' * (15 - len(name))}top-1 {m['top1']:.6f}  "
              f"top-5 {m['top5']:.6f}  (n={m['n']})")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
