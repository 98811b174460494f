"""SentencePiece tokenizer with ClipTokenizer's [N, context_length] LongTensor contract."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import torch

from megaclip.errors import ConfigError, DataError
from megaclip.tokenizer.bpe import DEFAULT_CONTEXT_LENGTH, as_text_list, pack_ids


def _load_processor(model_bytes: bytes, source: str) -> object:
    """SentencePieceProcessor from a serialized ModelProto; DataError naming source if invalid."""
    try:
        import sentencepiece
    except ImportError as err:  # pragma: no cover - sentencepiece is an install requirement
        raise ConfigError(
            "the sentencepiece tokenizer needs the sentencepiece package: pip install sentencepiece"
        ) from err
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.LoadFromSerializedProto(model_bytes)
    except (RuntimeError, OSError, ValueError) as err:
        detail = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise DataError(
            f"{source} is not a valid SentencePiece model ({detail}); supply the .model file "
            "written by sentencepiece.SentencePieceTrainer (not the .vocab file)"
        ) from err
    if processor.get_piece_size() <= 0:
        raise DataError(f"SentencePiece model {source} has no pieces; retrain it")
    return processor


class SentencePieceTokenizer:
    """SentencePiece ``.model`` tokenizer -> LongTensor [N, ctx]: [BOS] ids [EOS], truncated with
    EOS kept last, padded with the model's pad id (0 if it has none)."""

    def __init__(
        self,
        model_path: str,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        add_bos: bool = True,
        add_eos: bool = True,
    ):
        """Load model_path (a SentencePiece .model file); DataError if missing or not a model."""
        if context_length < 1:
            raise ConfigError(f"context_length must be >= 1, got {context_length}")
        if model_path is None or not os.path.isfile(model_path):
            raise DataError(
                f"SentencePiece model file not found: {model_path}; pass the path of a .model "
                "file (see docs/tokenizers.md to train one)"
            )
        with open(model_path, "rb") as handle:
            model_bytes = handle.read()
        self._init(model_bytes, os.path.abspath(model_path), context_length, add_bos, add_eos)

    def _init(
        self, model_bytes: bytes, source: str, context_length: int, add_bos: bool, add_eos: bool
    ) -> None:
        """Shared by __init__ and unpickling: load the processor and check the special ids."""
        self._sp = _load_processor(model_bytes, source)
        self._model_bytes = model_bytes
        self.model_path = source
        self.context_length = context_length
        self.add_bos = add_bos
        self.add_eos = add_eos
        self.sot_token_id = self._sp.bos_id()
        self.eot_token_id = self._sp.eos_id()
        self._has_pad = self._sp.pad_id() >= 0
        self.pad_token_id = self._sp.pad_id() if self._has_pad else 0
        for wanted, token_id, name, flag in (
            (add_bos, self.sot_token_id, "BOS", "add_bos"),
            (add_eos, self.eot_token_id, "EOS", "add_eos"),
        ):
            if wanted and token_id < 0:
                raise ConfigError(
                    f"SentencePiece model {source} has no {name} piece but {flag}=True; set "
                    f"{flag}=False or retrain with --{name.lower()}_id >= 0"
                )

    @property
    def vocab_size(self) -> int:
        """Number of pieces (ids) in the model."""
        return int(self._sp.get_piece_size())

    def __getstate__(self) -> dict[str, object]:
        """Pickle the serialized model and settings (the C++ processor is rebuilt on load)."""
        return {
            "model_bytes": self._model_bytes,
            "source": self.model_path,
            "context_length": self.context_length,
            "add_bos": self.add_bos,
            "add_eos": self.add_eos,
        }

    def __setstate__(self, state: dict[str, object]) -> None:
        """Rebuild from __getstate__'s dict."""
        self._init(**state)  # type: ignore[arg-type]

    def encode(self, text: str) -> list[int]:
        """SentencePiece ids of text, without BOS/EOS and without truncation."""
        return list(self._sp.encode(text, out_type=int))

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of ids; skip_special_tokens drops BOS, stops at EOS and drops trailing padding."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            if self.eot_token_id >= 0 and self.eot_token_id in ids:
                ids = ids[: ids.index(self.eot_token_id)]
            while ids and ids[-1] == self.pad_token_id:
                ids.pop()
            ids = [i for i in ids if i != self.sot_token_id]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise DataError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return self._sp.decode(ids)

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None
    ) -> torch.Tensor:
        """LongTensor [N, ctx]: [BOS] ids [EOS], cut to ctx keeping EOS last, padded with pad id."""
        ctx = self.context_length if context_length is None else context_length
        texts = as_text_list(texts)
        encoded = self._sp.encode(texts, out_type=int) if texts else []
        prefix = [self.sot_token_id] if self.add_bos else []
        suffix = [self.eot_token_id] if self.add_eos else []
        rows = [prefix + list(ids) + suffix for ids in encoded]
        if self.add_eos:
            return pack_ids(rows, ctx, self.eot_token_id, self.pad_token_id)
        rows = [row[:ctx] for row in rows]  # nothing to keep last: plain truncation
        return pack_ids(rows, ctx, -1, self.pad_token_id)

    def __repr__(self) -> str:
        """Short description with path, context length and BOS/EOS flags."""
        return (
            f"SentencePieceTokenizer(model_path={self.model_path!r}, "
            f"context_length={self.context_length}, add_bos={self.add_bos}, "
            f"add_eos={self.add_eos})"
        )
