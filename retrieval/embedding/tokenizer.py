"""CLIP's byte-pair-encoding tokenizer without torch or open_clip.

A cold text query needs token ids, and open_clip's tokenizer module imports torch (seconds) just to
return a tensor. This is an independent implementation of the same algorithm, reading open_clip's
own vocabulary file, so the ids are identical (tests/test_tokenizer.py checks that against
`open_clip.get_tokenizer("ViT-B-32")`). Only the default behaviour is reproduced: the 'lower'
cleaning and truncation to the context length; no reduction masks, no extra special tokens.
"""

from __future__ import annotations

import gzip
import html
import importlib.util
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import regex

if TYPE_CHECKING:
    from functools import _CacheInfo

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
DEFAULT_CONTEXT_LENGTH = 77
START = "<start_of_text>"
END = "<end_of_text>"
END_OF_WORD = "</w>"
# The vocabulary holds 256 byte symbols, the same 256 with the end-of-word mark, the merges,
# and the two special tokens: 49408 ids. The file has more merges than that; the rest are unused.
VOCAB_SIZE = 49408
N_MERGES = VOCAB_SIZE - 2 * 256 - 2

# Pre-tokenization: special tokens, English contractions, runs of letters, single digits, runs of
# anything else that is not whitespace. IGNORECASE matters even on lowercased text: `regex` folds
# a few characters that lower() leaves alone (the long s: "it'\u017f" holds a contraction).
_PATTERN = regex.compile(
    "|".join(
        [
            regex.escape(START),
            regex.escape(END),
            *("'" + suffix for suffix in ("s", "t", "re", "ve", "m", "ll", "d")),
            r"[\p{L}]+",
            r"[\p{N}]",
            r"[^\s\p{L}\p{N}]+",
        ]
    ),
    regex.IGNORECASE,
)

# Whitespace other than single interior spaces: the characters str.split() splits on, save "\n"
# (the line separator) and " ", plus doubled, leading and trailing spaces.
_ODD_WHITESPACE = regex.compile(
    "[\t\x0b\x0c\r\x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]|  |^ | $",
    regex.MULTILINE,
)


def _byte_symbols() -> list[tuple[int, str]]:
    """(byte value, its character), in vocabulary order.

    BPE works on strings, so every byte needs a character that is neither whitespace nor a control
    code: printable Latin-1 bytes stand for themselves, the other 68 are shifted past U+00FF. The
    vocabulary lists the printable ones first, then the shifted ones, each group in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    kept = set(printable)
    shifted = [b for b in range(256) if b not in kept]
    return [(b, chr(b)) for b in printable] + [(b, chr(256 + n)) for n, b in enumerate(shifted)]


def find_vocab_file() -> Path:
    """open_clip's vocabulary file, located without importing open_clip (which imports torch)."""
    spec = importlib.util.find_spec("open_clip")  # a top-level name: finds, does not import
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"open_clip is not installed: cannot find its {VOCAB_FILE}")
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / VOCAB_FILE
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{VOCAB_FILE} not found in {list(spec.submodule_search_locations)}")


@dataclass(frozen=True)
class Vocabulary:
    """Token string -> id, and merge -> rank (lower merges first).

    A merge is keyed by its line in the file, "first second", rather than by a (first, second)
    tuple: building 49k tuples is a third of the load time of a cold query's tokenizer.
    """

    encoder: dict[str, int]
    ranks: dict[str, int]

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        merges = _read_merges(path)
        symbols = [symbol for _, symbol in _byte_symbols()]
        tokens = [
            *symbols,
            *(s + END_OF_WORD for s in symbols),
            *(m.replace(" ", "") for m in merges),
            START,
            END,
        ]
        # Should a token or a merge repeat, the later id wins, as in open_clip's dict(zip(...)).
        return cls(
            encoder={token: i for i, token in enumerate(tokens)},
            ranks={merge: i for i, merge in enumerate(merges)},
        )


