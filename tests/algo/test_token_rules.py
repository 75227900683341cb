"""The token-rule registry (algo/token_rules.py): every rule answers the trainer's
questions itself, rules are found by name or import path, and a class that is not a
rule is refused at config load with an error naming the key and the path."""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from archer_mcore.algo.token_rules import (
    TOKEN_RULES,
    ArcherRule,
    ForkingRule,
    NoneRule,
    TokenRule,
    token_rule_for,
)
from archer_mcore.config import (
    BUILTIN_TOKEN_RULES,
    AlgorithmConfig,
    ArcherRuleConfig,
    ConfigError,
    ForkingRuleConfig,
    load_config,
)
from archer_mcore.config.algorithm import TOKEN_RULE_MEMBERS

PACKAGE = Path(__file__).resolve().parents[2] / "archer_mcore"


def _protocol_members(proto: type) -> set[str]:
    names = set(getattr(proto, "__annotations__", {}))
    names |= {n for n, v in vars(proto).items() if callable(v) and not n.startswith("_")}
    return names


def test_the_loader_checks_exactly_the_protocols_members():
    assert set(TOKEN_RULE_MEMBERS) == _protocol_members(TokenRule)


def test_built_in_rules_and_their_settings_share_the_names():
    assert list(TOKEN_RULES) == list(BUILTIN_TOKEN_RULES)
    for name, cls in TOKEN_RULES.items():
        assert cls.settings_class is BUILTIN_TOKEN_RULES[name]
        assert all(hasattr(cls, m) for m in TOKEN_RULE_MEMBERS)


def test_no_rule_is_asked_for_by_name_outside_the_rules():
    # The trainer asks the rule; nothing compares token_rule (or its name) to a string.
    pattern = re.compile(r"token_rule(\.name)?\s*(==|!=|\bin\b)")
    offenders = [
        f"{p.relative_to(PACKAGE)}:{i}"
        for p in PACKAGE.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []


def test_each_rule_answers_by_hand():
    # The answers each rule gives the loss and the loop, by hand.
    e = torch.tensor([[0.1, 0.9, 0.5, 0.3, 0.0]])
    m = torch.tensor([[True, True, True, True, False]])
    none = token_rule_for(AlgorithmConfig(kl_coef=0.0))
    assert isinstance(none, NoneRule) and none.token_groups(e, m) == {}
    assert none.clip_ranges() == {"all": (0.2, 0.2)} and not none.needs_reference()
    assert token_rule_for(AlgorithmConfig(kl_coef=0.01)).needs_reference()

    a = AlgorithmConfig(
        token_rule=ArcherRuleConfig(quantile=0.5, reasoning_clip_low=0.4, reasoning_kl_coef=0.02),
        clip_high=0.28,
    )
    archer = token_rule_for(a)
    assert isinstance(archer, ArcherRule)
    # entropies 0.1 0.9 0.5 0.3: the 0.5 quantile is 0.4; 0.9 and 0.5 are above it
    g = archer.token_groups(e, m)
    assert g["reasoning"].tolist() == [[False, True, True, False, False]]
    assert g["knowledge"].tolist() == [[True, False, False, True, False]]
    assert archer.clip_ranges() == {"knowledge": (0.2, 0.28), "reasoning": (0.4, 0.2)}
    assert archer.kl_coefs() == {"knowledge": 0.0, "reasoning": 0.02}
    assert archer.needs_reference()  # the reasoning tokens' KL alone needs the reference
    assert archer.minibatch_selection(e, m, torch.tensor([0])) is None

    fork = token_rule_for(AlgorithmConfig(token_rule=ForkingRuleConfig(rho=0.5)))
    assert isinstance(fork, ForkingRule)
    g = {"all": m, **fork.token_groups(e, m)}  # k = ceil(0.5 * 4) = 2: 0.9 and 0.5
    assert g["forking"].tolist() == [[False, True, True, False, False]]
    assert fork.gradient_mask(g) is g["forking"] and fork.normalizer_mask(g) is g["forking"]
    assert fork.normalizer_tokens(m, None, [m[:, :2], m[:, 2:]]) == 1.0 + 1.0
    assert fork.minibatch_selection(e, m, torch.tensor([0])) is None  # micro_batch scope
    mini = token_rule_for(
        AlgorithmConfig(token_rule=ForkingRuleConfig(rho=0.5, scope="mini_batch", normalizer="all"))
    )
    sel = mini.minibatch_selection(e, m, torch.tensor([0]))
    assert sel is not None and sel.tolist() == g["forking"].tolist()
    assert mini.normalizer_mask(g) is m and mini.normalizer_tokens(m, sel, []) == 4.0


@pytest.fixture
def rules_module(tmp_path, monkeypatch):
    """A module `bad_rules` on sys.path with classes that are not (quite) rules."""
    (tmp_path / "bad_rules.py").write_text(
        textwrap.dedent(
            """
            from archer_mcore.algo.token_rules import TokenRuleBase

            class NotARule:
                groups = ("x",)

            class BadGroups(TokenRuleBase):
                groups = ("Low-Entropy",)

            class UsesAll(TokenRuleBase):
                groups = ("all",)

            class BadSettings(TokenRuleBase):
                settings_class = dict

            not_a_class = 3
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "bad_rules"
    sys.modules.pop("bad_rules", None)


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("no_such_pkg.rules:Rule", "cannot import 'no_such_pkg.rules' (ModuleNotFoundError"),
        ("bad_rules:Missing", "module 'bad_rules' has no class 'Missing'"),
        ("bad_rules:not_a_class", "module 'bad_rules' has no class 'not_a_class'"),
        ("bad_rules:NotARule", "is not a token rule: it lacks settings_class, token_groups"),
        ("bad_rules:BadGroups", "groups must be a tuple of distinct names other than 'all'"),
        ("bad_rules:UsesAll", "groups must be a tuple of distinct names other than 'all'"),
        ("bad_rules:BadSettings", "settings_class must be a dataclass derived from"),
    ],
)
def test_a_class_that_is_not_a_rule_is_refused_naming_key_and_path(
    tmp_path, rules_module, path, why
):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f'algorithm:\n  token_rule: "{path}"\n')
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    msg = str(err.value)
    assert msg.startswith(f"{cfg}: algorithm.token_rule = {path!r}") and why in msg, msg
