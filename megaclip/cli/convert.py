"""`megaclip convert`: checkpoints between megaclip (any layout), universal and open_clip formats.

    megaclip convert RUN/checkpoints --to open_clip --out model.safetensors [--fp32-master]
    megaclip convert RUN/checkpoints/step-200 --to universal --out ckpt-universal
    megaclip convert open_clip.pt --to megaclip --out init-dir --model ViT-B-32 --tp 2 --pp 2

Runs in one process without process groups (offline).
"""

from __future__ import annotations

import argparse
from pathlib import Path

TARGETS = ("open_clip", "megaclip", "universal")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``convert`` sub-command."""
    p = sub.add_parser(
        "convert",
        help="convert checkpoints (megaclip <-> open_clip, any layout -> universal)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("src", help="checkpoint root / step dir / universal dir, or an open_clip file")
    p.add_argument("--to", required=True, choices=TARGETS, help="output format")
    p.add_argument("--out", required=True, help="output file (.pt/.safetensors) or directory")
    p.add_argument(
        "--fp32-master",
        action="store_true",
        help="open_clip export: use the optimizer's fp32 master weights (bf16 runs)",
    )
    p.add_argument("--model", default=None, help="model preset/YAML of a bare open_clip file")
    p.add_argument("--tp", type=int, default=1, help="--to megaclip: check this TP size fits")
    p.add_argument("--pp", type=int, default=1, help="--to megaclip: check this PP size fits")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Dispatch on ``--to``; user errors surface as CheckpointError (exit status 2)."""
    from megaclip.errors import CheckpointError

    src, out = Path(args.src), Path(args.out)
    if not src.exists():
        raise CheckpointError(f"{src} does not exist")
    if args.to == "open_clip":
        from megaclip.checkpoint.export import export_open_clip

        if out.suffix not in (".pt", ".safetensors"):
            raise CheckpointError(f"--out {out}: use a .pt or .safetensors file name")
        path = export_open_clip(src, out, fp32_master=args.fp32_master)
        print(f"wrote {path} (open_clip state dict + model config)")
        return 0
    if args.to == "universal":
        from megaclip.checkpoint.universal import convert_to_universal

        path = convert_to_universal(src, out)
        print(f"wrote {path} (universal: fp32 weights + Adam moments, any layout can resume it)")
        return 0
    from megaclip.checkpoint.export import import_open_clip

    if src.is_dir():
        raise CheckpointError(f"--to megaclip expects an open_clip file, got directory {src}")
    path = import_open_clip(src, out, model=args.model, tp=args.tp, pp=args.pp)
    print(f"wrote {path}; fine-tune from it with train.init_from: {path}")
    return 0
