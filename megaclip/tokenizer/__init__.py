"""Text tokenizers: OpenAI CLIP BPE (open_clip-identical ids) and SentencePiece."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import torch

from megaclip.errors import ConfigError
from megaclip.tokenizer.bpe import DEFAULT_CONTEXT_LENGTH, ClipTokenizer
from megaclip.tokenizer.sentencepiece import SentencePieceTokenizer

TOKENIZER_KINDS = ("clip_bpe", "sentencepiece")

__all__ = [
    "TOKENIZER_KINDS",
    "ClipTokenizer",
    "SentencePieceTokenizer",
    "Tokenizer",
    "build_tokenizer",
]


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline needs: texts -> LongTensor [N, ctx], plus vocabulary facts."""

    context_length: int
    eot_token_id: int

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        ...

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None
    ) -> torch.Tensor:
        """Token ids [N, context_length], padded and truncated."""
        ...


def build_tokenizer(
    kind: str = "clip_bpe", path: str | None = None, context_length: int = DEFAULT_CONTEXT_LENGTH
) -> Tokenizer:
    """Tokenizer of the given kind: "clip_bpe" (path: merges .txt.gz, None = bundled OpenAI
    vocabulary) or "sentencepiece" (path: required .model file)."""
    if kind == "clip_bpe":
        return ClipTokenizer(bpe_path=path, context_length=context_length)
    if kind == "sentencepiece":
        if path is None:
            raise ConfigError(
                "tokenizer kind 'sentencepiece' needs a path to a .model file "
                '(build_tokenizer("sentencepiece", path="/data/spm.model"))'
            )
        return SentencePieceTokenizer(path, context_length=context_length)
    raise ConfigError(f"unknown tokenizer kind {kind!r}; valid kinds: {', '.join(TOKENIZER_KINDS)}")
