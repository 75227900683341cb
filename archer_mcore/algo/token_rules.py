"""Token rules: which response tokens form which groups, and what each group gets.

A rule answers everything the trainer asks of it (`TokenRule`): its token groups (masks
from the entropies), each group's clip range and KL coefficient, the tokens that carry
policy gradient and the tokens the token-mean loss divides by, whether a reference
model is needed, and its mini-batch selection. `algo.losses.policy_loss`,
`train/update.py` and `train/components.py` ask the rule; none of them knows a rule by
name. A rule is built from the whole `algorithm` section (`token_rule_for`); its own
settings, `algorithm.token_rule`, are a dataclass of `config.algorithm`.

A new scheme is a new class, registered below; a rule outside the package needs no
registration: the config names it by import path (docs/design.md, "How to add a token
rule"). Shapes: B responses, L response positions; masks are bool [B, L], True on the
group's valid tokens; padding is never in a group.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Protocol

import torch.distributed as dist
from torch import Tensor

from archer_mcore.algo.token_groups import (
    archer_reasoning_mask,
    forking_k,
    forking_mask,
    forking_mask_of_rows,
)
from archer_mcore.config.algorithm import (
    AlgorithmConfig,
    ArcherRuleConfig,
    ForkingRuleConfig,
    NoneRuleConfig,
    TokenRuleConfig,
    import_token_rule,
)

Groups = dict[str, Tensor]


class TokenRule(Protocol):
    """What the trainer asks of a token rule. `groups` below always holds ``all`` (the
    valid tokens) besides the rule's own groups."""

    #: The dataclass of the rule's settings (`algorithm.token_rule`'s fields).
    settings_class: ClassVar[type[TokenRuleConfig]]
    #: The names of the rule's groups (``all`` aside): metric keys (entropy/<g>,
    #: clip/low/<g>, ...) and Prometheus labels, so [a-z][a-z0-9_]*.
    groups: ClassVar[tuple[str, ...]]

    def __init__(self, algorithm: AlgorithmConfig) -> None: ...

    def token_groups(
        self,
        entropy: Tensor,
        mask: Tensor,
        dp_group: dist.ProcessGroup | None = None,
        selection: Tensor | None = None,
    ) -> Groups:
        """The masks [B, L] of `groups` from the detached entropies [B, L] of the valid
        tokens `mask` [B, L]; `selection` is the rule's `minibatch_selection` rows of
        this call, `dp_group` the data-parallel group of the mini-batch."""
        ...

    def clip_ranges(self) -> dict[str, tuple[float, float]]:
        """Group -> (eps_low, eps_high); tokens of no listed group get the algorithm's."""
        ...

    def kl_coefs(self) -> dict[str, float]:
        """Group -> KL coefficient of that group's aggregated per-token KL."""
        ...

    def gradient_mask(self, groups: Groups) -> Tensor:
        """The tokens [B, L] that carry policy gradient."""
        ...

    def normalizer_mask(self, groups: Groups) -> Tensor:
        """The tokens [B, L] the token-mean policy-gradient term divides by."""
        ...

    def normalizer_tokens(
        self, mask: Tensor, selection: Tensor | None, microbatch_masks: Sequence[Tensor]
    ) -> float:
        """How many tokens `normalizer_mask` will hold over these rows `mask` [B, L],
        counted before the loss runs (gradient accumulation): with the mini-batch's
        `selection` [B, L], or from the micro-batches' masks [b, Lm]."""
        ...

    def minibatch_selection(self, entropy: Tensor, mask: Tensor, rows: Tensor) -> Tensor | None:
        """A selection [B, L] made once for the mini-batch `rows` from the old policy's
        entropies [B, L] (passed to `token_groups` of its micro-batches), or None."""
        ...

    def needs_reference(self) -> bool:
        """Whether the loss has a KL term, so the reference model must be built."""
        ...


class TokenRuleBase:
    """Defaults for a rule: one clip range and one KL coefficient (the algorithm's) for
    all tokens; every valid token carries policy gradient and counts in the
    normaliser; no mini-batch selection. A rule overrides what it changes."""

    settings_class: ClassVar[type[TokenRuleConfig]] = TokenRuleConfig
    groups: ClassVar[tuple[str, ...]] = ()
    algorithm: AlgorithmConfig
    settings: TokenRuleConfig  # algorithm.token_rule, an instance of `settings_class`

    def __init__(self, algorithm: AlgorithmConfig) -> None:
        self.algorithm = algorithm
        self.settings = algorithm.token_rule

    def token_groups(
        self,
        entropy: Tensor,
        mask: Tensor,
        dp_group: dist.ProcessGroup | None = None,
        selection: Tensor | None = None,
    ) -> Groups:
        return {}

    def clip_ranges(self) -> dict[str, tuple[float, float]]:
        return {"all": (self.algorithm.clip_low, self.algorithm.clip_high)}

    def kl_coefs(self) -> dict[str, float]:
        return {"all": self.algorithm.kl_coef}

    def gradient_mask(self, groups: Groups) -> Tensor:
        return groups["all"]

    def normalizer_mask(self, groups: Groups) -> Tensor:
        return groups["all"]

    def normalizer_tokens(
        self, mask: Tensor, selection: Tensor | None, microbatch_masks: Sequence[Tensor]
    ) -> float:
        return float(mask.sum())

    def minibatch_selection(self, entropy: Tensor, mask: Tensor, rows: Tensor) -> Tensor | None:
        return None

    def needs_reference(self) -> bool:
        return any(coef > 0 for coef in self.kl_coefs().values())


