"""`megaclip train --config FILE [--deepspeed ds_configs/X.json] [key=value ...]`."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a CLIP model (run under deepspeed / torchrun / srun)",
        description="Train a CLIP model. Launch one process per device with the deepspeed "
        "launcher, torchrun or srun (see launch/); a single process needs no launcher.",
    )
    p.add_argument("--config", help="run config (YAML/JSON); see configs/demo.yaml")
    p.add_argument("--deepspeed", help="DeepSpeed JSON (overrides the config's 'deepspeed')")
    p.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.steps=50")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from megaclip.config.train import load_run_config
    from megaclip.train.resolve import launched_world, resolve_run

    # the config's and the DeepSpeed JSON's errors come out before torch is even imported
    run = resolve_run(
        load_run_config(args.config, args.overrides), args.deepspeed, world=launched_world()
    )
    from megaclip.parallel.runtime import clean_exit
    from megaclip.train.loop import train_run

    train_run(run)
    clean_exit(0)
    return 0
