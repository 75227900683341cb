"""The `algorithm` section: the RL objective, its token rule's own settings, and the
papers' recipes (YAML files in archer_mcore/config/recipes/) that `algorithm.name`
loads.

A token rule decides which response tokens form which groups, and what each group gets
(clip range, KL coefficient, policy gradient, a place in the loss's normaliser). The
rules' behaviour lives in `archer_mcore.algo.token_rules` (torch); their settings live
here (no torch), one dataclass per rule, nested under `algorithm.token_rule` and tagged
by `name`:

    algorithm:
      token_rule: {name: archer, quantile: 0.8, reasoning_clip_low: 0.5}

`token_rule: archer` is short for `{name: archer}`. A rule outside the package is named
by its import path, `token_rule: "mypkg.rules:MyRule"`; it is imported at load and must
have every member of `archer_mcore.algo.token_rules.TokenRule` (`TOKEN_RULE_MEMBERS`).
"""

from __future__ import annotations

import importlib
import inspect
import re
import warnings
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal

import yaml

from archer_mcore.config.errors import ConfigError, _at, clip
from archer_mcore.config.fields import checked

AGG_MODES: tuple[str, ...] = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")


# ---------------------------------------------------------------- token rule settings
@dataclass(kw_only=True)
class TokenRuleConfig:
    """A token rule's settings: its name and its own fields. A rule class declares its
    settings as a dataclass derived from this one (`settings_class`); a rule with no
    settings of its own uses this class as it is."""

    name: str = "none"
    """The token rule: none, archer, forking, or the import path of a rule class,
    "package.module:Class" (docs/design.md, "How to add a token rule")."""

    def check(self, algorithm: AlgorithmConfig, where: str) -> None:
        """Checks of this rule's settings against the rest of `algorithm`, run at load;
        raise ConfigError (`where`: the file or override). None by default."""


@dataclass(kw_only=True)
class NoneRuleConfig(TokenRuleConfig):
    """Every valid token is in one group, `all` (GRPO, DAPO)."""

    name: Literal["none"] = "none"


@dataclass(kw_only=True)
class ArcherRuleConfig(TokenRuleConfig):
    """Archer's dual-token constraints: per response, the high-entropy tokens are
    `reasoning` tokens, the rest `knowledge` tokens; all are updated, each group under
    its own clip range and KL coefficient (knowledge: algorithm.clip_low / clip_high /
    kl_coef)."""

    name: Literal["archer"] = "archer"
    quantile: float = checked(0.8, gt=0.0, lt=1.0)
    """Tokens whose entropy is strictly above this quantile of their response's token
    entropies are reasoning tokens (ties go to knowledge)."""
    reasoning_clip_low: float = checked(0.2, ge=0.0, lt=1.0)
    """Lower clip eps of reasoning tokens: the ratio is clipped at 1 - eps for A < 0."""
    reasoning_clip_high: float = checked(0.2, ge=0.0)
    """Upper clip eps of reasoning tokens: the ratio is clipped at 1 + eps for A > 0."""
    reasoning_kl_coef: float = checked(0.0, ge=0.0)
    """KL coefficient of reasoning tokens (0: no KL on them)."""


@dataclass(kw_only=True)
class ForkingRuleConfig(TokenRuleConfig):
    """Forking tokens ("Beyond the 80/20 rule"): only the top-rho entropy tokens
    (`forking`) carry policy gradient; the rest (`other`) carry none."""

    name: Literal["forking"] = "forking"
    rho: float = checked(0.2, gt=0.0, le=1.0)
    """Share of the valid tokens selected: the top max(1, ceil(rho N)) entropies."""
    scope: Literal["micro_batch", "mini_batch"] = "micro_batch"
    """micro_batch: the top-rho tokens of each micro-batch, by the current policy's
    entropies (the paper's code); mini_batch: of the whole mini-batch over every
    data-parallel rank, by the old policy's entropies from the scoring pass."""
    normalizer: Literal["selected", "all"] = "selected"
    """The tokens the token-mean loss divides by: the selected tokens, or all valid
    tokens."""

    def check(self, algorithm: AlgorithmConfig, where: str) -> None:
        """The "selected" normaliser with a seq-mean mode is refused: per response it
        divides by that response's selected tokens and averages over the responses
        that have one, a count known only once the micro-batch's tokens are selected,
        so the micro-batch losses would not add up to the mini-batch loss."""
        if self.normalizer == "selected" and algorithm.agg_mode != "token-mean":
            raise ConfigError(
                f"{_at(where, 'algorithm.token_rule.normalizer')}: the forking rule's "
                f"normalizer 'selected' needs algorithm.agg_mode token-mean, got "
                f"{algorithm.agg_mode!r}: with a seq-mean mode each response's loss would "
                "be averaged over its own selected tokens and the mean taken over the "
                "responses that have one, a count only known once each micro-batch's "
                "tokens are selected, so the micro-batch losses would not add up to the "
                "mini-batch loss. Use agg_mode: token-mean, or token_rule.normalizer: all"
            )