class NoneRule(TokenRuleBase):
    """GRPO / DAPO: every valid token in one group, ``all``."""

    settings_class = NoneRuleConfig


class ArcherRule(TokenRuleBase):
    """Archer's dual-token constraints: per response, tokens strictly above the
    response's entropy quantile are ``reasoning`` tokens, the rest ``knowledge`` tokens;
    all are updated, each group under its own clip range and KL coefficient."""

    settings_class = ArcherRuleConfig
    groups = ("knowledge", "reasoning")
    settings: ArcherRuleConfig

    def token_groups(
        self,
        entropy: Tensor,
        mask: Tensor,
        dp_group: dist.ProcessGroup | None = None,
        selection: Tensor | None = None,
    ) -> Groups:
        reasoning = archer_reasoning_mask(entropy, mask, self.settings.quantile)
        return {"knowledge": mask & ~reasoning, "reasoning": reasoning}

    def clip_ranges(self) -> dict[str, tuple[float, float]]:
        s, a = self.settings, self.algorithm
        return {
            "knowledge": (a.clip_low, a.clip_high),
            "reasoning": (s.reasoning_clip_low, s.reasoning_clip_high),
        }

    def kl_coefs(self) -> dict[str, float]:
        return {"knowledge": self.algorithm.kl_coef, "reasoning": self.settings.reasoning_kl_coef}


class ForkingRule(TokenRuleBase):
    """Forking tokens: only the top-rho entropy tokens (``forking``) carry policy
    gradient, the rest (``other``) none; chosen per micro-batch, or once per mini-batch
    (`minibatch_selection`)."""

    settings_class = ForkingRuleConfig
    groups = ("forking", "other")
    settings: ForkingRuleConfig

    def token_groups(
        self,
        entropy: Tensor,
        mask: Tensor,
        dp_group: dist.ProcessGroup | None = None,
        selection: Tensor | None = None,
    ) -> Groups:
        """`selection`: the mini-batch's choice; else the top-rho tokens of this call's
        tensors (with `dp_group`: of the union over that group)."""
        if selection is not None:
            fork = selection & mask
        else:
            fork = forking_mask(entropy, mask, self.settings.rho, dp_group)
        return {"forking": fork, "other": mask & ~fork}

    def gradient_mask(self, groups: Groups) -> Tensor:
        return groups["forking"]

    def normalizer_mask(self, groups: Groups) -> Tensor:
        return groups["forking"] if self.settings.normalizer == "selected" else groups["all"]

    def normalizer_tokens(
        self, mask: Tensor, selection: Tensor | None, microbatch_masks: Sequence[Tensor]
    ) -> float:
        """ "selected": the selected valid tokens, or without a mini-batch selection
        forking_k(N) per micro-batch of N valid tokens."""
        if self.settings.normalizer != "selected":
            return float(mask.sum())
        if selection is None:
            rho = self.settings.rho
            return float(sum(forking_k(int(m.sum()), rho) for m in microbatch_masks))
        return float((selection.bool() & mask).sum())

    def minibatch_selection(self, entropy: Tensor, mask: Tensor, rows: Tensor) -> Tensor | None:
        """scope mini_batch: the top-rho tokens of the rows `rows` together."""
        if self.settings.scope != "mini_batch":
            return None
        return forking_mask_of_rows(entropy, mask, rows, self.settings.rho)


#: The package's rules by `algorithm.token_rule.name` (their settings:
#: `config.algorithm.BUILTIN_TOKEN_RULES`, under the same names).
TOKEN_RULES: dict[str, type[TokenRule]] = {
    "none": NoneRule,
    "archer": ArcherRule,
    "forking": ForkingRule,
}


def token_rule_for(algorithm: AlgorithmConfig) -> TokenRule:
    """The rule `algorithm.token_rule` names (built in, or imported by its path),
    built from the algorithm section."""
    name = algorithm.token_rule.name
    cls = TOKEN_RULES.get(name) or import_token_rule(name)
    return cls(algorithm)
