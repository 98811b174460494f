"""Tokenizers: CLIP BPE ids equal open_clip 3.3.0's; SentencePiece wrapper rules; errors."""

from __future__ import annotations

import gzip
import pickle
import random
import unicodedata

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megaclip.cli.common import TOKENIZER_CHOICES
from megaclip.errors import ConfigError, DataError
from megaclip.tokenizer import (
    TOKENIZER_KINDS,
    ClipTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    build_tokenizer,
)
from megaclip.tokenizer.bpe import build_pretokenizer, clean_caption

# --------------------------------------------------------------------------- caption corpus

_NOUNS = ["cat", "dog", "bicycle", "mountain", "skyscraper", "pizza", "violin", "river"]
_ADJS = ["red", "fluffy", "ancient", "tiny", "gigantic", "blurry", "neon-lit", "wet"]
_PLACES = ["beach", "kitchen", "forest", "city at night", "desert", "museum"]
_FRAGMENTS = [
    # punctuation and symbols
    "Hello, world!!! (really?) -- yes; no: maybe...",
    "#sunset @user $5.99 100% a/b c\\d [x] {y} <z> ~tilde~ ^caret^ `tick` |pipe| _under_",
    "e-mail: someone@example.com, url https://example.org/a?b=c&d=e#frag",
    # numbers
    "1234567 3.14159 1,000,000 2nd 3rd 10x 007 -42 +1e-9",
    # contractions, straight and curly, all cases
    "don't it's we're they've I'm you'll he'd DON'T IT'S We'Re",
    "don\u2019t it\u2019s \u201cquoted\u201d \u2018single\u2019 it'\u017f",
    # accented Latin, other scripts
    "Café crème brûlée naïve façade Ångström Øresund São Paulo",
    "Cafe\u0301 decomposed e\u0301 and n\u0303",
    "αβγ Δελφοί Москва Здравствуй",
    "مرحبا שלום नमस्ते สวัสดี",
    "Stra\u00dfe \u1e9e \u0130stanbul \u0131 \u00b5 \u212b \u212a",
    # CJK, kana, hangul, full/half width
    "東京の夜景 北京烤鸭 猫が寝ている",
    "カタカナ ｶﾀｶﾅ 한국어 문장",
    "\uff21\uff22\uff23\uff11\uff12\uff13\uff01 \u3000ideographic\u3000space",
    # emoji, ZWJ sequences, flags, skin tones
    "\U0001f600 \U0001f431\U0001f436 \U0001f468\u200d\U0001f469\u200d\U0001f467"
    " \U0001f1eb\U0001f1f7",
    "\U0001f44d\U0001f3fd thumbs \u2764\ufe0f love \u2603 snow \u2728",
    # HTML entities (double-escaped too), and a literal '<' that turns off ftfy's own unescape
    "&amp; &lt;b&gt; &quot;quoted&quot; &#39; &#x27; &amp;amp; &nbsp;x &eacute;t\u00e9",
    "a < b &amp;&amp; c &gt; d",
    # whitespace of every kind
    "  lots   of\t\ttabs\nand\r\nnewlines\u00a0nbsp\u2003em\u2009thin  ",
    # other numerics, ligatures, marks, controls
    "x\u00b2 \u00bd \u216b \u2460 \u0663\u0664 \u0f33 \ufb01ne \ufb02ow \u0133",
    "\x00ctrl\x07bell\x1bESC\x7fdel\ufeffbom \u200bzero\u200cwidth",
    "\u0345a\u0345 \u03b1\u0345",
    # special token strings inside captions
    "<start_of_text> inside <end_of_text> and <START_OF_TEXT>",
    # mojibake that ftfy repairs
    "Caf\u00c3\u00a9 \u00e2\u20ac\u0153smart quotes\u00e2\u20ac\u009d",
]


