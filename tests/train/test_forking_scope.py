"""`algorithm.token_rule.scope` of the forking rule: forking tokens chosen per micro-batch
or per mini-batch.

A hand-made batch of three responses, five tokens each. Rows 0 and 1 form the
mini-batch; each is its own micro-batch. Entropies:

    row 0: 0.9 0.8 0.7 0.6 0.5
    row 1: 0.1 0.2 0.3 0.4 0.05
    row 2: 0.99 0.98 0.97 0.96 0.95   (another mini-batch)

rho = 0.2. Mini-batch scope: N = 10 valid tokens, k = 2, the two largest of rows 0-1
are row 0's first two tokens (row 2 is not in scope). Micro-batch scope: N = 5 per
micro-batch, k = 1 each: row 0 token 0 and row 1 token 3.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from archer_mcore.algo.losses import policy_loss
from archer_mcore.config import ConfigDeprecationWarning, ConfigError, load_config
from archer_mcore.train.update import minibatch_selection

ENTROPY = torch.tensor(
    [
        [0.9, 0.8, 0.7, 0.6, 0.5],
        [0.1, 0.2, 0.3, 0.4, 0.05],
        [0.99, 0.98, 0.97, 0.96, 0.95],
    ]
)
MASK = torch.ones(3, 5, dtype=torch.bool)
MINI_BATCH = torch.tensor([0, 1])
F, T = False, True
BY_MINI_BATCH = [[T, T, F, F, F], [F, F, F, F, F]]  # rows 0 and 1
BY_MICRO_BATCH = [[T, F, F, F, F], [F, F, F, T, F]]


def _algorithm(tmp_path: Path, *overrides: str):
    path = tmp_path / "c.yaml"
    path.write_text("algorithm: {name: forking}\n")
    return load_config(path, overrides).algorithm


def _pg_tokens(a, row: torch.Tensor, selection: torch.Tensor | None) -> list[list[bool]]:
    """The tokens that receive policy gradient from the real loss on one micro-batch."""
    logp = torch.zeros(len(row), 5, requires_grad=True)
    loss, _ = policy_loss(
        logp,
        torch.zeros(len(row), 5),
        torch.ones(len(row)),
        MASK[row],
        ENTROPY[row],
        ref_logp=None,
        cfg=a,
        selection=None if selection is None else selection[row],
    )
    loss.backward()
    return (logp.grad != 0).tolist()


def test_mini_batch_scope_selects_over_the_whole_mini_batch(tmp_path):
    a = _algorithm(tmp_path, "algorithm.token_rule.scope=mini_batch")
    sel = minibatch_selection(a, ENTROPY, MASK, MINI_BATCH)
    assert sel is not None
    assert sel[:2].tolist() == BY_MINI_BATCH and not sel[2].any()
    # Through the loss, micro-batch by micro-batch: the gradient lands on the mini-batch's
    # choice, so row 1 (all below row 0) gets none.
    got = [_pg_tokens(a, torch.tensor([r]), sel)[0] for r in (0, 1)]
    assert got == BY_MINI_BATCH


def test_micro_batch_scope_selects_within_each_micro_batch(tmp_path):
    a = _algorithm(tmp_path, "algorithm.token_rule.scope=micro_batch")
    assert minibatch_selection(a, ENTROPY, MASK, MINI_BATCH) is None
    got = [_pg_tokens(a, torch.tensor([r]), None)[0] for r in (0, 1)]
    assert got == BY_MICRO_BATCH
    assert got != BY_MINI_BATCH  # the scope changes which tokens are trained


def test_scope_is_ignored_by_other_token_rules(tmp_path):
    # Only the forking rule has a scope; the old flat key still loads under another rule,
    # ignored as it always was, with a message naming the new key.
    path = tmp_path / "c.yaml"
    path.write_text("algorithm: {name: archer, forking_scope: mini_batch}\n")
    with pytest.warns(ConfigDeprecationWarning, match="algorithm.token_rule.scope now"):
        a = load_config(path).algorithm
    assert minibatch_selection(a, ENTROPY, MASK, MINI_BATCH) is None
    path.write_text("algorithm: {name: archer, token_rule: {scope: mini_batch}}\n")
    with pytest.raises(ConfigError, match="unknown key algorithm.token_rule.scope"):
        load_config(path)
