"""A deterministic word-level tokenizer with a frequency-capped vocabulary, and the corpus's Zipf slope."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["TOKEN_PATTERN", "UNK", "WordTokenizer", "split_tokens", "zipf_slope"]

TOKEN_PATTERN = re.compile(r"[^\W\d]\w*|\d+|\s+|[^\w\s]")
"""Identifiers/words (a letter or ``_`` then word characters), digit runs, whitespace runs, single punctuation marks.

The four alternatives partition any string, so joining the pieces gives the text back: that is what makes
``decode(encode(text)) == text`` for in-vocabulary text. Whitespace runs are tokens because in code the
indentation is content."""

UNK = "<unk>"


def split_tokens(text: str) -> list[str]:
    """Split ``text`` into word-level pieces with :data:`TOKEN_PATTERN`; ``"".join`` of the result is ``text``."""
    return TOKEN_PATTERN.findall(text)


class WordTokenizer:
    """Word-level tokenizer: the ``vocab_size - 1`` most frequent pieces of a training text, plus ``<unk>`` (id 0).

    Ranks are by count, ties broken by the piece's string, so the same text always gives the same ids. Word-level
    tokens keep the corpus's Zipfian frequencies intact (a subword tokenizer flattens the tail), which is the
    source of the heavy-tailed embedding and output-head gradients the demo is meant to show.
    """

    def __init__(self, vocab: Sequence[str]) -> None:
        vocab = list(vocab)
        if not vocab or vocab[0] != UNK:
            raise ValueError(f"vocab must start with {UNK!r}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("vocab has duplicate tokens")
        self.vocab: list[str] = vocab
        self.token_to_id: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.unk_id = 0

    @classmethod
    def train(cls, text: str, vocab_size: int = 4096) -> "WordTokenizer":
        """Build the vocabulary of ``text``: ``<unk>`` and its ``vocab_size - 1`` most frequent pieces."""
        return cls.from_counts(Counter(split_tokens(text)), vocab_size)

    @classmethod
    def from_counts(cls, counts: Mapping[str, int], vocab_size: int = 4096) -> "WordTokenizer":
        """Build the vocabulary from piece counts (``Counter(split_tokens(text))``), as :meth:`train` does."""
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2 (<unk> and one token), got {vocab_size}")
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        return cls([UNK] + [tok for tok, _ in ranked[: vocab_size - 1]])

    @property
    def vocab_size(self) -> int:
        """Number of ids, ``<unk>`` included."""
        return len(self.vocab)

    def encode(self, text: str) -> torch.Tensor:
        """Token ids of ``text`` as a 1-D ``torch.long`` tensor; out-of-vocabulary pieces become ``unk_id``."""
        return self.encode_pieces(split_tokens(text))

    def encode_pieces(self, pieces: Iterable[str]) -> torch.Tensor:
        """Token ids of pieces already split by :func:`split_tokens` (saves a second pass over a large text)."""
        lookup = self.token_to_id.get
        return torch.tensor([lookup(tok, 0) for tok in pieces], dtype=torch.long)

    def decode(self, ids: torch.Tensor | Iterable[int]) -> str:
        """Text of ``ids`` (``<unk>`` for the unknown id)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()  # sync point: decoding text, never on a training step
        vocab = self.vocab
        return "".join(vocab[i] for i in ids)

    def state_dict(self) -> dict[str, Any]:
        """The vocabulary, in id order: enough to rebuild the tokenizer with :meth:`from_state_dict`."""
        return {"vocab": list(self.vocab)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> "WordTokenizer":
        """Rebuild a tokenizer saved by :meth:`state_dict`."""
        return cls(state["vocab"])

    def __repr__(self) -> str:
        return f"WordTokenizer(vocab_size={self.vocab_size})"


def zipf_slope(counts: Iterable[int], min_rank: int = 1, max_rank: int | None = None) -> float:
    """Least-squares slope of log(frequency) against log(rank), over ranks ``min_rank..max_rank``.

    Zipf's law (Zipf 1949) is f(r) proportional to r^(-s) with s near 1 for natural language, so the slope is
    about -1. A slope near -1 means a few tokens dominate and most of the vocabulary is rare: rare tokens'
    embedding rows and output-head logits get occasional large gradients, a heavy tail across coordinates.
    Least squares on a log-log plot is a descriptive figure, not an estimator of s with known error
    (Clauset, Shalizi & Newman 2009); use it to compare corpora, not to test a power law.
    """
    freqs = sorted((c for c in counts if c > 0), reverse=True)
    hi = len(freqs) if max_rank is None else min(max_rank, len(freqs))
    if hi - min_rank + 1 < 2:
        raise ValueError("need at least two ranks with a positive count")
    xs = [math.log(r) for r in range(min_rank, hi + 1)]
    ys = [math.log(freqs[r - 1]) for r in range(min_rank, hi + 1)]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    return sxy / sxx