def caption_corpus(n_random: int = 300, seed: int = 1234) -> list[str]:
    """Fixed edge cases + n_random deterministic mixtures of templates and fragments."""
    rng = random.Random(seed)
    fixed = ["", " ", "\n\t ", "a", "A", "'", "'s", "..."] + list(_FRAGMENTS)
    fixed += [" ".join(["word"] * 120), "supercalifragilisticexpialidocious " * 20]
    out = list(fixed)
    for _ in range(n_random):
        parts = []
        for _ in range(rng.randint(1, 4)):
            if rng.random() < 0.5:
                parts.append(
                    f"a photo of a {rng.choice(_ADJS)} {rng.choice(_NOUNS)} "
                    f"in the {rng.choice(_PLACES)}"
                )
            else:
                parts.append(rng.choice(_FRAGMENTS))
        text = rng.choice([" ", "  ", ", ", ". ", "\n"]).join(parts)
        mode = rng.random()
        if mode < 0.2:
            text = text.upper()
        elif mode < 0.3:
            text = text.title()
        if rng.random() < 0.1:  # very long: must be truncated
            text = " ".join([text] * rng.randint(5, 12))
        out.append(text)
    return out


CORPUS = caption_corpus()


@pytest.fixture(scope="module")
def open_clip_tokenizer():
    """open_clip's default (OpenAI CLIP) tokenizer, the reference."""
    open_clip = pytest.importorskip("open_clip")
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def tok() -> ClipTokenizer:
    """Our tokenizer with the bundled vocabulary."""
    return ClipTokenizer()


# --------------------------------------------------------------------------- CLIP BPE vs open_clip


def test_corpus_is_varied_and_exercises_truncation(tok: ClipTokenizer) -> None:
    lengths = [len(tok.encode(t)) for t in CORPUS]
    assert len(CORPUS) >= 300
    assert min(lengths) == 0
    assert sum(n + 2 > 77 for n in lengths) >= 20  # plenty of truncated rows


def test_ids_equal_open_clip(tok: ClipTokenizer, open_clip_tokenizer) -> None:
    ours = tok(CORPUS)
    ref = open_clip_tokenizer(CORPUS)
    assert ours.dtype == torch.long and ours.shape == (len(CORPUS), 77)
    mismatched = [CORPUS[i] for i in range(len(CORPUS)) if not torch.equal(ours[i], ref[i])]
    assert not mismatched, f"{len(mismatched)} captions differ, first: {mismatched[0]!r}"


def test_encode_equals_open_clip_untruncated(tok: ClipTokenizer, open_clip_tokenizer) -> None:
    for text in CORPUS:
        assert tok.encode(text) == open_clip_tokenizer.encode(text), text


@pytest.mark.parametrize("ctx", [1, 2, 5, 16, 77, 128])
def test_context_lengths_equal_open_clip(tok: ClipTokenizer, open_clip_tokenizer, ctx) -> None:
    texts = CORPUS[:60]
    assert torch.equal(tok(texts, context_length=ctx), open_clip_tokenizer(texts, ctx))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(text=st.text(max_size=40))
def test_random_unicode_equals_open_clip(text: str) -> None:
    open_clip = pytest.importorskip("open_clip")
    ref = open_clip.tokenizer.tokenize([text])
    assert torch.equal(ClipTokenizer()([text]), ref)


def test_special_ids_and_layout(tok: ClipTokenizer) -> None:
    assert (tok.vocab_size, tok.sot_token_id, tok.eot_token_id) == (49408, 49406, 49407)
    row = tok("a photo of a cat")[0]
    assert row[0] == 49406 and row[6] == 49407 and row[7:].eq(0).all()
    long = tok(" ".join(["cat"] * 200))[0]
    assert long[0] == 49406 and long[-1] == 49407 and long[1:-1].ne(0).all()
    assert tok([]).shape == (0, 77)


def test_single_string_and_list_agree(tok: ClipTokenizer) -> None:
    assert torch.equal(tok("two dogs"), tok(["two dogs"]))


def test_decode_round_trip_plain_text(tok: ClipTokenizer) -> None:
    rng = random.Random(7)
    letters = "abcdefghijklmnopqrstuvwxyz\u00e9\u00fc\u6771\u4eac"
    for _ in range(200):
        words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 12)))]
        words += ["".join(rng.choice(letters) for _ in range(rng.randint(1, 12))) for _ in range(9)]
        text = rng.choice(["", "  "]) + "  ".join(words).upper() + rng.choice(["", "\n"])
        expected = " ".join(text.split()).lower()
        assert tok.decode(tok.encode(text)) == expected
        assert tok.decode(tok(text, context_length=200)[0]) == expected


