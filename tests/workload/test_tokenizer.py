"""Word-level tokenizer: partition, deterministic vocabulary, round trip, and Zipfian frequencies."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from heavytail.workload.corpus import load_corpus
from heavytail.workload.tokenizer import UNK, WordTokenizer, split_tokens, zipf_slope


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_pieces_partition_any_text(text):
    assert "".join(split_tokens(text)) == text


def test_pieces():
    assert split_tokens("def f(x1):\n    return 42 + x_1") == [
        "def",
        " ",
        "f",
        "(",
        "x1",
        ")",
        ":",
        "\n    ",
        "return",
        " ",
        "42",
        " ",
        "+",
        " ",
        "x_1",
    ]


def test_vocabulary_ranks_by_count_then_string():
    tok = WordTokenizer.train("b a c a b", vocab_size=10)
    assert tok.vocab == [UNK, " ", "a", "b", "c"]
    assert WordTokenizer.train("b a c a b", vocab_size=3).vocab == [UNK, " ", "a"]
    assert tok.vocab_size == 5


def test_encode_decode():
    tok = WordTokenizer.train("b a c a b", vocab_size=4)
    ids = tok.encode("a b c d")
    assert ids.dtype == torch.long and ids.ndim == 1
    assert ids.tolist() == [2, 1, 3, 1, 0, 1, 0]
    assert tok.decode(ids) == f"a b {UNK} {UNK}"
    assert tok.encode("").shape == (0,)


@pytest.fixture(scope="module")
def corpus():
    return load_corpus(max_bytes=300_000)


def test_round_trip_on_in_vocabulary_text(corpus):
    tok = WordTokenizer.train(corpus, vocab_size=4096)
    ids = tok.encode(corpus[:20_000])
    assert 0 < (ids == tok.unk_id).float().mean() < 0.1
    # Cut the sample into lines and keep those made only of in-vocabulary pieces.
    lines = [line for line in corpus[:20_000].splitlines(keepends=True) if tok.unk_id not in tok.encode(line)]
    sample = "".join(lines)
    assert len(sample) > 5_000
    assert tok.decode(tok.encode(sample)) == sample
    # A vocabulary large enough for every piece round-trips the whole text.
    full = WordTokenizer.train(corpus[:20_000], vocab_size=10**6)
    assert full.decode(full.encode(corpus[:20_000])) == corpus[:20_000]


def test_deterministic_and_state_dict(corpus):
    a = WordTokenizer.train(corpus, vocab_size=512)
    b = WordTokenizer.train(corpus, vocab_size=512)
    assert a.vocab == b.vocab
    c = WordTokenizer.from_state_dict(a.state_dict())
    torch.testing.assert_close(c.encode(corpus[:5000]), a.encode(corpus[:5000]))


def test_invalid_vocabularies():
    with pytest.raises(ValueError, match="vocab_size"):
        WordTokenizer.train("a", vocab_size=1)
    with pytest.raises(ValueError, match="<unk>"):
        WordTokenizer(["a", "b"])
    with pytest.raises(ValueError, match="duplicate"):
        WordTokenizer([UNK, "a", "a"])


@pytest.mark.parametrize("s", [1.0, 1.5])
def test_zipf_slope_of_an_exact_power_law(s):
    counts = [10**7 * r**-s for r in range(1, 2001)]
    assert zipf_slope(counts) == pytest.approx(-s, abs=1e-9)
    with pytest.raises(ValueError, match="two ranks"):
        zipf_slope([5])


def test_stdlib_token_frequencies_are_zipfian():
    counts = Counter(split_tokens(load_corpus()))
    head = zipf_slope(counts.values(), max_rank=4096)
    full = zipf_slope(counts.values())
    print(
        f"\nZipf rank-frequency slope of the stdlib corpus: {head:.3f} over ranks 1..4096, {full:.3f} over all "
        f"{len(counts)} distinct pieces"
    )
    assert -1.4 < head < -0.7
