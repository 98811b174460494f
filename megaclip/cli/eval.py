"""`megaclip eval {zeroshot,retrieval}`: evaluate an open_clip, HF or megaclip CLIP checkpoint.

`megaclip eval to-clip-benchmark` writes labelled shards in CLIP_benchmark's webdataset layout.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from megaclip.cli.common import add_group, add_tokenizer_options
from megaclip.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `megaclip eval zeroshot` and `megaclip eval retrieval`."""
    sub = add_group(
        subparsers,
        "eval",
        help="zero-shot classification and image-text retrieval of a checkpoint",
        description="Evaluate a CLIP checkpoint: an open_clip state dict (.pt/.safetensors, with "
        "--model), a megaclip export {model_config, state_dict}, an open_clip or Hugging Face "
        "CLIPModel directory, or a megaclip checkpoint directory. See docs/eval.md.",
        dest="eval_command",
        metavar="TASK",
    )

    zs = sub.add_parser(
        "zeroshot",
        help="zero-shot top-1 / top-5 accuracy from class names and prompt templates",
        description="Build a classifier from CLASSNAMES x TEMPLATES prompts and report top-1 / "
        "top-5 accuracy on labelled images: webdataset shards whose samples carry KEY.json "
        '{"label": int} (or KEY.cls), an image folder ROOT/<classname>/*.png|jpg, or a '
        "CLIP_benchmark webdataset directory (its classnames and templates are the defaults).",
    )
    _common(zs)
    zs.add_argument(
        "--data",
        required=True,
        help="shard spec ('val-{000000..000009}.tar'), image folder or CLIP_benchmark directory",
    )
    zs.add_argument("--classnames", default=None, help="text file, one class name per line")
    zs.add_argument(
        "--templates", default=None, help="text file, one prompt per line containing '{}' / '{c}'"
    )
    zs.add_argument(
        "--label-ext",
        choices=("json", "cls"),
        default="json",
        help='shard member holding the label: KEY.json {"label": int} (default) or KEY.cls',
    )
    zs.set_defaults(func=_zeroshot)

    rt = sub.add_parser(
        "retrieval",
        help="image->text and text->image recall@K on (image, caption) shards",
        description="Encode every (image, KEY.txt caption) pair of the shards and report "
        "image->text and text->image recall@K; each image's own caption is its positive.",
    )
    _common(rt)
    rt.add_argument(
        "--data",
        required=True,
        help="shard spec of (image, .txt caption) samples or CLIP_benchmark retrieval directory",
    )
    rt.add_argument("--ks", default="1,5,10", help="comma-separated K values (1,5,10)")
    rt.add_argument("--chunk-size", type=int, default=1024, help="similarity rows per chunk (1024)")
    rt.set_defaults(func=_retrieval)

    cb = sub.add_parser(
        "to-clip-benchmark",
        help="write labelled shards as a CLIP_benchmark webdataset directory",
        description="Copy labelled webdataset shards (images undecoded) into CLIP_benchmark's "
        "layout: OUT/<split>/N.tar with KEY.cls labels, OUT/classnames.txt and "
        "OUT/zeroshot_classification_templates.txt ({} becomes {c}).",
    )
    cb.add_argument("--data", required=True, help="shard spec of labelled samples")
    cb.add_argument("--classnames", required=True, help="text file, one class name per line")
    cb.add_argument("--templates", required=True, help="text file, one prompt per line")
    cb.add_argument("--out", required=True, help="output directory")
    cb.add_argument("--split", default="test", help="split name (test)")
    cb.add_argument("--label-ext", choices=("json", "cls"), default="json", help="(json)")
    cb.set_defaults(func=_to_benchmark)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="open_clip state dict (.pt/.bin/.safetensors), wrapped {model_config, state_dict}, "
        "open_clip / HF CLIPModel directory or megaclip checkpoint directory",
    )
    p.add_argument(
        "--model",
        default=None,
        help="preset name or model YAML/JSON file; required for bare open_clip state dicts",
    )
    p.add_argument("--batch-size", type=int, default=256, help="images / prompts per batch (256)")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes (0)")
    p.add_argument(
        "--device", default=None, help="torch device (default: the accelerator's, else cpu)"
    )
    p.add_argument("--precision", choices=PRECISIONS, default="fp32", help="model dtype (fp32)")
    add_tokenizer_options(p, help="(clip_bpe)", path_help="BPE merges or SentencePiece model")
    p.add_argument(
        "--max-skip-fraction",
        type=float,
        default=0.0,
        help="tolerated fraction of unusable shard samples (0: any is an error)",
    )
    p.add_argument("--split", default="test", help="split of a CLIP_benchmark directory (test)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _setup(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(device, model, tokenizer) from the common options."""
    import torch

    from megaclip.eval.model import load_eval_model
    from megaclip.tokenizer import build_tokenizer
    from megaclip.tokenizer.pooling import check_tokenizer

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: use at least 1")
    if not 0.0 <= args.max_skip_fraction <= 1.0:
        raise ConfigError(f"--max-skip-fraction {args.max_skip_fraction}: use a value in [0, 1]")
    if args.device is None:
        from megaclip.parallel.device import device as default_device

        device = default_device()
    else:
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise ConfigError(f"--device {args.device!r} is not a torch device name") from None
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.precision]
    model = load_eval_model(args.checkpoint, device, args.model, dtype=dtype)
    cfg = model.cfg
    tokenizer = build_tokenizer(args.tokenizer, args.tokenizer_path, cfg.text.context_length)
    check_tokenizer(cfg.text, tokenizer, args.tokenizer)  # vocabulary size, text pooling
    return device, model, tokenizer


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _zeroshot(args: argparse.Namespace) -> int:
    from megaclip.eval.data import labeled_loader
    from megaclip.eval.zeroshot import (
        build_classifier,
        read_classnames,
        read_templates,
        zeroshot_eval,
    )

    bench = _benchmark(args, "classification")
    classnames = read_classnames(args.classnames) if args.classnames else None
    templates = read_templates(args.templates) if args.templates else None
    if bench is not None:
        classnames = classnames or bench.classnames
        templates = templates or bench.templates
    if classnames is None or templates is None:
        missing = "--classnames" if classnames is None else "--templates"
        raise ConfigError(
            f"{missing} is required unless --data is a CLIP_benchmark directory that has "
            "classnames.txt and zeroshot_classification_templates.txt"
        )
    t0 = time.perf_counter()
    device, model, tokenizer = _setup(args)
    loader = labeled_loader(
        bench.shards if bench is not None else args.data,
        classnames,
        model.cfg.vision.image_size,
        args.batch_size,
        workers=args.workers,
        label_ext="cls" if bench is not None else args.label_ext,
        max_skip_fraction=args.max_skip_fraction,
    )
    t1 = time.perf_counter()
    classifier = build_classifier(
        model, tokenizer, classnames, templates, device, batch_size=args.batch_size
    )
    result = zeroshot_eval(model, classifier, loader, device)
    t2 = time.perf_counter()
    stats = getattr(loader, "skip_stats", None)
    out = {
        "task": "zeroshot",
        "checkpoint": args.checkpoint,
        "model": model.cfg.name,
        "data": args.data,
        "source": "clip_benchmark"
        if bench is not None
        else "image_folder"
        if os.path.isdir(args.data)
        else "webdataset",
        "classes": len(classnames),
        "templates": len(templates),
        **result,
        **_run_stats(stats, t0, t1, t2),
    }
    lines = [
        f"zero-shot {out['model']} on {args.data}: {out['n']} images, {out['classes']} "
        f"classes x {out['templates']} templates",
        f"  top-1 {_pct(out['top1'])}  top-5 {_pct(out['top5'])}",
    ]
    return _report(args, out, lines, stats)