#: The package's token rules' settings, by name (their behaviour:
#: `archer_mcore.algo.token_rules.TOKEN_RULES`, under the same names).
BUILTIN_TOKEN_RULES: dict[str, type[TokenRuleConfig]] = {
    "none": NoneRuleConfig,
    "archer": ArcherRuleConfig,
    "forking": ForkingRuleConfig,
}

#: What a rule class must have (the members of `archer_mcore.algo.token_rules.TokenRule`;
#: tests/algo/test_token_rules.py keeps the two equal), checked when the config names one.
TOKEN_RULE_MEMBERS: tuple[str, ...] = (
    "settings_class",
    "groups",
    "token_groups",
    "clip_ranges",
    "kl_coefs",
    "gradient_mask",
    "normalizer_mask",
    "normalizer_tokens",
    "minibatch_selection",
    "needs_reference",
)
#: A token group's name: a metric key part and a Prometheus label value.
GROUP_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")
_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_RULE_CLASSES: dict[str, type] = {}


def import_token_rule(path: str, key: str = "algorithm.token_rule", where: str = "") -> type:
    """The rule class at import path "package.module:Class", imported and checked for
    the members a rule has; ConfigError naming `key` and the path otherwise."""
    if path in _RULE_CLASSES:
        return _RULE_CLASSES[path]
    at = f"{_at(where, key)}: " if where else ""
    if not isinstance(path, str) or not _IMPORT_PATH.fullmatch(path):
        raise ConfigError(
            f"{at}{key} must be one of {', '.join(BUILTIN_TOKEN_RULES)} or the import path "
            f"of a rule class, 'package.module:Class', got {clip(path)}"
        )
    module_name, _, attr = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # the user's module: any error is a config error
        raise ConfigError(
            f"{at}{key} = {path!r}: cannot import {module_name!r} ({type(exc).__name__}: {exc})"
        ) from None
    cls = getattr(module, attr, None)
    if not inspect.isclass(cls):
        raise ConfigError(f"{at}{key} = {path!r}: module {module_name!r} has no class {attr!r}")
    missing = [m for m in TOKEN_RULE_MEMBERS if not hasattr(cls, m)]
    if missing:
        raise ConfigError(
            f"{at}{key} = {path!r} is not a token rule: it lacks {', '.join(missing)} "
            "(archer_mcore.algo.token_rules.TokenRule; derive from TokenRuleBase for the "
            "defaults)"
        )
    settings = cls.settings_class
    if not (inspect.isclass(settings) and issubclass(settings, TokenRuleConfig)):
        raise ConfigError(
            f"{at}{key} = {path!r}: settings_class must be a dataclass derived from "
            f"archer_mcore.config.TokenRuleConfig, got {clip(settings)}"
        )
    groups = cls.groups
    bad = [g for g in groups if not (isinstance(g, str) and GROUP_NAME.fullmatch(g))]
    if not isinstance(groups, tuple) or bad or "all" in groups or len(set(groups)) < len(groups):
        raise ConfigError(
            f"{at}{key} = {path!r}: groups must be a tuple of distinct names other than "
            f"'all', each matching {GROUP_NAME.pattern} (metric keys and Prometheus "
            f"labels), got {clip(groups)}"
        )
    _RULE_CLASSES[path] = cls
    return cls


def token_rule_settings_class(name: Any, key: str, where: str) -> type[TokenRuleConfig]:
    """The settings dataclass of the rule `name` (a built-in name or an import path)."""
    if isinstance(name, str) and name in BUILTIN_TOKEN_RULES:
        return BUILTIN_TOKEN_RULES[name]
    return import_token_rule(name, key, where).settings_class


