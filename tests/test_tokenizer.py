"""The torch-free tokenizer must give exactly open_clip's token ids."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retrieval.embedding.tokenizer import _FTFY_NOOP, ClipTokenizer, default_tokenizer, find_vocab_file

REPO = Path(__file__).resolve().parents[1]

HANDWRITTEN = [
    "",
    " ",
    "   \t\n  \r\n ",
    "\u3000\u00a0\u2003",
    "a photo of a dog",
    "A Photo Of A DOG",
    "a photo of a cat.",
    "Hello, World!!! ...",
    "don't won't I'LL we'VE they're she'd it's 'S 's",
    "rock'n'roll o'clock",
    "3.14159 and 1,000,000 and 2024-06-01 12:30",
    "１２３ full-width ＡＢＣ",
    "٣٤٥ arabic-indic digits",
    "Ⅻ roman numeral, ½ vulgar fraction, ² superscript",
    "café naïve résumé",
    "cafe\u0301 with a combining accent",
    "İstanbul ß Straße ǅ ﬁ ligature",
    "Kelvin sign \u212a and ohm \u2126",
    "東京タワーの写真",
    "한국어 문장입니다",
    "Привет, мир",
    "γειά σου κόσμε",
    "مرحبا بالعالم",
    "שלום עולם",
    "नमस्ते दुनिया",
    "ไทย ภาษา",
    "😀 😃 😄 🐶🐱🐭",
    "👩‍👩‍👧‍👦 family emoji with zero-width joiners",
    "👍🏽 skin tone, 🇫🇷 flag, ❤️ heart",
    "zero\u200bwidth\u200bspace",
    "control \x00 \x07 \x7f chars",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;apos&#39; &#x263A;",
    "&amp;amp; double escaped &amp;lt;tag&amp;gt;",
    "&nbsp;non&nbsp;breaking",
    "<p>&amp;lt;tag&amp;gt; &amp;amp; with markup, so ftfy leaves the entities alone</p>",
    "it'\u017f long s, <\u017ftart_of_text> folds to a special token's pattern",
    "mojibake: Ã©tÃ© â€œquotesâ€\x9d",
    "<start_of_text> literal special tokens <end_of_text>",
    "<START_OF_TEXT>upper<END_OF_TEXT>",
    "&lt;end_of_text&gt; escaped special",
    "<start_of_text><end_of_text><start_of_text>",
    "email@example.com https://example.com/path?q=1&x=2#frag",
    "snake_case_words and camelCaseWords and kebab-case",
    "!!!???...,,,;;;:::---___===+++",
    "$100 €50 £30 ¥1000 ₹20",
    "((nested [brackets] {braces} <angles>))",
    "tabs\tand\nnewlines\r\nmixed",
    "a" * 500,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "pneumonoultramicroscopicsilicovolcanoconiosis " * 5,
    " ".join(str(i) for i in range(200)),
    "the quick brown fox jumps over the lazy dog " * 20,
    "a photo of " + "very " * 100 + "big dog",
    "🐶" * 60,
]

# Boundaries of the truncation: 74..78 word tokens around the 75 that fit between start and end.
BOUNDARY = [" ".join(["dog"] * k) for k in range(72, 80)]

POOL = (
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    + "      \t\n"
    + "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
    + "àáâãäåæçèéêëìíîïñòóôõöøùúûüýÿßÀÉÖÜ"
    + "αβγδεζηθλμπσωΩДЖЯжя"
    + "日本語中文字한국어"
    + "😀🐶🎉👍🏽❤️🇯🇵\u200d\ufe0f"
    + "１２３٣٤½²Ⅻ"
    + "\u0301\u0308\u200b\u00a0\u3000\u212a\ufb01"
)
ENTITIES = ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;", "&nbsp;", "&eacute;", "&#x1F600;", "'s", "'ll"]


def _random_texts(n: int, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        pieces = []
        for _ in range(rng.randint(0, 60)):
            if rng.random() < 0.08:
                pieces.append(rng.choice(ENTITIES))
            else:
                pieces.append("".join(rng.choice(POOL) for _ in range(rng.randint(1, 8))))
        texts.append(" ".join(pieces) if rng.random() < 0.7 else "".join(pieces))
    return texts


TEXTS = HANDWRITTEN + BOUNDARY + _random_texts(300)


@pytest.fixture(scope="module")
def reference() -> Any:
    open_clip = pytest.importorskip("open_clip")
    return open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


def test_vocabulary_matches_open_clip(reference: Any, tokenizer: ClipTokenizer) -> None:
    assert tokenizer.vocab.encoder == reference.encoder
    assert tokenizer.vocab.ranks == {" ".join(pair): rank for pair, rank in reference.bpe_ranks.items()}
    assert tokenizer.sot_token_id == reference.sot_token_id
    assert tokenizer.eot_token_id == reference.eot_token_id


def test_token_ids_equal_open_clip(reference: Any, tokenizer: ClipTokenizer) -> None:
    assert len(TEXTS) >= 300
    ours = tokenizer(TEXTS)
    theirs = reference(TEXTS).numpy()
    assert ours.dtype == np.int64
    assert ours.shape == theirs.shape == (len(TEXTS), 77)
    mismatched = [TEXTS[i] for i in np.flatnonzero((ours != theirs).any(axis=1))]
    assert not mismatched, f"{len(mismatched)} texts differ, e.g. {mismatched[:3]!r}"


def test_texts_exercise_truncation_and_specials(tokenizer: ClipTokenizer) -> None:
    """Guard the test data itself: it must reach the cases it claims to cover."""
    ids = tokenizer(TEXTS)
    full = ids[:, -1] != 0
    assert full.sum() >= 5 and (ids[full, -1] == tokenizer.eot_token_id).all()
    assert ((ids[:, 1:-1] == tokenizer.sot_token_id) | (ids[:, 1:-1] == tokenizer.eot_token_id)).any()
    assert (ids[:, 2] == 0).any()  # empty and whitespace-only texts: start, end, padding


@pytest.mark.parametrize("context_length", [1, 2, 5, 16, 100])
def test_other_context_lengths(reference: Any, tokenizer: ClipTokenizer, context_length: int) -> None:
    texts = HANDWRITTEN + BOUNDARY
    ours = tokenizer(texts, context_length=context_length)
    np.testing.assert_array_equal(ours, reference(texts, context_length=context_length).numpy())


def test_single_string_and_empty_batch(tokenizer: ClipTokenizer) -> None:
    np.testing.assert_array_equal(tokenizer("a dog"), tokenizer(["a dog"]))
    empty = tokenizer([])
    assert empty.shape == (0, 77) and empty.dtype == np.int64


def test_word_cache(tokenizer: ClipTokenizer) -> None:
    tokenizer(["cachedword cachedword"])
    before = tokenizer.cache_info().hits
    tokenizer(["cachedword"])
    assert tokenizer.cache_info().hits > before


def test_default_tokenizer_is_shared() -> None:
    assert default_tokenizer() is default_tokenizer()
    assert find_vocab_file().is_file()


def test_ftfy_is_skipped_only_where_it_changes_nothing() -> None:
    """clean() skips ftfy.fix_text for text _FTFY_NOOP matches; that must be text ftfy returns as is."""
    ftfy = pytest.importorskip("ftfy")
    plain = "".join(chr(c) for c in range(128) if _FTFY_NOOP.fullmatch(chr(c)))
    assert "&" not in plain and "\x1b" not in plain and "\x00" not in plain and "\x7f" not in plain
    rng = random.Random(7)
    words = ["'s", "&", "#39;", "lt;", "<b>", "</b>", "\r\n", "\r", "  ", "\t", "--", "``", "''", "...", "Ã"]
    texts = [a + b for a in plain for b in plain]  # every pair of characters
    for _ in range(3000):
        texts.append(
            "".join(rng.choice(words) if rng.random() < 0.3 else rng.choice(plain) for _ in range(30))
        )
    skipped = [t for t in texts if _FTFY_NOOP.fullmatch(t)]
    assert len(skipped) > len(plain) ** 2  # pairs, plus random texts without '&' or 'Ã'
    changed = [t for t in skipped if ftfy.fix_text(t) != t]
    assert not changed, f"ftfy changes {len(changed)} skipped texts, e.g. {changed[:3]!r}"


def test_import_does_not_load_torch() -> None:
    code = (
        "import retrieval.embedding.tokenizer, sys\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'open_clip' not in sys.modules, 'open_clip imported'\n"
        "tok = retrieval.embedding.tokenizer.ClipTokenizer()\n"
        "tok(['a photo of a dog'])\n"
        "assert 'ftfy' not in sys.modules, 'ftfy imported for plain ASCII'\n"
        "tok(['a caf\\u00e9'])\n"
        "assert 'ftfy' in sys.modules, 'ftfy not used for non-ASCII'\n"
        "assert 'torch' not in sys.modules, 'torch imported by tokenizing'\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
