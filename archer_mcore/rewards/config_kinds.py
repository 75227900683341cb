"""The run's reward registry, built once from its config: the built-in kinds
(`registry.default_registry`) plus the kinds `rewards.kinds` adds by import path.

    rewards:
      kinds:
        - name: length_grade
          fn: "my_rewards.grades:length_grade"   # module:function
          sources: [my_dataset, "my_*"]          # routed before the built-in routes
          graded: true                           # score in [0, 1] is the reward

Every entry is checked here, and `config.checks.validate_config` calls this at config
load, so a bad entry fails before anything else starts: the module must import, the
attribute exist and be callable, the function accept the arguments of its execution
(`registry.RewardFunction`), a process kind's function pickle by reference (the
reward workers are fresh interpreters that import it by name), names be unique and
not a built-in kind's unless `override: true`. Each error names the key
(`rewards.kinds[i].fn`), the index and the path.
"""

from __future__ import annotations

import importlib
import inspect
import pickle
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from archer_mcore.config.errors import ConfigError, _at, clip
from archer_mcore.rewards.registry import BUILTIN_KINDS, RewardRegistry, default_registry

#: The arguments each execution calls its function with (`registry.RewardFunction`).
CALL_ARGUMENTS: dict[str, tuple[str, ...]] = {
    "process": ("response", "ground_truth", "extra"),
    "inline": ("response", "ground_truth", "extra"),
    "sandbox": ("response", "ground_truth", "extra", "sandbox"),
}


class KindSpec(Protocol):
    """`config.schema.RewardKindConfig`, as this module reads it."""

    name: str
    fn: str
    sources: list[str]
    execution: str
    timeout_s: float | None
    graded: bool
    override: bool


class RewardsSpec(Protocol):
    """`config.schema.RewardsConfig`, as this module reads it."""

    math_strict_answer_form: bool
    kinds: list[Any]


def registry_from_config(cfg: RewardsSpec, source: str = "config") -> RewardRegistry:
    """The built-in kinds (math with `math_strict_answer_form`, code) plus `cfg.kinds`,
    each checked (module docstring). `source` names the config file in errors
    (ConfigError)."""
    registry = default_registry(cfg.math_strict_answer_form)
    seen: set[str] = set()
    for i, spec in enumerate(cfg.kinds):
        key = f"rewards.kinds[{i}]"
        name = spec.name.strip()
        if not name:
            raise ConfigError(f"{_at(source, key + '.name')}: {key}.name must not be empty")
        if name in seen:
            raise ConfigError(
                f"{_at(source, key + '.name')}: {key}.name {clip(name)} names a kind an "
                "earlier entry of rewards.kinds already added"
            )
        seen.add(name)
        if name in BUILTIN_KINDS and not spec.override:
            raise ConfigError(
                f"{_at(source, key + '.name')}: {key}.name {clip(name)} is a built-in reward "
                f"kind ({', '.join(BUILTIN_KINDS)}); choose another name, or set "
                f"{key}.override: true to replace it"
            )
        if spec.override and name not in BUILTIN_KINDS:
            raise ConfigError(
                f"{_at(source, key + '.override')}: {key}.override is true but "
                f"{clip(name)} is not a built-in kind ({', '.join(BUILTIN_KINDS)}): there is "
                "nothing to replace"
            )
        if spec.timeout_s is not None and spec.execution != "process":
            raise ConfigError(
                f"{_at(source, key + '.timeout_s')}: {key}.timeout_s applies to execution: "
                f"process only (a worker killed at the limit); {spec.execution} kinds bound "
                "their own time"
            )
        fn = load_reward_function(spec.fn, spec.execution, key + ".fn", source)
        registry.register_kind(name, fn, spec.execution, spec.timeout_s, graded=spec.graded)  # type: ignore[arg-type]
        for j, pattern in enumerate(spec.sources):
            if not pattern.strip():
                raise ConfigError(
                    f"{_at(source, f'{key}.sources[{j}]')}: {key}.sources[{j}] is empty"
                )
            registry.map_source(pattern, name, override=True)
    return registry


def load_reward_function(path: str, execution: str, key: str, source: str = "config") -> Any:
    """The function `path` ("package.module:function") names, checked for `execution`
    (module docstring); ConfigError naming `key` and the path otherwise."""
    where = f"{_at(source, key)}: {key} = {clip(path)}"
    module_name, sep, attr = path.partition(":")
    module_name, attr = module_name.strip(), attr.strip()
    if not sep or not module_name or not attr:
        raise ConfigError(f"{where}: must be 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ConfigError(
            f"{where}: module {clip(module_name)} not found ({exc}); put its directory on "
            "PYTHONPATH or install its package (the reward workers import it too)"
        ) from None
    except Exception as exc:  # the module itself failed while importing
        raise ConfigError(
            f"{where}: importing {clip(module_name)} failed: {type(exc).__name__}: {exc}"
        ) from None
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise ConfigError(f"{where}: {clip(module_name)} has no attribute {clip(attr)}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ConfigError(f"{where}: {clip(attr)} is a {type(fn).__name__}, not callable")
    _check_signature(fn, CALL_ARGUMENTS[execution], where)
    if execution == "process":
        _check_picklable(fn, where)
    return fn


def _check_signature(fn: Callable[..., Any], args: Sequence[str], where: str) -> None:
    """`fn` accepts `len(args)` positional arguments."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without a signature: the call will tell
    try:
        signature.bind(*args)
    except TypeError as exc:
        raise ConfigError(
            f"{where}: the function must accept ({', '.join(args)}), but its signature is "
            f"{clip(str(signature))} ({exc})"
        ) from None


def _check_picklable(fn: Callable[..., Any], where: str) -> None:
    """A process kind's function goes to the worker interpreters by pickle, i.e. by
    reference: it must be a module-level function that loads back as itself."""
    if getattr(fn, "__module__", None) == "__main__":
        raise ConfigError(
            f"{where}: the function is defined in __main__, which the reward workers (fresh "
            "interpreters) cannot import; move it to a module"
        )
    try:
        loaded = pickle.loads(pickle.dumps(fn))
    except Exception as exc:
        raise ConfigError(
            f"{where}: execution: process needs a picklable module-level function (the reward "
            f"workers import it by name), and pickling it failed: {type(exc).__name__}: {exc}"
        ) from None
    if loaded is not fn and not _same_partial(loaded, fn):
        raise ConfigError(
            f"{where}: execution: process needs a module-level function: pickling it loads "
            "another object back"
        )


def _same_partial(a: Any, b: Any) -> bool:
    """functools.partial objects pickle by value: equal function and arguments."""
    import functools

    return (
        isinstance(a, functools.partial)
        and isinstance(b, functools.partial)
        and a.func is b.func
        and a.args == b.args
        and a.keywords == b.keywords
    )
