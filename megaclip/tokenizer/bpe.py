"""CLIP byte-level BPE tokenizer whose ids equal open_clip's default (OpenAI CLIP) tokenizer.

Pipeline for one caption (see docs/tokenizers.md):

1. clean: ``ftfy.fix_text`` when ftfy is importable (else a documented approximation),
   ``html.unescape`` twice, strip, collapse whitespace runs to one space, lowercase;
2. pre-tokenize with the CLIP pattern (special tokens, English contractions, letter runs,
   single digits, runs of other non-space characters), case-insensitive as OpenAI's;
3. map each pre-token's UTF-8 bytes to printable characters (the GPT-2 byte map), mark its last
   symbol with ``</w>`` and apply the ranked merges of ``bpe_simple_vocab_16e6.txt.gz``;
4. wrap in ``<start_of_text>`` (49406) / ``<end_of_text>`` (49407), truncate to the context
   length keeping the end token last, pad with 0.
"""

from __future__ import annotations

import functools
import gzip
import html
import html.entities
import os
import re as _stdlib_re
import unicodedata
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch

from megaclip.errors import ConfigError, DataError

try:  # ftfy repairs mojibake etc.; open_clip always applies it
    import ftfy as _ftfy
except ImportError:  # pragma: no cover - exercised through clean_caption(use_ftfy=False)
    _ftfy = None

try:  # the `regex` package knows \p{L} / \p{N}; stdlib `re` does not
    import regex as _regex
except ImportError:  # pragma: no cover - exercised through build_pretokenizer("stdlib")
    _regex = None

DEFAULT_CONTEXT_LENGTH = 77
SOT_TEXT = "<start_of_text>"
EOT_TEXT = "<end_of_text>"
SPECIAL_TOKENS = (SOT_TEXT, EOT_TEXT)
END_OF_WORD = "</w>"
# OpenAI's vocabulary: 256 byte symbols, their 256 end-of-word forms, 48894 merges, 2 specials.
NUM_MERGES = 49152 - 256 - 2
VOCAB_SIZE = 2 * 256 + NUM_MERGES + len(SPECIAL_TOKENS)

_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# Whitespace as the `regex` package's \s sees it (Unicode White_Space property).
_WHITE_SPACE = frozenset(
    [*range(0x09, 0x0E), 0x20, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B)]
    + [0x2028, 0x2029, 0x202F, 0x205F, 0x3000]
)
# U+0345 (a combining mark) case-folds to a Greek letter, so under OpenAI's case-insensitive
# pattern it matches neither [\p{L}] nor [^\s\p{L}\p{N}]: it is silently dropped.
_DROPPED_CODEPOINTS = frozenset([0x345])


def default_bpe_path() -> str:
    """Path of the OpenAI CLIP merges file shipped inside this package."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")


# --------------------------------------------------------------------------- byte map


@functools.lru_cache(maxsize=1)
def byte_to_unicode() -> Mapping[int, str]:
    """Reversible map byte -> printable char: printable Latin-1 bytes map to themselves,
    the other 68 bytes (controls, space, soft hyphen...) to U+0100.. in byte order.

    Iteration order (printable bytes first, then the shifted ones) is the order of the first
    256 vocabulary ids."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    keep = set(printable)
    shifted = (b for b in range(256) if b not in keep)
    table = {b: chr(b) for b in printable}
    for offset, b in enumerate(shifted):
        table[b] = chr(256 + offset)
    return MappingProxyType(table)


@functools.lru_cache(maxsize=1)
def unicode_to_byte() -> Mapping[str, int]:
    """Inverse of :func:`byte_to_unicode`."""
    return MappingProxyType({c: b for b, c in byte_to_unicode().items()})


# --------------------------------------------------------------------------- cleaning

_SINGLE_QUOTES = {cp: "'" for cp in (0x02BC, 0x2018, 0x2019, 0x201A, 0x201B)}
_DOUBLE_QUOTES = {cp: '"' for cp in range(0x201C, 0x2020)}
_LIGATURE_CODEPOINTS = [0x132, 0x133, 0x149, *range(0x1C4, 0x1CD), *range(0x1F1, 0x1F4)]
_LIGATURE_CODEPOINTS += list(range(0xFB00, 0xFB07))
_CONTROL_CODEPOINTS = [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070)]
_CONTROL_CODEPOINTS += [0xFEFF, *range(0xFFF9, 0xFFFD)]


