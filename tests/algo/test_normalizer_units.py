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
from archer_mcore.config import BUILTIN_TOKEN_RULES, ConfigError, ForkingRuleConfig, load_config


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
    fork = LossConfig(token_rule=ForkingRuleConfig(rho=0.2, normalizer="selected"))
    sel = torch.tensor([[1, 0, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert normalizer_units(mask, fork, selection=sel) == 2.0  # selected & valid
    # no mini-batch selection: max(1, ceil(0.2 N)) per micro-batch of N valid tokens
    mbs = [mask[:2], mask[2:], torch.zeros(1, 4, dtype=torch.bool)]
    assert normalizer_units(mask, fork, microbatch_masks=mbs) == 1.0 + 1.0 + 0.0
    every = LossConfig(token_rule=ForkingRuleConfig(normalizer="all"))
    assert normalizer_units(mask, every, selection=sel) == 4.0
    assert accumulation_normalizer(0.0, 2) == 0.5 and accumulation_normalizer(12.0, 4) == 3.0


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
@pytest.mark.parametrize("rule", ["none", "archer", "forking"])
def test_microbatch_losses_sum_to_the_minibatch_loss(agg, rule):
    """Split 6 rows as [0:2], [2:3], [3:6] (with a mini-batch forking selection): the
    normalised micro-batch losses sum to the loss of the whole batch (Archer's groups
    are per response, so the split does not change them)."""
    logp, old, adv, mask, ent = _batch(3)
    # forking's "selected" normaliser with a seq-mean mode is refused at load (below).
    settings = BUILTIN_TOKEN_RULES[rule]()
    if rule == "forking":
        settings = ForkingRuleConfig(normalizer="selected" if agg == "token-mean" else "all")
    cfg = LossConfig(token_rule=settings, agg_mode=agg)
    sel = None
    if rule == "forking":  # a mini-batch scope selection, fixed for all micro-batches
        sel = (ent > 0.5) & mask
    whole, _ = policy_loss(logp, old, adv, mask, ent, ref_logp=None, cfg=cfg, selection=sel)
    norm = accumulation_normalizer(normalizer_units(mask, cfg, selection=sel), 1)
    total = torch.zeros((), dtype=torch.float64)
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        part, _ = policy_loss(
            logp[rows], old[rows], adv[rows], mask[rows], ent[rows], ref_logp=None, cfg=cfg,
            normalizer=norm, selection=None if sel is None else sel[rows],
        )  # fmt: skip
        total = total + part
    torch.testing.assert_close(total, whole, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "seq-mean-token-sum"])
def test_forking_selected_normalizer_with_a_seq_mean_mode_is_refused(tmp_path, agg):
    # Why (issue 25 item 5): per response the loss divides by that response's selected
    # tokens and averages over the responses that have one, which a split changes.
    # Rows 0 and 1 of the mini-batch selection below: row 0 has 2 selected tokens, row 1
    # none. Whole: the mean over the 1 row with a selection; the micro-batch [row 0]
    # rescaled by its 1 valid row / 2 valid rows: half of that. So they differ, by hand.
    logp, old, adv, mask, ent = _batch(3, b=2)
    sel = torch.zeros_like(mask)
    sel[0, :2] = True
    cfg = LossConfig(token_rule=ForkingRuleConfig(normalizer="selected"), agg_mode=agg)
    whole, _ = policy_loss(logp, old, adv, mask, ent, ref_logp=None, cfg=cfg, selection=sel)
    norm = accumulation_normalizer(normalizer_units(mask, cfg, selection=sel), 1)
    parts = [
        policy_loss(logp[r], old[r], adv[r], mask[r], ent[r], ref_logp=None, cfg=cfg, normalizer=norm,
                    selection=sel[r])[0]
        for r in (slice(0, 1), slice(1, 2))
    ]  # fmt: skip
    torch.testing.assert_close(parts[0] + parts[1], whole / 2, rtol=1e-12, atol=1e-12)
    assert whole.abs() > 1e-3
    # ... so the config refuses the combination, naming the keys and the ways out.
    path = tmp_path / "c.yaml"
    path.write_text(f"algorithm: {{name: forking, agg_mode: {agg}}}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert msg.startswith(f"{path}: the forking rule's normalizer 'selected'")
    assert "algorithm.agg_mode token-mean" in msg and "token_rule.normalizer: all" in msg
    # the way out loads
    path.write_text(
        f"algorithm: {{name: forking, agg_mode: {agg}, token_rule: {{normalizer: all}}}}\n"
    )
    assert load_config(path).algorithm.token_rule.normalizer == "all"
