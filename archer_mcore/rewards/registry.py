"""Which reward function scores which request.

A request's reward kind is its explicit `kind` if set, else the kind its
`data_source` maps to: an exact (case-insensitive) source name first, then glob
patterns in registration order. Routes mapped with `override=True` (the config's
`rewards.kinds[i].sources`) are looked up before all others, in the same way. Kinds
map to `RewardKind`s: a function, how it runs (in a killable worker process with a
timeout, in the code sandbox, or inline) and whether its score is graded.

The trainer builds one registry from its config (`rewards.config_kinds.
registry_from_config`: the built-in kinds of `default_registry` plus `rewards.kinds`)
and hands it to the data routing and the scorer.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

Execution = Literal["process", "sandbox", "inline"]

# process: fn(response, ground_truth, extra) -> RewardResult | bool | float, picklable
#          (module-level), run in a KillablePool worker under `timeout_s`.
# sandbox: fn(response, ground_truth, extra, sandbox) -> RewardResult, run in a scorer
#          thread; it must bound its own time (sandboxed runs have wall limits).
# inline:  fn(response, ground_truth, extra) -> ..., run in a scorer thread; it must be
#          fast and bounded (the batch deadline is the only backstop).
RewardFunction = Callable[..., Any]


@dataclass(frozen=True, kw_only=True)
class RewardKind:
    """One reward: `fn` run as `execution` says (see `RewardFunction`).

    timeout_s: process kinds' time limit, seconds; None uses the scorer's default.
    graded: the result's `score` (in [0, 1]) is the reward signal; False: pass/fail,
        `correct` is.
    """

    name: str
    fn: RewardFunction
    execution: Execution = "process"
    timeout_s: float | None = None
    graded: bool = False


def _math_fn(
    response: str, ground_truth: Any, extra: dict[str, Any], strict_answer_form: bool = True
) -> Any:
    from archer_mcore.rewards.math_reward import score_math

    return score_math(response, ground_truth, strict_answer_form=strict_answer_form)


def _code_fn(response: str, ground_truth: Any, extra: dict[str, Any], sandbox: Any) -> Any:
    from archer_mcore.rewards.code_reward import score_code

    return score_code(response, ground_truth, sandbox, fn_name=extra.get("fn_name"))


MATH_SOURCES = (
    "synthetic_arithmetic",
    "openai/gsm8k",
    "gsm8k",
    "lighteval/math",
    "digitallearninggmbh/math-lighteval",
    "math_dapo",
    "*math*",
    "*gsm8k*",
    "aime*",
    "amc*",
    "*deepscaler*",
    "*dapo*",
    "*olympiad*",
    "*minerva*",
)
CODE_SOURCES = (
    "codecontests",
    "apps",
    "taco",
    "primeintellect",
    "livecodebench",
    "*code*",
    "*apps*",
    "*taco*",
    "*codeforces*",
    "*leetcode*",
    "*livecodebench*",
    "*primeintellect*",
)


class _Routes:
    """Exact source names and glob patterns -> kind names."""

    def __init__(self) -> None:
        self.exact: dict[str, str] = {}
        self.patterns: list[tuple[str, str]] = []

    def find(self, key: str) -> str | None:
        name = self.exact.get(key)
        if name is None:
            name = next((k for p, k in self.patterns if fnmatch.fnmatchcase(key, p)), None)
        return name


class RewardRegistry:
    """Reward kinds and the data sources that use them."""

    def __init__(self) -> None:
        self._kinds: dict[str, RewardKind] = {}
        self._overrides = _Routes()  # looked up first (the config's sources)
        self._routes = _Routes()

    def register_kind(
        self,
        name: str,
        fn: RewardFunction,
        execution: Execution = "process",
        timeout_s: float | None = None,
        *,
        graded: bool = False,
    ) -> None:
        """Add (or replace) kind `name`."""
        if execution not in ("process", "sandbox", "inline"):
            raise ValueError(f"reward kind {name!r}: unknown execution {execution!r}")
        self._kinds[name] = RewardKind(
            name=name, fn=fn, execution=execution, timeout_s=timeout_s, graded=graded
        )

    def map_source(self, source: str, kind: str, *, override: bool = False) -> None:
        """Route `data_source` values equal to (or, with * ? [], matching) `source`;
        `override`: before every route mapped without it."""
        if kind not in self._kinds:
            raise KeyError(f"unknown reward kind {kind!r}; registered: {sorted(self._kinds)}")
        routes = self._overrides if override else self._routes
        key = source.lower()
        if any(ch in key for ch in "*?["):
            routes.patterns.append((key, kind))
        else:
            routes.exact[key] = kind

    def kind_for(self, data_source: str, explicit_kind: str | None = None) -> RewardKind | None:
        """The reward kind for a request; None if nothing matches."""
        if explicit_kind:
            return self._kinds.get(explicit_kind)
        key = data_source.lower()
        name = self._overrides.find(key) or self._routes.find(key)
        return self._kinds.get(name) if name else None

    @property
    def kinds(self) -> dict[str, RewardKind]:
        return dict(self._kinds)


#: The kinds `default_registry` registers; a config entry of one of these names must
#: say `override: true`.
BUILTIN_KINDS: tuple[str, ...] = ("math", "code")


def default_registry(math_strict_answer_form: bool = True) -> RewardRegistry:
    """math (math-verify, in worker processes) and code (sandboxed), common sources.

    math_strict_answer_form: see `archer_mcore.rewards.math_reward` (answer form).
    """
    reg = RewardRegistry()
    math_fn = functools.partial(_math_fn, strict_answer_form=math_strict_answer_form)
    reg.register_kind("math", math_fn, "process")
    reg.register_kind("code", _code_fn, "sandbox")
    for source in MATH_SOURCES:
        reg.map_source(source, "math")
    for source in CODE_SOURCES:
        reg.map_source(source, "code")
    return reg
