"""Benchmark evaluation recipes for `archer eval --recipe NAME|PATH`.

A recipe is a small YAML file under `configs/eval/` (or anywhere, given by path) that
names a benchmark, the data source its prepared file carries (the output of `archer
data prepare`), and the sampling settings and metrics that the Archer paper reports
for it (docs/eval.md lists the sources of every number). Loading a recipe checks
every key and value: an unknown key, a wrong type or a value out of range is a
ConfigError naming the key and the file.

Precedence in `archer eval`: the config's `eval.*` < the recipe < explicit flags
(`--samples`, `-o eval.KEY=VALUE`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from archer_mcore.config import ConfigError

#: where the recipes that ship with the trainer live (loaded by name)
RECIPE_DIR = Path(__file__).resolve().parents[2] / "configs" / "eval"

#: the metrics a recipe may ask for: avg@k (mean accuracy over the k samples of a
#: prompt, averaged over prompts) and pass@k (unbiased estimator, Chen et al. 2021)
METRIC_KINDS = ("avg", "pass")


@dataclass(frozen=True, kw_only=True)
class EvalRecipe:
    """One benchmark's evaluation settings (a file under configs/eval/)."""

    name: str
    """The recipe's name (`--recipe NAME`); by convention the file's stem."""

    description: str = ""
    """One line for humans: the benchmark and where its settings come from."""

    data_source: str = ""
    """The `data_source` value the benchmark's prepared rows carry (what `archer data
    prepare` writes; the reward registry routes on it). Empty: any source."""

    data_file: str = ""
    """The file name `archer data prepare` is expected to write for this benchmark
    (informational: the user passes it with --data)."""

    n_samples: int = 1
    """k: responses sampled per prompt (the k of avg@k / pass@k); `--samples` wins."""

    temperature: float = 1.0
    """Sampling temperature (`eval.temperature`)."""

    top_p: float = 1.0
    """Nucleus-sampling top-p in (0, 1] (`eval.top_p`)."""

    max_new_tokens: int = 1024
    """Maximum response length in tokens (`eval.max_new_tokens`)."""

    max_prompt_length: int = 0
    """Prompts longer than this many tokens are skipped (`data.max_prompt_length`);
    0: keep the config's."""

    metrics: tuple[str, ...] = ("avg", "pass")
    """The metrics the paper reports for this benchmark, each "avg" (avg@k) or "pass"
    (pass@k), at k = the number of samples actually drawn."""

    chunk_prompts: int = 0
    """Prompts per generate call: after each call a progress line (prompts done,
    elapsed, estimated time left) goes to stderr. 0: all prompts in one call (as the
    training loop's periodic eval samples)."""

    source: str = field(default="", compare=False)
    """The file the recipe was read from (set by the loader, not a YAML key)."""

    def metric_names(self, k: int) -> list[str]:
        """The reported metric keys at k samples, e.g. ["avg@64", "pass@64"]."""
        return [f"{m}@{k}" for m in self.metrics]

    def settings(self) -> dict[str, Any]:
        """The recipe as a JSON-ready dict (every field but `source`)."""
        out = dataclasses.asdict(self)
        out.pop("source")
        out["metrics"] = list(self.metrics)
        return out


#: YAML keys a recipe file may hold (every field but the loader's `source`)
RECIPE_KEYS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(EvalRecipe) if f.name != "source"
)


def available_recipes(directory: Path = RECIPE_DIR) -> list[str]:
    """The names of the recipes under `directory` (file stems), sorted."""
    if not directory.is_dir():
        return []
    return sorted(p.stem for p in directory.glob("*.yaml"))