def _run_stats(stats, t0: float, t1: float, t2: float) -> dict:
    """Skipped samples (``stats``: the loader's SkipStats or None) and load / eval seconds."""
    return {
        "skipped": stats.skipped if stats is not None else 0,
        "load_seconds": round(t1 - t0, 3),
        "eval_seconds": round(t2 - t1, 3),
    }


def _report(args: argparse.Namespace, out: dict, lines: list[str], stats) -> int:
    """Print ``out`` as one JSON line (--json) or ``lines`` plus skips and timings."""
    if args.json:
        print(json.dumps(out))
        return 0
    for line in lines:
        print(line)
    if out["skipped"]:
        print(f"  skipped samples: {stats.summary()}")
    print(f"  load {out['load_seconds']:.1f}s, eval {out['eval_seconds']:.1f}s")
    return 0


def _parse_ks(text: str) -> list[int]:
    try:
        ks = [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise ConfigError(f"--ks {text!r}: use comma-separated positive integers") from None
    if not ks or any(k < 1 for k in ks):
        raise ConfigError(f"--ks {text!r}: use comma-separated positive integers")
    return ks


def _retrieval(args: argparse.Namespace) -> int:
    from megaclip.eval.data import caption_loader
    from megaclip.eval.retrieval import retrieval_eval

    ks = _parse_ks(args.ks)
    if args.chunk_size < 1:
        raise ConfigError(f"--chunk-size {args.chunk_size}: use at least 1")
    bench = _benchmark(args, "retrieval")
    t0 = time.perf_counter()
    device, model, tokenizer = _setup(args)
    loader = caption_loader(
        bench.shards if bench is not None else args.data,
        model.cfg.vision.image_size,
        args.batch_size,
        workers=args.workers,
        max_skip_fraction=args.max_skip_fraction,
        lines=bench is not None,
    )
    t1 = time.perf_counter()
    result = retrieval_eval(model, tokenizer, loader, device, ks, chunk_size=args.chunk_size)
    t2 = time.perf_counter()
    out = {
        "task": "retrieval",
        "checkpoint": args.checkpoint,
        "model": model.cfg.name,
        "data": args.data,
        **result,
        **_run_stats(loader.skip_stats, t0, t1, t2),
    }
    lines = [
        f"retrieval {out['model']} on {args.data}: {out['n_images']} images, "
        f"{out['n_texts']} captions"
    ]
    for direction in ("image_to_text", "text_to_image"):
        cells = "  ".join(f"R@{k} {_pct(out[f'{direction}_R@{k}'])}" for k in ks)
        lines.append(f"  {direction.replace('_', ' '):<14} {cells}")
    return _report(args, out, lines, loader.skip_stats)


def _benchmark(args: argparse.Namespace, kind: str):
    """The CLIP_benchmark split that ``--data`` names (None: not such a directory)."""
    from megaclip.eval.benchmark import is_benchmark_dir, read_benchmark_dir

    if not is_benchmark_dir(args.data):
        return None
    bench = read_benchmark_dir(args.data, args.split)
    if (bench.kind == "retrieval") != (kind == "retrieval"):
        raise ConfigError(
            f"--data {args.data} is a CLIP_benchmark {bench.kind} dataset (dataset_type.txt): "
            f"evaluate it with `megaclip eval {'retrieval' if kind != 'retrieval' else 'zeroshot'}`"
        )
    return bench


def _to_benchmark(args: argparse.Namespace) -> int:
    from megaclip.eval.benchmark import labeled_samples, write_benchmark_dir
    from megaclip.eval.zeroshot import read_classnames, read_templates

    classnames = read_classnames(args.classnames)
    templates = read_templates(args.templates)
    samples = labeled_samples(args.data, args.label_ext)
    bench = write_benchmark_dir(args.out, samples, classnames, templates, split=args.split)
    print(
        f"wrote {args.out} (CLIP_benchmark webdataset, split {bench.split}: "
        f"{len(bench.shards)} shard(s), {len(classnames)} classes); evaluate with "
        f"clip_benchmark eval --dataset wds/NAME --dataset_root {args.out}"
    )
    return 0
