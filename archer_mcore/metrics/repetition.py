"""N-gram repetition rate of generated responses (a degeneration signal).

Pure functions on token id lists; no torch.
"""

from __future__ import annotations

from collections.abc import Sequence


def ngram_repetition_rate(token_ids: Sequence[int], n: int = 4) -> float:
    """Share of a response's n-grams that repeat an earlier n-gram of the same response.

    With the M = len(token_ids) - n + 1 overlapping n-grams of which U are distinct,
    the rate is (M - U) / M: 0.0 when no n-gram occurs twice, approaching 1.0 for a
    response that loops on one phrase. A response shorter than n has no n-gram and
    rate 0.0.

    Args:
        token_ids: one response's token ids, padding removed.
        n: n-gram length, >= 1.
    Returns:
        the repetition rate in [0, 1).
    """
    if n < 1:
        raise ValueError(f"ngram_repetition_rate: n must be >= 1, got {n}")
    total = len(token_ids) - n + 1
    if total <= 0:
        return 0.0
    ids = tuple(token_ids)
    distinct = {ids[i : i + n] for i in range(total)}
    return (total - len(distinct)) / total


def mean_ngram_repetition_rate(responses: Sequence[Sequence[int]], n: int = 4) -> float:
    """Mean of `ngram_repetition_rate` over responses (each response weighs the same).

    This is the value of the `response/repetition` metric; 0.0 for no responses.
    """
    if not responses:
        return 0.0
    return sum(ngram_repetition_rate(r, n) for r in responses) / len(responses)