@functools.lru_cache(maxsize=1)
def _fallback_translation() -> dict[int, str | None]:
    """str.translate table of the ftfy fixes that need no heuristics (see fallback_fix_text)."""
    table: dict[int, str | None] = {}
    table.update({cp: unicodedata.normalize("NFKC", chr(cp)) for cp in _LIGATURE_CODEPOINTS})
    table[0x3000] = " "
    for cp in range(0xFF01, 0xFFF0):  # fullwidth / halfwidth forms
        folded = unicodedata.normalize("NFKC", chr(cp))
        if folded != chr(cp):
            table[cp] = folded
    table.update(_SINGLE_QUOTES)
    table.update(_DOUBLE_QUOTES)
    table.update({cp: None for cp in _CONTROL_CODEPOINTS})
    return table


_ENTITY = _stdlib_re.compile(r"&#?[0-9A-Za-z]{1,24};")


def _resolve_entity(match: _stdlib_re.Match[str]) -> str:
    """One ``&name;`` / ``&#n;``: HTML5 named entity, an all-caps spelling of a lower-case one
    (``&EACUTE;`` -> "É"), or a numeric reference; anything else is left as written."""
    entity = match.group(0)
    name = entity[1:]
    if name in html.entities.html5:
        return html.entities.html5[name]
    if name.startswith("#"):
        decoded = html.unescape(entity)
        return entity if ";" in decoded else decoded
    lower = name.lower()
    if name == name.upper() and lower in html.entities.html5 and html.unescape(entity) == entity:
        return html.entities.html5[lower].upper()
    return entity


def _unescape_lines_until_markup(text: str) -> str:
    """Decode entities line by line, and no more from the first line holding a '<' on
    (ftfy's 'auto' HTML rule: a literal '<' means real markup whose entities must stay)."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if "<" in line:
            break
        lines[i] = _ENTITY.sub(_resolve_entity, line)
    return "".join(lines)


def fallback_fix_text(text: str) -> str:
    """ftfy-free approximation of ``ftfy.fix_text``: semicolon-terminated HTML entities (also
    all-caps ones) decoded unless markup is present, Latin ligatures and full/half-width forms
    -> NFKC, curly quotes -> straight, invisible control characters removed, then NFC.

    Not reproduced: mojibake repair, C1-control and terminal-escape fixes, surrogate pairs."""
    text = _unescape_lines_until_markup(text)
    return unicodedata.normalize("NFC", text.translate(_fallback_translation()))


def clean_caption(text: str, use_ftfy: bool | None = None) -> str:
    """OpenAI/open_clip 'lower' cleaning: fix_text, html.unescape x2, strip, collapse whitespace,
    lowercase. ``use_ftfy=None`` uses ftfy when importable, else :func:`fallback_fix_text`."""
    if use_ftfy is None:
        use_ftfy = _ftfy is not None
    if use_ftfy:
        if _ftfy is None:
            raise ConfigError("use_ftfy=True but ftfy is not installed; `pip install ftfy`")
        text = _ftfy.fix_text(text)
    else:
        text = fallback_fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


# --------------------------------------------------------------------------- pre-tokenizer


def _ranges_class(codepoints: Iterable[int]) -> str:
    """Regex character-class body covering the sorted code points as escaped ranges."""
    parts: list[str] = []
    start = prev = None
    for cp in codepoints:
        if prev is not None and cp == prev + 1:
            prev = cp
            continue
        if start is not None:
            parts.append(f"\\U{start:08x}-\\U{prev:08x}" if prev > start else f"\\U{start:08x}")
        start = prev = cp
    if start is not None:
        parts.append(f"\\U{start:08x}-\\U{prev:08x}" if prev > start else f"\\U{start:08x}")
    return "".join(parts)


def _alternation_head() -> str:
    """Special tokens then contractions, in OpenAI's order (first match wins)."""
    return "|".join([*SPECIAL_TOKENS, *_CONTRACTIONS])


@functools.lru_cache(maxsize=2)
def build_pretokenizer(backend: str = "auto") -> Callable[[str], list[str]]:
    """Return ``findall(text) -> pre-tokens`` for the CLIP pattern
    ``specials|'s|'t|'re|'ve|'m|'ll|'d|\\p{L}+|\\p{N}|[^\\s\\p{L}\\p{N}]+`` (case-insensitive).

    backend "regex" uses the `regex` package (OpenAI's exact engine); "stdlib" builds explicit
    classes from ``unicodedata`` for `re` (equal for every code point assigned in Python's
    Unicode version; newer letters/digits count as "other"); "auto" prefers "regex"."""
    if backend == "auto":
        backend = "regex" if _regex is not None else "stdlib"
    if backend == "regex":
        if _regex is None:
            raise ConfigError("pre-tokenizer backend 'regex' needs `pip install regex`")
        pattern = _regex.compile(
            _alternation_head() + r"|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", _regex.IGNORECASE
        )
        return pattern.findall
    if backend != "stdlib":
        raise ConfigError(f"unknown pre-tokenizer backend {backend!r}; use auto, regex or stdlib")
    letters: list[int] = []
    numbers: list[int] = []
    other: list[int] = []
    for cp in range(0x110000):
        if cp in _WHITE_SPACE or cp in _DROPPED_CODEPOINTS:
            continue
        major = unicodedata.category(chr(cp))[0]
        (letters if major == "L" else numbers if major == "N" else other).append(cp)
    pattern = _stdlib_re.compile(
        f"(?i:{_alternation_head()})"
        f"|[{_ranges_class(letters)}]+|[{_ranges_class(numbers)}]|[{_ranges_class(other)}]+"
    )
    return pattern.findall


