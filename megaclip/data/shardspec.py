"""Shard specs: brace expansion (``/data/{00000..00099}.tar``) and resolution to existing files.

Syntax (no globbing):

* ``{a..b}`` integer range, inclusive, ascending or descending; zero-padded to the wider bound
  when either bound has a leading zero (``{000..010}`` -> 000, 001, ..., 010); optional step
  ``{0..10..2}``.
* ``{x..y}`` single-letter range (``{a..e}``).
* ``{p,q,r}`` comma list; items may themselves contain braces.
* several groups in one pattern expand to their product, leftmost varying slowest.
* ``SPEC1::SPEC2`` concatenates the expansions of several specs, in order.
* remote shards (see sources.py): ``pipe:CMD`` (the whole command is brace-expanded, one command
  per shard, as webdataset / open_clip do), ``http(s)://...`` and other fsspec URLs. They are not
  checked for existence here: one that cannot be read is skipped and counted when it is read.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence

from megaclip.data.sources import HTTP_PREFIXES, check_fsspec_scheme, is_pipe, is_remote
from megaclip.errors import DataError

_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?$")
_CHAR_RANGE = re.compile(r"^([A-Za-z])\.\.([A-Za-z])$")


def _matching_brace(text: str, start: int) -> int:
    """Index of the '}' closing the '{' at ``start``; -1 when unbalanced."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    return -1


def _split_top_level(body: str) -> list[str]:
    """Split ``body`` at commas that are not inside nested braces."""
    parts, depth, cur = [], 0, []
    for ch in body:
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        cur.append(ch)
    parts.append("".join(cur))
    return parts


def _range_items(body: str, pattern: str) -> list[str] | None:
    """The items of a ``a..b[..step]`` numeric or letter range, or None when ``body`` is not one."""
    m = _RANGE.match(body)
    if m:
        lo_s, hi_s, step_s = m.group(1), m.group(2), m.group(3)
        lo, hi = int(lo_s), int(hi_s)
        step = abs(int(step_s)) if step_s else 1
        if step == 0:
            raise DataError(f"shard spec {pattern!r}: range step must not be 0")
        padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-").startswith("0") for s in (lo_s, hi_s))
        width = max(len(lo_s), len(hi_s)) if padded else 0
        values = range(lo, hi + 1, step) if lo <= hi else range(lo, hi - 1, -step)
        return [f"{v:0{width}d}" for v in values]
    m = _CHAR_RANGE.match(body)
    if m:
        lo, hi = ord(m.group(1)), ord(m.group(2))
        values = range(lo, hi + 1) if lo <= hi else range(lo, hi - 1, -1)
        return [chr(v) for v in values]
    return None


def expand_braces(pattern: str) -> list[str]:
    """All strings a brace pattern denotes, in order (``a{1,2}b{x..y}`` -> a1bx a1by a2bx a2by)."""
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise DataError(f"shard spec {pattern!r} has an unmatched '}}'")
        return [pattern]
    if "}" in pattern[:start]:
        raise DataError(f"shard spec {pattern!r} has an unmatched '}}'")
    end = _matching_brace(pattern, start)
    if end < 0:
        raise DataError(f"shard spec {pattern!r} has an unmatched '{{'")
    head, body, tail = pattern[:start], pattern[start + 1 : end], pattern[end + 1 :]
    items = _range_items(body, pattern)
    if items is None:
        alternatives = _split_top_level(body)
        if len(alternatives) == 1:  # '{x}' without comma or range stays literal, as in bash
            items = ["{" + x + "}" for x in expand_braces(body)]
        else:
            items = [x for alt in alternatives for x in expand_braces(alt)]
    tails = expand_braces(tail)
    return [head + item + t for item in items for t in tails]


def split_specs(spec: str | Sequence[str]) -> list[str]:
    """The individual specs of a ``::``-separated string (or of a list of such strings)."""
    raw = [spec] if isinstance(spec, str) else list(spec)
    parts = [p.strip() for s in raw for p in str(s).split("::")]
    parts = [p for p in parts if p]
    if not parts:
        raise DataError("empty shard spec: pass a path such as /data/{00000..00099}.tar")
    return parts


def resolve_shards(spec: str | Sequence[str]) -> list[str]:
    """Expand a shard spec into the list of shards (existing files, commands, URLs), in order.

    A local spec whose expansion matches no existing file raises DataError naming it; shards
    missing from an otherwise matching spec (img2dataset leaves gaps when a shard fails) are
    skipped with one warning per spec. Remote specs are expanded only; a URL scheme that no
    installed package can open raises DataError.
    """
    shards: list[str] = []
    for part in split_specs(spec):
        if is_remote(part):
            shards.extend(_remote_shards(part))
            continue
        paths = [os.path.expanduser(p) for p in expand_braces(part)]
        existing = [p for p in paths if os.path.isfile(p)]
        if not existing:
            dirs = [p for p in paths if os.path.isdir(p)]
            hint = (
                f"{dirs[0]!r} is a directory: name the shards, "
                f"e.g. {dirs[0]}/{{000000..000009}}.tar"
                if dirs
                else "check the directory and the brace range"
            )
            raise DataError(
                f"shard spec {part!r} matches no existing file "
                f"({len(paths)} candidate path(s), first {paths[0]!r}); {hint}"
            )
        if len(existing) < len(paths):
            missing = [p for p in paths if not os.path.isfile(p)]
            warnings.warn(
                f"{len(missing)} of {len(paths)} shards of spec {part!r} do not exist and are "
                f"skipped (first: {missing[0]!r})",
                stacklevel=2,
            )
        shards.extend(existing)
    return shards


def _remote_shards(part: str) -> list[str]:
    """The shards of one remote spec (brace-expanded), after checking it can be opened here."""
    urls = expand_braces(part)
    if is_pipe(part):
        if not part[len("pipe:") :].strip():
            raise DataError(f"shard spec {part!r} has an empty command after 'pipe:'")
        return urls
    if not part.startswith(HTTP_PREFIXES):
        problem = check_fsspec_scheme(urls[0])
        if problem:
            raise DataError(f"shard spec {problem}")
    return urls
