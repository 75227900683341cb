"""pass@k/avg@k against brute-force enumeration; dynamic sampling's refill policy."""

from __future__ import annotations

import itertools
import math

import pytest

from archer_mcore.train.dynamic_sampling import collect_groups
from archer_mcore.train.eval_metrics import format_table, pass_at_k, summarize


@pytest.mark.parametrize(("n", "c", "k"), [(5, 2, 1), (5, 2, 3), (6, 0, 2), (6, 6, 4), (8, 3, 5)])
def test_pass_at_k_equals_enumeration(n, c, k):
    # Independent reference: the share of all k-subsets of the n samples with >= 1 correct.
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(brute)


def test_pass_at_1_is_accuracy_and_bad_args():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_summarize_per_source():
    # math: prompts with 2/4 and 0/4 correct -> avg@4 = (0.5 + 0) / 2 = 0.25;
    # pass@2: 1 - C(2,2)/C(4,2) = 1 - 1/6 = 0.8333 for the first, 0 for the second.
    recs = [("math", [1, 1, 0, 0]), ("math", [0, 0, 0, 0]), ("code", [1, 1, 1, 1])]
    s = summarize(recs, k=2)
    assert s["math"]["avg@4"] == pytest.approx(0.25)
    assert s["math"]["pass@2"] == pytest.approx((5 / 6) / 2)
    assert s["code"]["pass@2"] == 1.0 and s["all"]["prompts"] == 3
    table = format_table(s)
    assert "| math |" in table and "0.4167" in table


def _gen_factory(batches: list[list[list[int]]]):
    """generate() returns the next scripted batch of groups (each a list of 0/1)."""
    it = iter(batches)
    return lambda n: next(it)


def test_refill_until_full_then_truncate():
    # Batch 1: 1 mixed group of 3; batch 2: 2 mixed of 3 -> 3 kept >= target 2 -> stop.
    b1 = [[1, 1], [0, 1], [0, 0]]
    b2 = [[1, 0], [0, 0], [0, 1]]
    out = collect_groups(_gen_factory([b1, b2]), lambda g: g, target=2, mode="refill")
    assert out.groups == [[0, 1], [1, 0]]
    assert (out.generation_batches, out.generated_groups, out.dropped_groups) == (2, 6, 3)
    assert out.full and out.drop_rate == pytest.approx(0.5)


def test_refill_cap_trains_on_what_it_has(caplog):
    flat = [[[1, 1], [0, 0]]] * 3
    out = collect_groups(
        _gen_factory([*flat, [[0, 1]]]), lambda g: g, 2, "refill", max_generation_batches=3
    )
    assert out.groups == [] and not out.full and out.generation_batches == 3
    assert "after 3 generation batches" in caplog.text


def test_drop_mode_filters_once_and_none_keeps_all():
    b = [[1, 1], [0, 1], [0, 0]]
    assert collect_groups(_gen_factory([b]), lambda g: g, 3, "drop").groups == [[0, 1]]
    assert collect_groups(_gen_factory([b]), lambda g: g, 3, "none").groups == b
    assert math.isclose(collect_groups(_gen_factory([b]), lambda g: g, 3, "drop").drop_rate, 2 / 3)
