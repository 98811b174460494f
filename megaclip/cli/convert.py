"""`megaclip convert`: checkpoints between megaclip (any layout), universal, open_clip and HF.

    megaclip convert RUN/checkpoints --to open_clip --out model.safetensors [--fp32-master]
    megaclip convert RUN/checkpoints --to open_clip --out oc-dir      # open_clip model directory
    megaclip convert RUN/checkpoints --to hf --out hf-dir [--verify]  # transformers CLIPModel
    megaclip convert RUN/checkpoints/step-200 --to universal --out ckpt-universal
    megaclip convert open_clip.pt --to megaclip --out init-dir --model ViT-B-32 --tp 2 --pp 2
    megaclip convert hf-dir --to megaclip --out init-dir            # HF CLIPModel / open_clip dir

Runs in one process without process groups (offline).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from megaclip.cli.common import add_documented, add_tokenizer_options

TARGETS = ("open_clip", "megaclip", "universal", "hf")
FILE_SUFFIXES = (".pt", ".safetensors")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``convert`` sub-command."""
    p = add_documented(
        sub,
        "convert",
        help="convert checkpoints (megaclip <-> open_clip / HF, any layout -> universal)",
        doc=__doc__,
    )
    p.add_argument(
        "src", help="checkpoint root / step dir / universal dir, an open_clip file or an HF dir"
    )
    p.add_argument("--to", required=True, choices=TARGETS, help="output format")
    p.add_argument(
        "--out", required=True, help="output file (.pt/.safetensors) or directory (open_clip, hf)"
    )
    p.add_argument(
        "--fp32-master",
        action="store_true",
        help="open_clip/hf export: use the optimizer's fp32 master weights (bf16 runs)",
    )
    p.add_argument("--model", default=None, help="model preset/YAML of a bare open_clip file")
    p.add_argument("--tp", type=int, default=1, help="--to megaclip: check this TP size fits")
    p.add_argument("--pp", type=int, default=1, help="--to megaclip: check this PP size fits")
    add_tokenizer_options(
        p,
        help="--to hf: the model's tokenizer (clip_bpe: its files are written too)",
        path_help="--to hf: BPE merges or SentencePiece",
    )
    p.add_argument(
        "--verify",
        action="store_true",
        help="--to hf: load the result with transformers and compare features and token ids",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch on ``--to``; user errors surface as CheckpointError (exit status 2)."""
    from megaclip.errors import CheckpointError

    src, out = Path(args.src), Path(args.out)
    if not src.exists():
        raise CheckpointError(f"{src} does not exist")
    if args.to == "open_clip":
        return _to_open_clip(src, out, args.fp32_master)
    if args.to == "hf":
        return _to_hf(src, out, args)
    if args.to == "universal":
        from megaclip.checkpoint.universal import convert_to_universal

        path = convert_to_universal(src, out)
        print(f"wrote {path} (universal: fp32 weights + Adam moments, any layout can resume it)")
        return 0
    return _to_megaclip(src, out, args)


def _to_open_clip(src: Path, out: Path, fp32_master: bool) -> int:
    from megaclip.errors import CheckpointError

    if out.suffix in FILE_SUFFIXES:
        from megaclip.checkpoint.export import export_open_clip

        path = export_open_clip(src, out, fp32_master=fp32_master)
        print(f"wrote {path} (open_clip state dict + model config)")
        return 0
    if out.suffix or (out.exists() and not out.is_dir()):
        raise CheckpointError(
            f"--out {out}: use a .pt or .safetensors file name, or a directory name"
        )
    from megaclip.checkpoint.export import export_open_clip_dir

    path = export_open_clip_dir(src, out, fp32_master=fp32_master)
    print(
        f"wrote {path} (open_clip model directory: open_clip.create_model('local-dir:{path}'), "
        f"clip_benchmark --model local-dir:{path})"
    )
    return 0


def _to_hf(src: Path, out: Path, args: argparse.Namespace) -> int:
    from megaclip.checkpoint.hf import export_hf, load_transformers
    from megaclip.errors import CheckpointError

    if args.verify:
        load_transformers()  # before writing: a missing extra is reported first

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"--out {out} already exists and is not empty; choose another")
    if not src.is_dir():
        raise CheckpointError(
            f"--to hf expects a megaclip checkpoint directory, got file {src}; import an "
            "open_clip file with --to megaclip first"
        )
    names = export_hf(
        src,
        out,
        fp32_master=args.fp32_master,
        tokenizer=args.tokenizer,
        tokenizer_path=args.tokenizer_path,
    )
    print(f"wrote {out}: {', '.join(names)} (transformers CLIPModel.from_pretrained)")
    if args.tokenizer != "clip_bpe":
        print("  no tokenizer files: transformers' CLIPTokenizer is CLIP BPE only")
    if args.verify:
        _print_verification(src, out, args)
    return 0


def _print_verification(src: Path, out: Path, args: argparse.Namespace) -> None:
    from megaclip.checkpoint.export import read_full_model
    from megaclip.checkpoint.hf import verify_hf
    from megaclip.model.clip import ClipModel
    from megaclip.tokenizer import build_tokenizer

    cfg, params = read_full_model(src, fp32_master=args.fp32_master)
    model = ClipModel(cfg)
    model.load_state_dict({k: v.float() for k, v in params.items()}, strict=True)
    tok = build_tokenizer(args.tokenizer, args.tokenizer_path, cfg.text.context_length)
    got = verify_hf(out, model, tok)
    same = {None: "n/a", True: "equal", False: "DIFFERENT"}[got["token_ids_equal"]]
    print(
        f"  transformers: max |feature difference| image {got['image_max_abs_diff']:.2e}, "
        f"text {got['text_max_abs_diff']:.2e} (fp32); token ids {same}"
    )


def _to_megaclip(src: Path, out: Path, args: argparse.Namespace) -> int:
    from megaclip.checkpoint.export import import_open_clip
    from megaclip.checkpoint.openclip import is_open_clip_dir, read_open_clip_dir
    from megaclip.errors import CheckpointError

    if src.is_dir() and is_open_clip_dir(src):
        cfg, weights = read_open_clip_dir(src)
        path = import_open_clip(weights, out, model=args.model or cfg, tp=args.tp, pp=args.pp)
    elif src.is_dir():
        from megaclip.checkpoint.hf import HF_CONFIG, import_hf

        if not (src / HF_CONFIG).is_file():
            raise CheckpointError(
                f"--to megaclip expects an open_clip file, an open_clip model directory or a "
                f"Hugging Face CLIPModel directory; {src} has no {HF_CONFIG}"
            )
        path = import_hf(src, out, tp=args.tp, pp=args.pp)
    else:
        path = import_open_clip(src, out, model=args.model, tp=args.tp, pp=args.pp)
    print(f"wrote {path}; fine-tune from it with train.init_from: {path}")
    return 0
