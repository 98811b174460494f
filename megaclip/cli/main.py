"""`megaclip <command>`: dispatch to the sub-command modules of this package.

Each sub-command lives in ``megaclip/cli/<name>.py`` and exposes
``register(subparsers) -> None``; the parser it adds sets ``func(args) -> int | None``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings

from megaclip.errors import ConfigError, MegaclipError

# Order is the order shown in `megaclip --help`.
COMMANDS = (
    "models",
    "info",
    "train",
    "eval",
    "convert",
    "data",
    "bench",
    "plan",
    "plot",
    "scaling",
)


def _quiet_imports() -> None:
    """Hide import-time noise of optional CUDA pieces on CPU machines (apex, CUDA runtime)."""
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"megatron\..*")
    warnings.filterwarnings("ignore", message=r".*apex.*")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed\..*")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megaclip",
        description="Train giant CLIP models with tensor, pipeline and ZeRO data parallelism.",
    )
    # The deepspeed launcher passes --local_rank=N before the sub-command; LOCAL_RANK has it too.
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"megaclip.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    _quiet_imports()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = args.func(args)
    except MegaclipError as err:
        # A config error is the same on every launched rank: rank 0 says it, once.
        if not (isinstance(err, ConfigError) and os.environ.get("RANK", "0") != "0"):
            print(f"megaclip {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"megaclip {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `megaclip ... | head`: the reader left, that is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
