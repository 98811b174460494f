"""`megaclip models`: list the bundled model presets with their size."""

from __future__ import annotations

import argparse

from megaclip.config.model import ALIASES, list_presets, load_preset
from megaclip.model.flops import model_cost


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list model presets", description=__doc__)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    aliases = {v: k for k, v in ALIASES.items()}
    print(f"{'model':<14} {'params':>10} {'GMACs':>9}  vision/text layers x width")
    for name in list_presets():
        cfg = load_preset(name)
        cost = model_cost(cfg)
        alias = f"  (alias {aliases[name]})" if name in aliases else ""
        print(
            f"{name:<14} {cost.params_total / 1e6:>9.2f}M {cost.gmacs:>9.2f}  "
            f"{cfg.vision.layers}x{cfg.vision.width} / {cfg.text.layers}x{cfg.text.width}{alias}"
        )
    return 0
