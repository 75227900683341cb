"""EpochSampler: permutations per epoch, seed determinism, exact resume."""

from __future__ import annotations

import pytest

from archer_mcore.data.sampler import EpochSampler


def test_each_epoch_is_a_permutation_and_epochs_differ() -> None:
    s = EpochSampler(10, seed=5)
    epochs = [s.next_batch(10) for _ in range(3)]
    assert all(sorted(e) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1] or epochs[1] != epochs[2]
    flat = [i for e in epochs for i in e]
    assert EpochSampler(10, seed=5).next_batch(30) == flat
    assert EpochSampler(10, seed=6).next_batch(30) != flat
    assert EpochSampler(4, shuffle=False).next_batch(6) == [0, 1, 2, 3, 0, 1]


@pytest.mark.parametrize("consumed", [0, 3, 7, 10, 13, 25])
def test_resume_continues_identically(consumed: int) -> None:
    reference = EpochSampler(7, seed=42)
    full = reference.next_batch(consumed + 20)
    first = EpochSampler(7, seed=42)
    assert first.next_batch(consumed) == full[:consumed]
    state = first.state_dict()
    resumed = EpochSampler(7, seed=42)
    resumed.load_state_dict(state)
    assert resumed.next_batch(20) == full[consumed:]
    # a state dict survives a JSON-like copy (checkpoint files store plain values)
    assert all(isinstance(v, (int, bool)) for v in state.values())


def test_mismatched_state_is_rejected() -> None:
    state = EpochSampler(7, seed=42).state_dict()
    with pytest.raises(ValueError, match="num_items"):
        EpochSampler(8, seed=42).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        EpochSampler(7, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="at least one"):
        EpochSampler(0)