def _read_merges(path: Path) -> list[str]:
    """The first N_MERGES merge lines, normalised to "first second".

    Only decompresses the head of the file: the merges used are a fifth of its 3 MB.
    """
    buf = bytearray()
    with gzip.open(path, "rb") as f:
        while buf.count(b"\n") <= N_MERGES:
            chunk = f.read(1 << 16)
            if not chunk:
                break
            buf += chunk
    lines = buf.decode("utf-8").split("\n", N_MERGES + 1)[1 : N_MERGES + 1]  # line 0: version header
    if len(lines) < N_MERGES:
        raise ValueError(f"{path}: {len(lines)} merges, expected {N_MERGES}")
    # Keys must equal " ".join(line.split()), as open_clip splits each line. In a well-formed file
    # they already do; checking that is one regex pass, normalising every line is not.
    if _ODD_WHITESPACE.search("\n".join(lines)):
        lines = [" ".join(line.split()) for line in lines]
    return lines


# Text that ftfy.fix_text returns unchanged: ASCII without '&' (HTML entities) and without control
# characters other than tab and newline (ftfy turns \r into \n). Every other fix of ftfy needs a
# non-ASCII character; tests/test_tokenizer.py checks the claim on every pair of such characters and
# on random strings. Most queries are such text, and skipping ftfy for them skips importing it.
_FTFY_NOOP = regex.compile(r"[\t\n\x20-\x25\x27-\x7e]*")


def clean(text: str) -> str:
    """open_clip's 'lower' cleaning: repair mojibake, unescape HTML (twice, for double-escaped
    text), collapse whitespace, lowercase."""
    if not _FTFY_NOOP.fullmatch(text):
        import ftfy

        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """Text -> CLIP token ids, identical to open_clip's default SimpleTokenizer."""

    def __init__(self, vocab_path: Path | None = None, cache_size: int = 1 << 16):
        self.vocab = Vocabulary.load(vocab_path or find_vocab_file())
        self.sot_token_id = self.vocab.encoder[START]
        self.eot_token_id = self.vocab.encoder[END]
        self.vocab_size = len(self.vocab.encoder)
        self._bytes = [""] * 256  # byte value -> its character, indexed for speed
        for value, symbol in _byte_symbols():
            self._bytes[value] = symbol
        # Per instance rather than a decorated method, so the cache does not keep `self` alive.
        self._word_ids = lru_cache(maxsize=cache_size)(self._bpe)

    def cache_info(self) -> _CacheInfo:
        """Hits and misses of the per-word BPE cache."""
        return self._word_ids.cache_info()

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-token (already mapped to byte symbols), by repeatedly merging the
        adjacent pair with the lowest rank, every occurrence left to right, until none ranks."""
        encoder = self.vocab.encoder
        if word in (START, END):
            return (encoder[word],)
        ranks = self.vocab.ranks
        parts = [*word[:-1], word[-1] + END_OF_WORD]
        while len(parts) > 1:
            best = -1
            best_rank = N_MERGES
            for i in range(len(parts) - 1):
                rank = ranks.get(parts[i] + " " + parts[i + 1], N_MERGES)
                if rank < best_rank:
                    best, best_rank = i, rank
            if best < 0:
                break
            first, second = parts[best], parts[best + 1]
            merged: list[str] = []
            i, n = 0, len(parts)
            while i < n:
                if i + 1 < n and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(encoder[p] for p in parts)

    def encode(self, text: str, limit: int | None = None) -> list[int]:
        """Token ids of `text`, without start and end tokens; stops once `limit` ids are known,
        since words are encoded independently and later ones would be truncated anyway."""
        ids: list[int] = []
        table = self._bytes
        for piece in _PATTERN.findall(clean(text)):
            ids.extend(self._word_ids("".join(table[b] for b in piece.encode("utf-8"))))
            if limit is not None and len(ids) >= limit:
                return ids[:limit]
        return ids

    def __call__(
        self, texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH
    ) -> np.ndarray:
        """(n, context_length) int64 ids: start, text, end, zero padding. Too long a text is cut
        so that the end token still comes last (the text tower pools at the end token)."""
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 1:
            raise ValueError(f"context_length must be positive, not {context_length}")
        out = np.zeros((len(texts), context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id, *self.encode(text, limit=context_length), self.eot_token_id]
            if len(ids) > context_length:
                ids = ids[:context_length]
                ids[-1] = self.eot_token_id
            out[row, : len(ids)] = ids
        return out


@lru_cache(maxsize=1)
def default_tokenizer() -> ClipTokenizer:
    """A shared tokenizer: loading the vocabulary takes tens of milliseconds."""
    return ClipTokenizer()