def resolve_recipe_path(name_or_path: str, directory: Path = RECIPE_DIR) -> Path:
    """A recipe name (a file `<directory>/<name>.yaml`) or a path to a YAML file; a
    ConfigError listing the available names when it is neither."""
    if name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"--recipe: {path} is not a file")
        return path
    path = directory / f"{name_or_path}.yaml"
    if path.is_file():
        return path
    names = ", ".join(available_recipes(directory)) or "(none)"
    raise ConfigError(
        f"--recipe: no recipe named {name_or_path!r}; available: {names} "
        f"(files under {directory}), or give a path to a recipe YAML file"
    )


def load_recipe(name_or_path: str, directory: Path = RECIPE_DIR) -> EvalRecipe:
    """Read and validate a recipe by name or path (see `resolve_recipe_path`)."""
    import yaml

    path = resolve_recipe_path(name_or_path, directory)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"recipe {path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {path}: expected a mapping of keys, got {type(raw).__name__}")
    return recipe_from_dict(raw, path, default_name=path.stem)


def recipe_from_dict(raw: dict[str, Any], path: Path | str, default_name: str) -> EvalRecipe:
    """An EvalRecipe from a YAML mapping; every key and value checked, errors naming
    the key and `path`."""
    where = f"recipe {path}"
    unknown = sorted(str(k) for k in raw if k not in RECIPE_KEYS)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(RECIPE_KEYS)}"
        )
    values: dict[str, Any] = {"name": default_name}
    for key, value in raw.items():
        values[key] = _checked_value(where, key, value)
    return EvalRecipe(**values, source=str(path))


def _checked_value(where: str, key: str, value: Any) -> Any:
    """`value` converted to the field's type and range-checked; a ConfigError naming
    `key` otherwise."""
    if key in ("name", "description", "data_source", "data_file"):
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        if key == "name" and not value:
            raise ConfigError(f"{where}: name must not be empty")
        return value
    if key in ("n_samples", "max_new_tokens", "max_prompt_length", "chunk_prompts"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        least = 1 if key in ("n_samples", "max_new_tokens") else 0
        if value < least:
            raise ConfigError(f"{where}: {key} must be >= {least}, got {value}")
        return value
    if key in ("temperature", "top_p"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        if key == "temperature" and value < 0:
            raise ConfigError(f"{where}: temperature must be >= 0, got {value}")
        if key == "top_p" and not 0 < value <= 1:
            raise ConfigError(f"{where}: top_p must be in (0, 1], got {value}")
        return float(value)
    if key == "metrics":
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not items:
            raise ConfigError(f"{where}: metrics must be a non-empty list, got {value!r}")
        bad = [m for m in items if m not in METRIC_KINDS]
        if bad:
            raise ConfigError(
                f"{where}: metrics: unknown metric(s) {bad}; allowed: {', '.join(METRIC_KINDS)}"
            )
        return tuple(items)
    raise ConfigError(f"{where}: unknown key {key}")  # unreachable: RECIPE_KEYS checked


#: the `eval.*` config keys a recipe sets, and the recipe field each comes from
_EVAL_KEYS = {
    "eval.n_samples": "n_samples",
    "eval.temperature": "temperature",
    "eval.top_p": "top_p",
    "eval.max_new_tokens": "max_new_tokens",
}


def apply_recipe(cfg: Any, recipe: EvalRecipe, overrides: list[str]) -> dict[str, Any]:
    """Set the config's eval settings (and data.max_prompt_length when the recipe gives
    one) from `recipe`, except the keys an explicit `-o KEY=VALUE` in `overrides` set;
    returns {config key: value} of what the recipe set."""
    explicit = {o.split("=", 1)[0].strip() for o in overrides}
    applied: dict[str, Any] = {}
    for key, attr in _EVAL_KEYS.items():
        if key in explicit:
            continue
        value = getattr(recipe, attr)
        setattr(cfg.eval, key.split(".", 1)[1], value)
        applied[key] = value
    if recipe.max_prompt_length and "data.max_prompt_length" not in explicit:
        cfg.data.max_prompt_length = recipe.max_prompt_length
        applied["data.max_prompt_length"] = recipe.max_prompt_length
    return applied
