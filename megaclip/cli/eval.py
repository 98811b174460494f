"""`megaclip eval {zeroshot,retrieval}`: evaluate an open_clip or megaclip CLIP checkpoint."""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from megaclip.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `megaclip eval zeroshot` and `megaclip eval retrieval`."""
    parser = subparsers.add_parser(
        "eval",
        help="zero-shot classification and image-text retrieval of a checkpoint",
        description="Evaluate a CLIP checkpoint: an open_clip state dict (.pt/.safetensors, with "
        "--model) or a megaclip export {model_config, state_dict}. See docs/eval.md.",
    )
    sub = parser.add_subparsers(dest="eval_command", metavar="TASK")

    zs = sub.add_parser(
        "zeroshot",
        help="zero-shot top-1 / top-5 accuracy from class names and prompt templates",
        description="Build a classifier from CLASSNAMES x TEMPLATES prompts and report top-1 / "
        "top-5 accuracy on labelled images: webdataset shards whose samples carry KEY.json "
        '{"label": int} (or KEY.cls), or an image folder ROOT/<classname>/*.png|jpg.',
    )
    _common(zs)
    zs.add_argument(
        "--data", required=True, help="shard spec ('val-{000000..000009}.tar') or image folder"
    )
    zs.add_argument("--classnames", required=True, help="text file, one class name per line")
    zs.add_argument(
        "--templates", required=True, help="text file, one prompt per line containing '{}'"
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
    rt.add_argument("--data", required=True, help="shard spec of (image, .txt caption) samples")
    rt.add_argument("--ks", default="1,5,10", help="comma-separated K values (1,5,10)")
    rt.add_argument("--chunk-size", type=int, default=1024, help="similarity rows per chunk (1024)")
    rt.set_defaults(func=_retrieval)
    parser.set_defaults(func=lambda _args: (parser.print_help(), 2)[1])


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--checkpoint",
        required=True,
        help="open_clip state dict (.pt/.bin/.safetensors) or wrapped {model_config, state_dict}",
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
    p.add_argument(
        "--tokenizer", choices=("clip_bpe", "sentencepiece"), default="clip_bpe", help="(clip_bpe)"
    )
    p.add_argument("--tokenizer-path", default=None, help="BPE merges or SentencePiece model")
    p.add_argument(
        "--max-skip-fraction",
        type=float,
        default=0.0,
        help="tolerated fraction of unusable shard samples (0: any is an error)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _setup(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """(device, model, tokenizer) from the common options."""
    import torch

    from megaclip.eval.model import load_eval_model
    from megaclip.tokenizer import build_tokenizer

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size {args.batch_size}: use at least 1")
    if not 0.0 <= args.max_skip_fraction <= 1.0:
        raise ConfigError(f"--max-skip-fraction {args.max_skip_fraction}: use a value in [0, 1]")
    if args.device is None:
        from megaclip.parallel.runtime import device as default_device

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
    if tokenizer.vocab_size > cfg.text.vocab_size:
        raise ConfigError(
            f"the {args.tokenizer} tokenizer has {tokenizer.vocab_size} token ids but model "
            f"{cfg.name} has text.vocab_size {cfg.text.vocab_size}; use the model's tokenizer"
        )
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

    classnames = read_classnames(args.classnames)
    templates = read_templates(args.templates)
    t0 = time.perf_counter()
    device, model, tokenizer = _setup(args)
    loader = labeled_loader(
        args.data,
        classnames,
        model.cfg.vision.image_size,
        args.batch_size,
        workers=args.workers,
        label_ext=args.label_ext,
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
        "source": "image_folder" if os.path.isdir(args.data) else "webdataset",
        "classes": len(classnames),
        "templates": len(templates),
        **result,
        "skipped": stats.skipped if stats is not None else 0,
        "load_seconds": round(t1 - t0, 3),
        "eval_seconds": round(t2 - t1, 3),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(
            f"zero-shot {out['model']} on {args.data}: {out['n']} images, {out['classes']} "
            f"classes x {out['templates']} templates"
        )
        print(f"  top-1 {_pct(out['top1'])}  top-5 {_pct(out['top5'])}")
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
    t0 = time.perf_counter()
    device, model, tokenizer = _setup(args)
    loader = caption_loader(
        args.data,
        model.cfg.vision.image_size,
        args.batch_size,
        workers=args.workers,
        max_skip_fraction=args.max_skip_fraction,
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
        "skipped": loader.skip_stats.skipped,
        "load_seconds": round(t1 - t0, 3),
        "eval_seconds": round(t2 - t1, 3),
    }
    if args.json:
        print(json.dumps(out))
    else:
        print(f"retrieval {out['model']} on {args.data}: {out['n_images']} image-caption pairs")
        for direction in ("image_to_text", "text_to_image"):
            cells = "  ".join(f"R@{k} {_pct(out[f'{direction}_R@{k}'])}" for k in ks)
            print(f"  {direction.replace('_', ' '):<14} {cells}")
        if out["skipped"]:
            print(f"  skipped samples: {loader.skip_stats.summary()}")
        print(f"  load {out['load_seconds']:.1f}s, eval {out['eval_seconds']:.1f}s")
    return 0
