"""`normalizer_units` / `accumulation_normalizer`: the mini-batch's units, counted once in
algo/losses.py, make micro-batch losses sum to the whole mini-batch's loss."""

from __future__ import annotations

import pytest
import torch

from archer_mcore.algo.losses import (
    LossConfig,
    accumulation_normalizer,
    normalizer_units,
    policy_loss,
)


def _batch(seed: int, b: int = 6, length: int = 9):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 1, 4, 7, 2, 5])[:b]
    mask = torch.arange(length)[None, :] < lengths[:, None]
    logp = -torch.rand(b, length, generator=g, dtype=torch.float64)
    old = logp + 0.2 * torch.randn(b, length, generator=g, dtype=torch.float64)
    adv = torch.randn(b, generator=g, dtype=torch.float64)
    ent = torch.rand(b, length, generator=g, dtype=torch.float64)
    return logp, old, adv, mask, ent


def test_units_by_hand():
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    assert normalizer_units(mask, LossConfig(agg_mode="token-mean")) == 4.0
    assert normalizer_units(mask, LossConfig(agg_mode="seq-mean-token-mean")) == 2.0
    assert normalizer_units(mask, LossConfig(agg_mode="seq-mean-token-sum")) == 2.0
    fork = LossConfig(token_rule="forking", forking_rho=0.2, forking_normalizer="selected")
    sel = torch.tensor([[1, 0, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert normalizer_units(mask, fork, selection=sel) == 2.0  # selected & valid
    # no mini-batch selection: max(1, ceil(0.2 N)) per micro-batch of N valid tokens
    mbs = [mask[:2], mask[2:], torch.zeros(1, 4, dtype=torch.bool)]
    assert normalizer_units(mask, fork, microbatch_masks=mbs) == 1.0 + 1.0 + 0.0
    every = LossConfig(token_rule="forking", forking_normalizer="all")
    assert normalizer_units(mask, every, selection=sel) == 4.0
    assert accumulation_normalizer(0.0, 2) == 0.5 and accumulation_normalizer(12.0, 4) == 3.0


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("rule", ["none", "archer", "forking"])
def test_microbatch_losses_sum_to_the_minibatch_loss(agg, rule):
    """Split 6 rows as [0:2], [2:3], [3:6] (with a mini-batch forking selection): the
    normalised micro-batch losses sum to the loss of the whole batch (Archer's groups
    are per response, so the split does not change them)."""
    logp, old, adv, mask, ent = _batch(3)
    # Not covered: forking's "selected" normaliser with a seq-mean mode averages over the
    # rows that have a selected token while its units are the rows with a valid token,
    # so there the micro-batch losses do not sum exactly to the mini-batch loss.
    norm_kind = "selected" if agg == "token-mean" else "all"
    cfg = LossConfig(token_rule=rule, agg_mode=agg, forking_normalizer=norm_kind)
    sel = None
    if rule == "forking":  # a mini-batch scope selection, fixed for all micro-batches
        sel = (ent > 0.5) & mask
    whole, _ = policy_loss(logp, old, adv, mask, ent, None, cfg, selection=sel)
    norm = accumulation_normalizer(normalizer_units(mask, cfg, selection=sel), 1)
    total = torch.zeros((), dtype=torch.float64)
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        part, _ = policy_loss(
            logp[rows], old[rows], adv[rows], mask[rows], ent[rows], None, cfg,
            normalizer=norm, selection=None if sel is None else sel[rows],
        )  # fmt: skip
        total = total + part
    torch.testing.assert_close(total, whole, rtol=1e-12, atol=1e-12)
