"""ngram_repetition_rate against hand-counted n-grams."""

from __future__ import annotations

import pytest

from archer_mcore.metrics.repetition import mean_ngram_repetition_rate, ngram_repetition_rate


def test_no_repeats_is_zero() -> None:
    # 4-grams of 1..8: (1234)(2345)(3456)(4567)(5678), all distinct -> 0/5.
    assert ngram_repetition_rate([1, 2, 3, 4, 5, 6, 7, 8]) == 0.0


def test_alternating_bigrams() -> None:
    # bigrams of 1 2 1 2 1 2: (12)(21)(12)(21)(12): M = 5, U = 2 -> (5 - 2) / 5 = 0.6.
    assert ngram_repetition_rate([1, 2, 1, 2, 1, 2], n=2) == pytest.approx(0.6)


def test_one_token_loop() -> None:
    # 7 x token 9, n = 4: M = 4 n-grams, all (9999): U = 1 -> 3/4.
    assert ngram_repetition_rate([9] * 7, n=4) == pytest.approx(0.75)


def test_phrase_repeated_once() -> None:
    # 5 6 7 8 5 6 7 8 with n = 4: n-grams (5678)(6785)(7856)(8567)(5678): M = 5, U = 4 -> 1/5.
    assert ngram_repetition_rate([5, 6, 7, 8, 5, 6, 7, 8]) == pytest.approx(0.2)


def test_unigrams_count_repeated_tokens() -> None:
    # n = 1: tokens 3 3 4 3: M = 4, U = 2 -> 0.5.
    assert ngram_repetition_rate([3, 3, 4, 3], n=1) == pytest.approx(0.5)


def test_short_and_empty_responses() -> None:
    assert ngram_repetition_rate([1, 2, 3], n=4) == 0.0  # no 4-gram at all
    assert ngram_repetition_rate([], n=4) == 0.0
    assert ngram_repetition_rate([1, 2, 3, 4], n=4) == 0.0  # exactly one 4-gram


def test_bad_n() -> None:
    with pytest.raises(ValueError, match="n must be >= 1"):
        ngram_repetition_rate([1, 2], n=0)


def test_mean_over_responses() -> None:
    # (0.6 + 0.0) / 2 with the alternating-bigram and the distinct example above.
    rate = mean_ngram_repetition_rate([[1, 2, 1, 2, 1, 2], [1, 2, 3]], n=2)
    assert rate == pytest.approx(0.3)
    assert mean_ngram_repetition_rate([]) == 0.0
