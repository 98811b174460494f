"""Canonical parameter names: megaclip module paths <-> open_clip state-dict keys (pure)."""

from __future__ import annotations

import re

# (megaclip suffix pattern, open_clip replacement), applied to the name after its root.
_RULES: tuple[tuple[str, str], ...] = (
    (
        r"^visual\.embed\.(conv1\.weight|class_embedding|positional_embedding|ln_pre\..+)$",
        r"visual.\1",
    ),
    (r"^visual\.head\.(ln_post\..+|proj)$", r"visual.\1"),
    (r"^visual\.blocks\.(\d+)\.(.+)$", r"visual.transformer.resblocks.\1.\2"),
    (r"^text\.embed\.(token_embedding\.weight|positional_embedding)$", r"\1"),
    (r"^text\.head\.(ln_final\..+|text_projection)$", r"\1"),
    (r"^text\.blocks\.(\d+)\.(.+)$", r"transformer.resblocks.\1.\2"),
    (r"^(logit_scale|logit_bias)$", r"\1"),
)
_QKV = ((".attn.qkv.weight", ".attn.in_proj_weight"), (".attn.qkv.bias", ".attn.in_proj_bias"))
_ROOT = re.compile(r"(?:^|\.)(visual\.|text\.|logit_scale$|logit_bias$)")


def strip_prefix(name: str) -> str:
    """Drop wrapper prefixes (``module.``, pipeline layer indices) before ``visual``/``text``."""
    m = _ROOT.search(name)
    if m is None:
        raise KeyError(f"not a megaclip parameter name: {name}")
    return name[m.start(1) :]


def to_open_clip_key(name: str) -> str:
    """open_clip state-dict key of the megaclip parameter ``name`` (prefixes allowed)."""
    local = strip_prefix(name)
    for pattern, repl in _RULES:
        if re.match(pattern, local):
            key = re.sub(pattern, repl, local)
            for ours, theirs in _QKV:
                if key.endswith(ours):
                    key = key[: -len(ours)] + theirs
            return key
    raise KeyError(f"no open_clip key for megaclip parameter {name}")


def from_open_clip_key(key: str) -> str:
    """megaclip parameter name (ClipModel layout) of an open_clip state-dict key."""
    for ours, theirs in _QKV:
        if key.endswith(theirs):
            key = key[: -len(theirs)] + ours
    if key.startswith("visual.transformer.resblocks."):
        return "visual.blocks." + key[len("visual.transformer.resblocks.") :]
    if key.startswith("transformer.resblocks."):
        return "text.blocks." + key[len("transformer.resblocks.") :]
    if key in ("visual.ln_post.weight", "visual.ln_post.bias", "visual.proj"):
        return "visual.head." + key[len("visual.") :]
    if key.startswith("visual."):
        return "visual.embed." + key[len("visual.") :]
    if key.startswith(("ln_final.", "text_projection")):
        return "text.head." + key
    if key in ("token_embedding.weight", "positional_embedding"):
        return "text.embed." + key
    if key in ("logit_scale", "logit_bias"):
        return key
    raise KeyError(f"unexpected open_clip key {key}")