# --------------------------------------------------------------------------- vocabulary


@dataclass(frozen=True)
class BpeVocab:
    """Read-only CLIP vocabulary: symbol -> id, merge pair -> rank, id -> symbol."""

    token_to_id: Mapping[str, int]
    id_to_token: tuple[str, ...]
    merge_ranks: Mapping[tuple[str, str], int]


@functools.lru_cache(maxsize=4)
def load_bpe_vocab(path: str) -> BpeVocab:
    """Parse a gzipped CLIP merges file (header line, then ``a b`` per line) into a BpeVocab.

    Ids: 256 byte symbols (byte-map order), the same with ``</w>``, the first 48894 merges
    in rank order, then ``<start_of_text>``, ``<end_of_text>``. Cached per path and process."""
    if not os.path.isfile(path):
        raise DataError(
            f"CLIP BPE merges file not found: {path}; pass bpe_path=None to use the bundled "
            "bpe_simple_vocab_16e6.txt.gz"
        )
    merges: list[tuple[str, str]] = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as handle:
            handle.readline()  # "#version: ..." header
            for line in handle:
                pair = line.split()
                if len(pair) != 2:
                    raise DataError(
                        f"CLIP BPE merges file {path} line {len(merges) + 2} is {line!r}, "
                        "expected two symbols; supply an OpenAI-format merges file"
                    )
                merges.append((pair[0], pair[1]))
                if len(merges) == NUM_MERGES:
                    break
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as err:
        raise DataError(
            f"cannot read CLIP BPE merges file {path} ({err}); it must be a gzipped text "
            "file like the bundled bpe_simple_vocab_16e6.txt.gz"
        ) from err
    if len(merges) < NUM_MERGES:
        raise DataError(
            f"CLIP BPE merges file {path} has {len(merges)} merges, need {NUM_MERGES}; "
            "supply the full OpenAI merges file"
        )
    symbols = list(byte_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + [a + b for a, b in merges]
    tokens += list(SPECIAL_TOKENS)
    return BpeVocab(
        token_to_id=MappingProxyType({t: i for i, t in enumerate(tokens)}),
        id_to_token=tuple(tokens),
        merge_ranks=MappingProxyType({pair: rank for rank, pair in enumerate(merges)}),
    )


def bpe_merge(symbols: list[str], merge_ranks: Mapping[tuple[str, str], int]) -> list[str]:
    """Greedy BPE: repeatedly merge every non-overlapping left-to-right occurrence of the
    adjacent pair with the lowest rank until no adjacent pair has a rank."""
    inf = len(merge_ranks) + 1
    while len(symbols) > 1:
        best_rank, best = inf, None
        for pair in zip(symbols, symbols[1:]):
            rank = merge_ranks.get(pair, inf)
            if rank < best_rank:
                best_rank, best = rank, pair
        if best is None:
            break
        left, right = best
        merged: list[str] = []
        i, n = 0, len(symbols)
        while i < n:
            if i + 1 < n and symbols[i] == left and symbols[i + 1] == right:
                merged.append(left + right)
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return symbols


# --------------------------------------------------------------------------- tokenizer


def pack_ids(
    rows: Sequence[Sequence[int]], context_length: int, eot_token_id: int, pad_id: int = 0
) -> torch.Tensor:
    """LongTensor [len(rows), context_length]: each row truncated to context_length with its
    last kept id replaced by eot_token_id when it was cut, right-padded with pad_id."""
    if context_length < 1:
        raise ConfigError(f"context_length must be >= 1, got {context_length}")
    packed = []
    for row in rows:
        row = list(row)
        if len(row) > context_length:
            row = row[:context_length]
            row[-1] = eot_token_id
        packed.append(row + [pad_id] * (context_length - len(row)))
    if not packed:
        return torch.zeros(0, context_length, dtype=torch.long)
    return torch.tensor(packed, dtype=torch.long)


def as_text_list(texts: str | Sequence[str]) -> list[str]:
    """One string -> [string]; a sequence of strings -> list; anything else -> DataError."""
    if isinstance(texts, str):
        return [texts]
    out = list(texts)
    for i, text in enumerate(out):
        if not isinstance(text, str):
            raise DataError(
                f"caption {i} is {type(text).__name__}, not str; decode bytes captions "
                "(e.g. .decode('utf-8')) and drop missing ones before tokenizing"
            )
    return out


class ClipTokenizer:
    """OpenAI CLIP byte-level BPE tokenizer; ids equal open_clip's ``tokenize`` (49408 ids)."""

    def __init__(self, bpe_path: str | None = None, context_length: int = DEFAULT_CONTEXT_LENGTH):
        """Load (cached per process) the merges at bpe_path, default: the bundled OpenAI file."""
        if context_length < 1:
            raise ConfigError(f"context_length must be >= 1, got {context_length}")
        self.bpe_path = os.path.abspath(bpe_path) if bpe_path is not None else default_bpe_path()
        self.context_length = context_length
        self._vocab = load_bpe_vocab(self.bpe_path)
        self._byte_map = byte_to_unicode()
        self._pretokenize = build_pretokenizer("regex" if _regex is not None else "stdlib")
        # Per-instance memo of pre-token -> ids (caption vocabularies repeat heavily).
        self._memo: dict[str, tuple[int, ...]] = {}
        self.sot_token_id = self._vocab.token_to_id[SOT_TEXT]
        self.eot_token_id = self._vocab.token_to_id[EOT_TEXT]
        self.pad_token_id = 0

    @property
    def vocab_size(self) -> int:
        """Number of ids (49408 for the OpenAI vocabulary)."""
        return len(self._vocab.id_to_token)

    def __getstate__(self) -> dict[str, object]:
        """Pickle only the path and context length (DataLoader workers reload from cache)."""
        return {"bpe_path": self.bpe_path, "context_length": self.context_length}

    def __setstate__(self, state: dict[str, object]) -> None:
        """Rebuild from the pickled path and context length."""
        self.__init__(state["bpe_path"], state["context_length"])  # type: ignore[misc, arg-type]

    def _word_ids(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-token (byte-mapped, end-of-word marked, merged)."""
        ids = self._memo.get(word)
        if ids is not None:
            return ids
        token_to_id = self._vocab.token_to_id
        if word in SPECIAL_TOKENS:
            ids = (token_to_id[word],)
        else:
            raw = word.encode("utf-8", errors="replace")  # lone surrogates -> '?'
            symbols = [self._byte_map[b] for b in raw]
            symbols[-1] += END_OF_WORD
            ids = tuple(token_to_id[s] for s in bpe_merge(symbols, self._vocab.merge_ranks))
        if len(self._memo) >= 1 << 18:  # bound memory on endless streams of rare words
            self._memo.clear()
        self._memo[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Ids of the cleaned caption, without start/end tokens and without truncation."""
        ids: list[int] = []
        for word in self._pretokenize(clean_caption(text)):
            ids.extend(self._word_ids(word))
        return ids

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of ids: ``</w>`` -> space, bytes decoded as UTF-8 (invalid -> U+FFFD).

        skip_special_tokens=True drops the start token, stops at the first end token (what
        follows is padding) and strips the trailing space; False equals open_clip's decode."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        id_to_token = self._vocab.id_to_token
        pieces: list[str] = []
        for i in ids:
            i = int(i)
            if skip_special_tokens:
                if i == self.eot_token_id:
                    break
                if i == self.sot_token_id:
                    continue
            if not 0 <= i < len(id_to_token):
                raise DataError(f"token id {i} is outside the vocabulary [0, {len(id_to_token)})")
            pieces.append(id_to_token[i])
        to_byte = unicode_to_byte()
        raw = bytes(to_byte[c] for c in "".join(pieces))
        text = raw.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")
        return text.rstrip(" ") if skip_special_tokens else text

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None
    ) -> torch.Tensor:
        """LongTensor [N, ctx]: <start> ids <end>, cut to ctx keeping <end> last, 0-padded."""
        ctx = self.context_length if context_length is None else context_length
        rows = [
            [self.sot_token_id, *self.encode(text), self.eot_token_id]
            for text in as_text_list(texts)
        ]
        return pack_ids(rows, ctx, self.eot_token_id, self.pad_token_id)

    def __repr__(self) -> str:
        """Short description with path and context length."""
        return f"ClipTokenizer(bpe_path={self.bpe_path!r}, context_length={self.context_length})"