def test_decode_raw_equals_open_clip(tok: ClipTokenizer, open_clip_tokenizer) -> None:
    for row in tok(CORPUS[:40]):
        assert tok.decode(row, skip_special_tokens=False) == open_clip_tokenizer.decode(
            row.tolist()
        )
    with pytest.raises(DataError, match="outside the vocabulary"):
        tok.decode([49408])


def test_pickle_round_trip(tok: ClipTokenizer) -> None:
    clone = pickle.loads(pickle.dumps(tok))
    assert len(pickle.dumps(tok)) < 1000  # ships the path, not the 49k-entry tables
    assert torch.equal(clone(CORPUS[:20]), tok(CORPUS[:20]))


# --------------------------------------------------------------------------- fallbacks


def test_stdlib_pretokenizer_equals_regex_on_bmp_and_corpus() -> None:
    stdlib, reference = build_pretokenizer("stdlib"), build_pretokenizer("regex")
    for cp in range(0x10000):
        char = chr(cp)
        if unicodedata.category(char) in ("Cn", "Cs"):
            continue  # unassigned in Python's Unicode tables: documented difference
        probe = f"a{char}1{char}{char} {char}'s"
        assert stdlib(probe) == reference(probe), hex(cp)
    for text in CORPUS:
        cleaned = clean_caption(text)
        assert stdlib(cleaned) == reference(cleaned)


def test_fallback_cleaning_matches_ftfy_except_mojibake() -> None:
    pytest.importorskip("ftfy")
    texts = [t for t in CORPUS if "\u20ac" not in t]  # skip captions with the mojibake fragment
    for text in texts:
        assert clean_caption(text, use_ftfy=False) == clean_caption(text, use_ftfy=True), text
    mojibake = "Caf\u00c3\u00a9"
    assert clean_caption(mojibake, use_ftfy=True) == "caf\u00e9"
    assert clean_caption(mojibake, use_ftfy=False) != "caf\u00e9"  # documented limitation


def test_without_ftfy_and_regex_ids_equal_open_clip(monkeypatch, open_clip_tokenizer) -> None:
    import megaclip.tokenizer.bpe as bpe

    monkeypatch.setattr(bpe, "_ftfy", None)
    monkeypatch.setattr(bpe, "_regex", None)
    tok = ClipTokenizer()
    assert tok._pretokenize == build_pretokenizer("stdlib")
    texts = [t for t in CORPUS if "\u20ac" not in t]  # mojibake repair needs ftfy
    assert len(texts) > 250
    assert torch.equal(tok(texts), open_clip_tokenizer(texts))


def test_unknown_pretokenizer_backend() -> None:
    with pytest.raises(ConfigError, match="auto, regex or stdlib"):
        build_pretokenizer("pcre")


# --------------------------------------------------------------------------- errors, factory


def test_bad_bpe_files(tmp_path) -> None:
    with pytest.raises(DataError, match="not found"):
        ClipTokenizer(str(tmp_path / "missing.txt.gz"))
    plain = tmp_path / "plain.txt.gz"
    plain.write_text("not gzip")
    with pytest.raises(DataError, match="cannot read"):
        ClipTokenizer(str(plain))
    short = tmp_path / "short.txt.gz"
    with gzip.open(short, "wt", encoding="utf-8") as handle:
        handle.write("#version: 0.2\ni n\nt h\n")
    with pytest.raises(DataError, match="has 2 merges"):
        ClipTokenizer(str(short))


def test_bad_inputs(tok: ClipTokenizer) -> None:
    with pytest.raises(DataError, match="caption 1 is NoneType"):
        tok(["ok", None])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="context_length"):
        tok("x", context_length=0)
    with pytest.raises(ConfigError, match="context_length"):
        ClipTokenizer(context_length=0)


