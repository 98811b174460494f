"""Parser building blocks shared by the sub-command modules."""

from __future__ import annotations

import argparse


def add_group(
    subparsers: argparse._SubParsersAction,
    name: str,
    *,
    help: str,  # noqa: A002 - argparse's own keyword
    description: str,
    dest: str,
    metavar: str,
) -> argparse._SubParsersAction:
    """``megaclip NAME ACTION``: a command of actions; it prints its help when none is given."""
    parser = subparsers.add_parser(name, help=help, description=description)
    parser.set_defaults(func=lambda _args: (parser.print_help(), 2)[1])
    return parser.add_subparsers(dest=dest, metavar=metavar)


def add_documented(
    subparsers: argparse._SubParsersAction,
    name: str,
    *,
    help: str,  # noqa: A002 - argparse's own keyword
    doc: str | None,
) -> argparse.ArgumentParser:
    """A command described by its module docstring ``doc``, line breaks kept."""
    return subparsers.add_parser(
        name, help=help, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


#: megaclip.tokenizer.TOKENIZER_KINDS, spelled out: importing megaclip.tokenizer imports torch.
TOKENIZER_CHOICES = ("clip_bpe", "sentencepiece")


def add_tokenizer_options(
    parser: argparse.ArgumentParser,
    *,
    help: str,  # noqa: A002 - argparse's own keyword
    path_help: str,
) -> None:
    """``--tokenizer KIND`` (default clip_bpe) and ``--tokenizer-path``, for build_tokenizer."""
    parser.add_argument("--tokenizer", choices=TOKENIZER_CHOICES, default="clip_bpe", help=help)
    parser.add_argument("--tokenizer-path", default=None, help=path_help)