# ---------------------------------------------------------------- the section
@dataclass(kw_only=True)
class AlgorithmConfig:
    """The RL objective. Clip and KL keys apply to all tokens, or, under the archer
    rule, to the knowledge tokens (its reasoning tokens have settings of their own)."""

    name: str = "grpo"
    """The recipe loaded first: grpo, dapo, archer (= archer_code), archer_code,
    archer_math or forking (archer_mcore/config/recipes/<name>.yaml). The config's own
    algorithm keys override the recipe's one by one (token_rule's fields too, while the
    rule's name stays the recipe's)."""
    norm_adv_by_std: bool = True
    """GRPO advantages: divide (reward - group mean) by the group's standard deviation."""
    token_rule: TokenRuleConfig = field(default_factory=NoneRuleConfig)
    """Which tokens form which groups, and what each group gets: none, archer, forking,
    or a rule class's import path, with the rule's own settings beside its name."""
    clip_low: float = checked(0.2, ge=0.0, lt=1.0)
    """PPO lower clip eps: the ratio is clipped at 1 - eps for A < 0."""
    clip_high: float = checked(0.2, ge=0.0)
    """PPO upper clip eps: the ratio is clipped at 1 + eps for A > 0 (DAPO's clip-higher)."""
    clip_ratio_c: float | None = checked(3.0, gt=1.0)
    """Dual clip: for A < 0 the token loss is capped at -A c; null: off."""
    kl_coef: float = checked(0.0, ge=0.0)
    """KL-to-reference coefficient (0: no reference model is built)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"
    """The per-token KL estimator (Schulman's k1, k2, k3)."""
    entropy_coef: float = checked(0.0, ge=0.0)
    """Entropy bonus: the loss subtracts coef * the aggregated token entropy."""
    agg_mode: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean"
    """How token losses become the loss: the mean over all tokens, or per response the
    token mean (or sum), then the mean over responses."""
    reward_correct: float = 1.0
    """Reward of a response the verifier accepts."""
    reward_incorrect: float = 0.0
    """Reward of a response the verifier rejects."""
    overlong_shaping: bool = False
    """DAPO's overlong punishment: a linear penalty over the last overlong_cache_length
    tokens before overlong_max_length."""
    overlong_max_length: int = checked(20480, gt=0)
    """Response length (tokens) at which the overlong penalty reaches -1."""
    overlong_cache_length: int = checked(4096, gt=0)
    """Length of the penalty's ramp, in tokens."""
    group_filter: Literal["none", "drop", "refill"] = "none"
    """Groups whose responses all got the same reward: keep them (none), drop them, or
    drop them and generate more (DAPO's dynamic sampling, refill)."""
    max_generation_batches: int = checked(10, ge=1)
    """refill: the most generation batches one step may take."""


# ---------------------------------------------------------------- recipes
RECIPES = resources.files("archer_mcore.config") / "recipes"


def recipe_names() -> tuple[str, ...]:
    """The recipes `algorithm.name` may select (the YAML files' names)."""
    return tuple(
        sorted(p.name[: -len(".yaml")] for p in RECIPES.iterdir() if p.name.endswith(".yaml"))
    )


def algorithm_recipe(name: str) -> dict[str, Any]:
    """The recipe's algorithm keys, as its YAML file holds them."""
    return yaml.safe_load((RECIPES / f"{name}.yaml").read_text()) or {}


#: The old flat keys and where they live now: (the rule they belong to, the field).
DEPRECATED_KEYS: dict[str, tuple[str, str]] = {
    "archer_quantile": ("archer", "quantile"),
    "reasoning_clip_low": ("archer", "reasoning_clip_low"),
    "reasoning_clip_high": ("archer", "reasoning_clip_high"),
    "reasoning_kl_coef": ("archer", "reasoning_kl_coef"),
    "forking_rho": ("forking", "rho"),
    "forking_scope": ("forking", "scope"),
    "forking_normalizer": ("forking", "normalizer"),
}


class ConfigDeprecationWarning(FutureWarning):
    """A config key that still loads but has a new name (shown by default)."""


def _rule_mapping(value: Any, key: str, where: str) -> dict[str, Any]:
    """`token_rule` as a mapping: a bare name becomes {name: ...}."""
    if isinstance(value, str):
        return {"name": value}
    if not isinstance(value, dict):
        raise ConfigError(
            f"{_at(where, key)}: {key} must be a rule name, an import path or a mapping "
            f"with a name, got {clip(value)}"
        )
    return dict(value)


def expand_algorithm(raw: dict[str, Any], prefix: str, where: str) -> dict[str, Any]:
    """The algorithm section's keys with its recipe under them and the old flat keys
    moved to their place under token_rule (each with a ConfigDeprecationWarning).

    The recipe's keys come first and the section's own override them; token_rule's
    fields merge the same way while the section names the recipe's rule (or none).
    An old key of a rule other than the one selected is ignored, as it always was.
    """
    name = raw.get("name", AlgorithmConfig.name)
    names = recipe_names()
    if name not in names:
        raise ConfigError(
            f"{_at(where, prefix + 'name')}: {prefix}name must be one of "
            f"{', '.join(names)}, got {clip(name)}"
        )
    recipe = algorithm_recipe(name)
    out = {**recipe, **{k: v for k, v in raw.items() if k not in DEPRECATED_KEYS}}
    key = prefix + "token_rule"
    rule = _rule_mapping(recipe.get("token_rule", "none"), key, where)
    if "token_rule" in raw:
        own = _rule_mapping(raw["token_rule"], key, where)
        same = own.get("name", rule["name"]) == rule["name"]
        rule = {**rule, **own} if same else own
    selected = rule.get("name", "none")
    for old in [k for k in raw if k in DEPRECATED_KEYS]:
        rule_name, new = DEPRECATED_KEYS[old]
        where_old = _at(where, prefix + old)
        ignored = "" if selected == rule_name else f"; ignored, as {key} is {clip(selected)}"
        warnings.warn(
            f"{where_old}: {prefix}{old} is deprecated: it is {key}.{new} now, a setting "
            f"of the {rule_name} rule{ignored}",
            ConfigDeprecationWarning,
            stacklevel=2,
        )
        if ignored:
            continue
        if isinstance(raw.get("token_rule"), dict) and new in raw["token_rule"]:
            raise ConfigError(
                f"{where_old}: {prefix}{old} and {key}.{new} are both set; keep {key}.{new}"
            )
        rule[new] = raw[old]
    out["token_rule"] = rule
    return out
