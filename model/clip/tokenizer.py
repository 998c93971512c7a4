"""CLIP's byte-level BPE tokenizer.

Same vocabulary (49,408 tokens: 256 byte symbols, their end-of-word variants,
48,894 merges, ``<start_of_text>`` and ``<end_of_text>``), text cleaning (ftfy,
double HTML unescape, whitespace collapsing, lower-casing) and truncation rule as
OpenAI CLIP / open_clip, so token ids are interchangeable with theirs
(``tests/test_tokenizer.py`` checks this against ``open_clip.tokenize``).
"""
from __future__ import annotations

import functools
import gzip
import html
from collections.abc import Iterable, Sequence
from pathlib import Path

import ftfy
import regex
import torch

__all__ = ["SimpleTokenizer", "tokenize", "default_bpe_path", "CONTEXT_LENGTH"]

CONTEXT_LENGTH = 77
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
# Merges used by CLIP: the file lists more, CLIP keeps the first 49152 - 256 - 2.
_NUM_MERGES = 49152 - 256 - 2


def default_bpe_path() -> Path:
    """The merges file shipped next to this module."""
    return Path(__file__).resolve().with_name("bpe_simple_vocab_16e6.txt.gz")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """Reversible map of the 256 byte values to printable unicode characters.

    Printable latin-1 bytes map to themselves; the others (control characters,
    whitespace) are shifted to code points 256+ so BPE never sees whitespace.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    others = [b for b in range(256) if b not in table]
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


def clean_text(text: str) -> str:
    """ftfy fix, HTML unescape (twice, for double-escaped text), collapse whitespace, lower-case."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return " ".join(text.split()).lower()


class SimpleTokenizer:
    """CLIP BPE tokenizer: ``encode``/``decode`` single strings, ``__call__`` to batch-tokenize."""

    def __init__(self, bpe_path: str | Path | None = None, context_length: int = CONTEXT_LENGTH):
        self.context_length = context_length
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}

        with gzip.open(bpe_path or default_bpe_path(), "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1:_NUM_MERGES + 1]  # first line is a version header
        merges: list[tuple[str, str]] = [tuple(line.split()) for line in lines]  # type: ignore[misc]

        symbols = list(self.byte_encoder.values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT_TOKEN, EOT_TOKEN]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.decoder: dict[int, str] = {i: tok for tok, i in self.encoder.items()}
        self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
        self.vocab_size = len(self.encoder)
        self.sot_token_id = self.encoder[SOT_TOKEN]
        self.eot_token_id = self.encoder[EOT_TOKEN]
        # Special tokens typed literally in the text stay whole (as in CLIP).
        self._cache: dict[str, tuple[str, ...]] = {SOT_TOKEN: (SOT_TOKEN,), EOT_TOKEN: (EOT_TOKEN,)}
        self._pattern = regex.compile(
            rf"{SOT_TOKEN}|{EOT_TOKEN}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
            regex.IGNORECASE,
        )

    def bpe(self, token: str) -> tuple[str, ...]:
        """Split one pre-token (byte-encoded) into BPE symbols by applying merges in rank order."""
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        word = list(token[:-1]) + [token[-1] + "</w>"]
        ranks = self.bpe_ranks
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda pair: ranks.get(pair, float("inf")))
            if best not in ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            while i < len(word):  # merge every non-overlapping occurrence, left to right
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        result = tuple(word)
        self._cache[token] = result
        return result

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without start/end tokens."""
        ids: list[int] = []
        for piece in self._pattern.findall(clean_text(text)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[sym] for sym in self.bpe(piece))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Inverse of ``encode`` up to cleaning (end-of-word markers become spaces)."""
        text = "".join(self.decoder[int(i)] for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> torch.LongTensor:
        """Tokenize to a zero-padded (N, context_length) LongTensor.

        Each row is ``<start_of_text> ids <end_of_text>``; a row that does not fit is
        cut to ``context_length`` with its last position replaced by ``<end_of_text>``,
        so ``argmax`` always finds the end-of-text token.
        """
        if isinstance(texts, str):
            texts = [texts]
        context_length = context_length or self.context_length
        result = torch.zeros(len(texts), context_length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.sot_token_id] + self.encode(text) + [self.eot_token_id]
            if len(ids) > context_length:
                ids = ids[:context_length - 1] + [self.eot_token_id]
            result[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return result  # type: ignore[return-value]


@functools.lru_cache(maxsize=1)
def _default_tokenizer() -> SimpleTokenizer:
    return SimpleTokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.LongTensor:
    """Tokenize with the shared default tokenizer (loaded on first use)."""
    return _default_tokenizer()(texts, context_length=context_length)
