"""`megaclip info --model NAME [--json]`: parameters, GMACs and training FLOPs per sample."""

from __future__ import annotations

import argparse
import json

from megaclip.config.model import resolve_model
from megaclip.config.schema import to_dict
from megaclip.model.flops import model_cost


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info", help="parameters and FLOPs of a model", description=__doc__.split(":")[1].strip()
    )
    p.add_argument("--model", required=True, help="preset name or YAML/JSON model file")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    cfg = resolve_model(args.model)
    cost = model_cost(cfg)
    if args.json:
        print(json.dumps({"model": cfg.name, **cost.as_dict(), "config": to_dict(cfg)}))
        return 0
    v, t = cfg.vision, cfg.text
    print(f"model            {cfg.name}")
    print(
        f"vision tower     {v.layers} layers x {v.width} wide, {v.heads} heads, mlp {v.mlp_dim}, "
        f"{v.image_size}px / patch {v.patch_size} ({v.seq_len} tokens)"
    )
    print(
        f"text tower       {t.layers} layers x {t.width} wide, {t.heads} heads, mlp {t.mlp_dim}, "
        f"context {t.context_length}, vocab {t.vocab_size}"
    )
    print(f"embed dim        {cfg.embed_dim}")
    print(
        f"parameters       {cost.params_total / 1e6:.2f}M "
        f"(vision {cost.params_vision / 1e6:.2f}M, text {cost.params_text / 1e6:.2f}M)"
    )
    print(
        f"forward GMACs    {cost.gmacs:.2f} per sample "
        f"(vision {cost.macs_vision / 1e9:.2f}, text {cost.macs_text / 1e9:.2f})"
    )
    print(f"train GFLOPs     {cost.train_flops / 1e9:.2f} per sample (6 x MACs)")
    return 0
