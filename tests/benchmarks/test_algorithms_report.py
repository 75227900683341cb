"""The algorithm benchmark's statistics and RESULTS.md section handling (fast)."""

from __future__ import annotations

import math

SECTION = "## Algorithm comparison (CPU demo task)"


def test_mean_std_is_the_sample_std(algorithms_bench):
    # [1, 2, 3]: mean 2, squared deviations 1 + 0 + 1 = 2, over n - 1 = 2 -> std 1.
    assert algorithms_bench.mean_std([1.0, 2.0, 3.0]) == (2.0, 1.0)
    # one value: no spread to estimate
    assert algorithms_bench.mean_std([0.25]) == (0.25, 0.0)
    m, s = algorithms_bench.mean_std([])
    assert math.isnan(m) and math.isnan(s)


def test_band_keeps_only_steps_every_seed_reached(algorithms_bench):
    # seed b stopped before step 20: step 20 has no mean over both seeds
    steps, mean, std = algorithms_bench._band([{0: 0.1, 10: 0.3, 20: 0.5}, {0: 0.3, 10: 0.5}])
    assert steps == [0, 10]
    assert mean == [0.2, 0.4]
    # std of {0.1, 0.3}: deviations +-0.1, (0.01 + 0.01) / 1 -> sqrt(0.02)
    assert math.isclose(std[0], math.sqrt(0.02))


def test_section_is_appended_then_replaced_in_place(algorithms_bench):
    other = "# Benchmark results\n\n## Kernels\n\nkernel table\n"
    once = algorithms_bench.replace_section(other, f"{SECTION}\n\nfirst\n")
    assert once == other + f"\n{SECTION}\n\nfirst\n"
    # a later section written by someone else stays after ours
    with_tail = once + "\n## Conversion\n\nconvert table\n"
    twice = algorithms_bench.replace_section(with_tail, f"{SECTION}\n\nsecond\n")
    assert twice.count(SECTION) == 1
    assert "first" not in twice
    assert twice == other + f"\n{SECTION}\n\nsecond\n\n## Conversion\n\nconvert table\n"


def test_section_in_a_new_file_gets_a_title(algorithms_bench):
    text = algorithms_bench.replace_section("", f"{SECTION}\n\nbody\n")
    assert text == f"# Benchmark results\n\n{SECTION}\n\nbody\n"