def test_build_tokenizer(tmp_path) -> None:
    clip = build_tokenizer("clip_bpe", context_length=32)
    assert isinstance(clip, ClipTokenizer) and isinstance(clip, Tokenizer)
    assert clip("a dog").shape == (1, 32)
    with pytest.raises(ConfigError, match="valid kinds: clip_bpe, sentencepiece"):
        build_tokenizer("wordpiece")
    with pytest.raises(ConfigError, match="needs a path"):
        build_tokenizer("sentencepiece")
    assert TOKENIZER_KINDS == ("clip_bpe", "sentencepiece")
    assert TOKENIZER_CHOICES == TOKENIZER_KINDS  # the CLI's --tokenizer choices


# --------------------------------------------------------------------------- SentencePiece


def _train_spm(directory, name: str, pad_id: int) -> str:
    """Train a tiny unigram model on generated sentences; return the .model path."""
    sentencepiece = pytest.importorskip("sentencepiece")
    rng = random.Random(99)
    sentences = [
        f"a photo of a {rng.choice(_ADJS)} {rng.choice(_NOUNS)} in the {rng.choice(_PLACES)}"
        for _ in range(300)
    ] + [f"{i} {rng.choice(_NOUNS)}s and {rng.choice(_NOUNS)}s" for i in range(100)]
    syllables = ["ka", "lo", "mi", "tre", "sun", "pol", "vex", "qui", "dra", "zen"]
    sentences += [
        " ".join("".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(8))
        for _ in range(200)
    ]
    prefix = str(directory / name)
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=prefix,
        vocab_size=120,
        model_type="unigram",
        pad_id=pad_id,
        num_threads=1,
        minloglevel=2,
    )
    return prefix + ".model"


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory):
    """(model with a pad piece at id 3, model without pad piece)."""
    directory = tmp_path_factory.mktemp("spm")
    return _train_spm(directory, "with_pad", 3), _train_spm(directory, "no_pad", -1)


def _expected_rows(texts, ids, bos, eos, pad, ctx, add_bos, add_eos):
    """Reference packing written out longhand."""
    rows = []
    for piece_ids in ids:
        row = ([bos] if add_bos else []) + list(piece_ids) + ([eos] if add_eos else [])
        if len(row) > ctx:
            row = row[:ctx]
            if add_eos:
                row[-1] = eos
        rows.append(row + [pad] * (ctx - len(row)))
    return torch.tensor(rows, dtype=torch.long)


@pytest.mark.parametrize("add_bos,add_eos", [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize("ctx", [4, 12, 77])
def test_sentencepiece_ids(spm_models, add_bos, add_eos, ctx) -> None:
    import sentencepiece

    texts = ["a photo of a wet cat", "", "gigantic violins in the museum " * 6, "7 dogs"]
    for model_path, pad in zip(spm_models, (3, 0)):
        sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        tok = SentencePieceTokenizer(
            model_path, context_length=ctx, add_bos=add_bos, add_eos=add_eos
        )
        ids = [sp.encode(t, out_type=int) for t in texts]
        expected = _expected_rows(texts, ids, sp.bos_id(), sp.eos_id(), pad, ctx, add_bos, add_eos)
        assert torch.equal(tok(texts), expected)
        assert tok.encode(texts[0]) == ids[0]
        assert (tok.vocab_size, tok.eot_token_id, tok.pad_token_id) == (120, sp.eos_id(), pad)


def test_sentencepiece_decode_pickle_factory(spm_models) -> None:
    tok = build_tokenizer("sentencepiece", path=spm_models[0], context_length=64)
    assert isinstance(tok, SentencePieceTokenizer) and isinstance(tok, Tokenizer)
    text = "a photo of a tiny dog in the forest"
    assert tok.decode(tok(text)[0]) == text
    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone([text, "red river"]), tok([text, "red river"]))


def test_sentencepiece_bad_files(tmp_path, spm_models) -> None:
    with pytest.raises(DataError, match="not found"):
        SentencePieceTokenizer(str(tmp_path / "missing.model"))
    for name, payload in [("text.model", b"hello, not a model\n"), ("empty.model", b"")]:
        bad = tmp_path / name
        bad.write_bytes(payload)
        with pytest.raises(DataError, match="is not a valid SentencePiece model"):
            SentencePieceTokenizer(str(bad))
    vocab_file = spm_models[0][: -len(".model")] + ".vocab"
    with pytest.raises(DataError, match=r"\.model file"):
        SentencePieceTokenizer(vocab_file)
