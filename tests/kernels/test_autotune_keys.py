"""The fused LM head's backward kernel is tuned once per bucket of chunk widths, not
once for most micro-batches (issue 21, item 7).

Triton's autotuner benchmarks every config whenever it sees a new value of its key.
The backward walks the vocabulary in chunks whose width `default_chunk_cols` derives
from the micro-batch's token count, so a key on the width itself changed with nearly
every packed micro-batch. The key is now `tune_bucket(width)`. Here: the keys the
backward would present for 20 packed micro-batches of the 1.5B preset's shape (H 1536,
Qwen3 vocabulary 151,936 at TP 1, bf16, token counts 28k..34,816), enumerated with the
launcher's own chunking. The autotune count on a GPU is in benchmarks/gpu_check.py.
"""

from __future__ import annotations

import random

from archer_mcore.kernels.fused_lm_head import _chunks, default_chunk_cols, tune_bucket

H, V, ELEM = 1536, 151_936, 2  # bf16 hidden states, Triton recompute


def _widths(n_tokens: int) -> set[int]:
    """The chunk widths (the old key) of one backward."""
    chunk = default_chunk_cols(n_tokens, V, ELEM)
    return {c1 - c0 for c0, c1 in _chunks(V, chunk)}


def _tune_keys(n_tokens: int) -> set[tuple[int, int]]:
    """The keys the backward presents now: every chunk passes the full width."""
    width = min(default_chunk_cols(n_tokens, V, ELEM), V)
    return {(H, tune_bucket(width))}


def test_tune_bucket_is_the_next_power_of_two_from_256() -> None:
    assert [tune_bucket(c) for c in (1, 255, 256, 257, 7680, 8192, 8193)] == [
        256, 256, 256, 512, 8192, 8192, 16384,
    ]  # fmt: skip


def test_twenty_packed_micro_batches_tune_at_most_a_few_times() -> None:
    rng = random.Random(0)
    counts = [rng.randint(28_000, 34_816) for _ in range(20)]
    widths = set().union(*(_widths(n) for n in counts))
    keys = set().union(*(_tune_keys(n) for n in counts))
    assert len(widths) >= 10  # the old key (H, C): 14 tunings for these 20 micro-batches
    assert len(keys) <= 2, sorted(keys)
