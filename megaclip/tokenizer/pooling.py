"""Start-up check: a tokenizer fits the text tower (vocabulary size, pooled position)."""

from __future__ import annotations

from megaclip.config.model import TextConfig
from megaclip.errors import ConfigError
from megaclip.tokenizer import Tokenizer


def pooling_fix(tokenizer: Tokenizer) -> str:
    """The text pooling setting that fits ``tokenizer`` (argmax when its EOT is the largest id)."""
    eot = tokenizer.eot_token_id
    if eot == tokenizer.vocab_size - 1:
        return "text.pool_type: argmax"
    return f"text.pool_type: eos and text.eos_id: {eot}"


def pooling_problem(text: TextConfig, tokenizer: Tokenizer) -> str | None:
    """Why ``text``'s pooling does not pool at ``tokenizer``'s end-of-text token, else None."""
    eot = tokenizer.eot_token_id
    if eot is None or eot < 0 or not getattr(tokenizer, "add_eos", True):
        return "the tokenizer appends no end-of-text token, so no pooling finds the text's end"
    top = tokenizer.vocab_size - 1
    if text.pool_type == "argmax" and eot != top:
        return (
            f"text.pool_type argmax pools at the largest token id, but the tokenizer's "
            f"end-of-text id is {eot} (its ids go up to {top})"
        )
    if text.pool_type == "eos" and text.eos_id != eot:
        return f"text.eos_id is {text.eos_id} but the tokenizer's end-of-text id is {eot}"
    if text.pool_type == "first":
        return (
            "text.pool_type first pools position 0, which holds the start token; under causal "
            "attention it sees only itself, so every text would get the same feature"
        )
    if text.pool_type == "last":
        return (
            f"text.pool_type last pools position {text.context_length - 1}, which the tokenizer "
            "fills with padding for every text shorter than the context"
        )
    return None


def check_tokenizer(text: TextConfig, tokenizer: Tokenizer, kind: str) -> None:
    """ConfigError (one line, naming the fix) unless ``tokenizer`` fits the text tower ``text``."""
    if tokenizer.vocab_size > text.vocab_size:
        raise ConfigError(
            f"the {kind} tokenizer has {tokenizer.vocab_size} token ids but the model's "
            f"text.vocab_size is {text.vocab_size}: use a model with a vocabulary of at least "
            f"{tokenizer.vocab_size} ids (or the tokenizer the model was trained with)"
        )
    problem = pooling_problem(text, tokenizer)
    if problem is not None:
        raise ConfigError(
            f"text pooling contradicts the {kind} tokenizer: {problem}; set "
            f"{pooling_fix(tokenizer)} in the model config"
        )
