"""Config loading: recipes, overrides, old keys, and errors that name the file and dotted key."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import archer_mcore.config as config_module
from archer_mcore.cli import main
from archer_mcore.config import (
    BUILTIN_TOKEN_RULES,
    AlgorithmConfig,
    ArcherRuleConfig,
    Config,
    ConfigDeprecationWarning,
    ConfigError,
    ForkingRuleConfig,
    NoneRuleConfig,
    algorithm_recipe,
    config_from_dict,
    dump_yaml,
    load_config,
    recipe_names,
)
from archer_mcore.config.algorithm import RECIPES as RECIPES_DIR
from archer_mcore.config.fields import field_docs


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_defaults_load_from_empty_file(tmp_path):
    cfg = load_config(_write(tmp_path, ""))
    assert cfg == Config()
    assert cfg.algorithm.name == "grpo" and cfg.algorithm.token_rule == NoneRuleConfig()


# The papers' recipes, typed here from the papers (not read from the recipe files).
DAPO = {
    "clip_low": 0.2,
    "clip_high": 0.28,
    "clip_ratio_c": 10.0,
    "kl_coef": 0.0,
    "agg_mode": "token-mean",
    "reward_correct": 1.0,
    "reward_incorrect": -1.0,
    "group_filter": "refill",
    "max_generation_batches": 10,
    "overlong_shaping": True,
    "overlong_max_length": 20480,
    "overlong_cache_length": 4096,
}
ARCHER_CODE = {
    "token_rule": ArcherRuleConfig(
        quantile=0.8, reasoning_clip_low=0.5, reasoning_clip_high=0.5, reasoning_kl_coef=0.0
    ),
    "clip_low": 0.2,
    "clip_high": 0.2,
    "kl_coef": 0.001,
    "kl_estimator": "k3",
    "agg_mode": "seq-mean-token-mean",
    "clip_ratio_c": 10.0,
    "group_filter": "drop",
}
RECIPES = {
    "grpo": {"token_rule": NoneRuleConfig(), "kl_coef": 0.0, "group_filter": "none"},
    "dapo": {"token_rule": NoneRuleConfig(), **DAPO},
    "archer_code": ARCHER_CODE,
    "archer": ARCHER_CODE,
    "archer_math": {
        **ARCHER_CODE,
        "token_rule": ArcherRuleConfig(reasoning_clip_low=0.4, reasoning_clip_high=0.4),
    },
    "forking": {
        **DAPO,
        "token_rule": ForkingRuleConfig(rho=0.2, scope="micro_batch", normalizer="selected"),
    },
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_carry_the_papers_values(tmp_path, name):
    cfg = load_config(_write(tmp_path, f"algorithm:\n  name: {name}\n"))
    for key, value in RECIPES[name].items():
        assert getattr(cfg.algorithm, key) == value, key
    # every other key keeps the section's default
    default = AlgorithmConfig()
    for f in dataclasses.fields(AlgorithmConfig):
        if f.name not in (*RECIPES[name], "name"):
            assert getattr(cfg.algorithm, f.name) == getattr(default, f.name), f.name


def test_the_recipes_are_the_yaml_files_of_the_package():
    assert set(recipe_names()) == set(RECIPES)
    assert algorithm_recipe("archer") == algorithm_recipe("archer_code")
    assert RECIPES_DIR.is_dir() and RECIPES_DIR.parent == Path(config_module.__file__).parent
    # setup.py ships them as package data (an installed package finds them too)
    setup_py = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert '"config/recipes/*.yaml"' in setup_py


def test_recipe_fields_can_be_overridden_one_by_one(tmp_path):
    p = _write(
        tmp_path, "algorithm:\n  name: archer_math\n  token_rule: {reasoning_kl_coef: 5e-4}\n"
    )
    cfg = load_config(p, ["algorithm.clip_high=0.25", "algorithm.token_rule.quantile=0.7"])
    rule = cfg.algorithm.token_rule
    assert rule.reasoning_clip_low == 0.4  # from the recipe
    assert rule.reasoning_kl_coef == 0.0005  # from the file
    assert cfg.algorithm.clip_high == 0.25 and rule.quantile == 0.7  # from the overrides


def test_naming_another_rule_replaces_the_recipes_rule(tmp_path):
    # A rule's settings merge with the recipe's only while the rule stays the recipe's:
    # another rule starts from its own defaults. A bare name is short for {name: ...}.
    cfg = load_config(_write(tmp_path, "algorithm: {name: forking, token_rule: archer}\n"))
    assert cfg.algorithm.token_rule == ArcherRuleConfig()
    assert cfg.algorithm.clip_high == 0.28  # the recipe's other keys stay
    cfg = load_config(_write(tmp_path, "algorithm: {name: archer, token_rule: archer}\n"))
    assert cfg.algorithm.token_rule.reasoning_clip_low == 0.5


def test_the_loss_reads_the_algorithm_section_itself(tmp_path):
    # No copy in between: the object the loss takes is the config's own section, so
    # every algorithm field the loss reads arrives as loaded.
    from archer_mcore.algo.losses import LossConfig

    lc = load_config(_write(tmp_path, "algorithm: {name: archer}\n")).algorithm
    assert isinstance(lc, LossConfig)
    assert (lc.token_rule.name, lc.token_rule.reasoning_clip_high, lc.kl_coef) == (
        "archer",
        0.5,
        0.001,
    )


OLD_KEYS = [
    ("archer", "archer_quantile", 0.7, "quantile"),
    ("archer", "reasoning_clip_low", 0.3, "reasoning_clip_low"),
    ("archer", "reasoning_clip_high", 0.35, "reasoning_clip_high"),
    ("archer", "reasoning_kl_coef", 0.01, "reasoning_kl_coef"),
    ("forking", "forking_rho", 0.5, "rho"),
    ("forking", "forking_scope", "mini_batch", "scope"),
    ("forking", "forking_normalizer", "all", "normalizer"),
]


@pytest.mark.parametrize(("recipe", "old", "value", "new"), OLD_KEYS, ids=[k[1] for k in OLD_KEYS])
def test_old_flat_keys_load_with_a_message_naming_the_new_key(tmp_path, recipe, old, value, new):
    p = _write(tmp_path, f"algorithm:\n  name: {recipe}\n  {old}: {value}\n")
    with pytest.warns(ConfigDeprecationWarning) as record:
        cfg = load_config(p)
    assert getattr(cfg.algorithm.token_rule, new) == value
    (w,) = record
    assert str(w.message) == (
        f"{p}: algorithm.{old} is deprecated: it is algorithm.token_rule.{new} now, a "
        f"setting of the {recipe} rule"
    )
    # as an override too, blamed on the override
    with pytest.warns(ConfigDeprecationWarning, match=f"override 'algorithm.{old}="):
        cfg = load_config(
            _write(tmp_path, f"algorithm: {{name: {recipe}}}\n"), [f"algorithm.{old}={value}"]
        )
    assert getattr(cfg.algorithm.token_rule, new) == value


def test_an_old_key_of_another_rule_is_ignored_as_before(tmp_path):
    p = _write(tmp_path, "algorithm: {name: archer, forking_rho: 0.5}\n")
    with pytest.warns(
        ConfigDeprecationWarning, match="ignored, as algorithm.token_rule is 'archer'"
    ):
        cfg = load_config(p)
    assert (
        cfg.algorithm.token_rule
        == load_config(_write(tmp_path, "algorithm: {name: archer}\n")).algorithm.token_rule
    )
    both = _write(
        tmp_path, "algorithm: {name: archer, archer_quantile: 0.7, token_rule: {quantile: 0.6}}\n"
    )
    with (
        pytest.warns(ConfigDeprecationWarning),
        pytest.raises(ConfigError, match="both set; keep algorithm.token_rule.quantile"),
    ):
        load_config(both)


def test_loading_a_config_does_not_import_torch():
    code = "import sys, archer_mcore.config; sys.exit(int('torch' in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_exponent_without_dot_is_a_float(tmp_path):
    # YAML 1.1 reads 1e-6 as the string "1e-6"; a float field accepts it as 1e-06.
    cfg = load_config(_write(tmp_path, "optimizer:\n  lr: 1e-6\n"), ["algorithm.kl_coef=2E-3"])
    assert cfg.optimizer.lr == 1e-6 and cfg.algorithm.kl_coef == 2e-3
    with pytest.raises(ConfigError, match="train.steps must be int"):
        load_config(_write(tmp_path, "train:\n  steps: 1e3\n"))


def test_resolved_yaml_round_trips(tmp_path):
    cfg = load_config(_write(tmp_path, "algorithm: {name: forking}\nrollout: {top_k: 20}\n"))
    again = config_from_dict(yaml.safe_load(dump_yaml(cfg)))
    assert again == cfg


def test_resolved_yaml_round_trips_with_docs(tmp_path, capsys):
    p = _write(tmp_path, "algorithm: {name: archer}\n")
    assert main(["config", "show", str(p), "--doc"]) == 0
    text = capsys.readouterr().out
    cfg = load_config(p)
    assert yaml.safe_load(text) == yaml.safe_load(dump_yaml(cfg))
    # each documented field's docstring stands above it as comments, e.g. the rule's own
    lines = text.splitlines()
    at = lines.index("    quantile: 0.8")
    assert lines[at - 2 : at] == [
        "    # Tokens whose entropy is strictly above this quantile of their response's token",
        "    # entropies are reasoning tokens (ties go to knowledge).",
    ]
    assert "  # KL-to-reference coefficient (0: no reference model is built)." in lines


def test_every_algorithm_and_rule_field_is_documented():
    for cls in (AlgorithmConfig, *BUILTIN_TOKEN_RULES.values()):
        fields = {f.name for f in dataclasses.fields(cls)}
        missing = fields - set(field_docs(cls))
        assert not missing, (cls.__name__, missing)


ARCHER = "algorithm:\n  token_rule:\n    name: archer\n"
BAD = [
    (ARCHER + "    quantile: 1.5\n", "algorithm.token_rule.quantile", "out of range"),
    (ARCHER + "    quantile: 0.0\n", "algorithm.token_rule.quantile", "out of range"),
    (
        ARCHER + "    quantil: 0.5\n",
        "algorithm.token_rule.quantil",
        "did you mean algorithm.token_rule.quantile",
    ),
    ("algorithm:\n  clip_low: -0.1\n", "algorithm.clip_low", "out of range"),
    (
        ARCHER + "    reasoning_clip_high: -1\n",
        "algorithm.token_rule.reasoning_clip_high",
        "out of range",
    ),
    (
        "algorithm:\n  token_rule: {name: forking, rho: 1.5}\n",
        "algorithm.token_rule.rho",
        "out of range",
    ),
    ("algorithm:\n  token_rule: {rho: 0.5}\n", "algorithm.token_rule.rho", "unknown key"),
    (
        "algorithm:\n  token_rule: archr\n",
        "algorithm.token_rule",
        "must be one of none, archer, forking",
    ),
    ("algorithm:\n  token_rule: [archer]\n", "algorithm.token_rule", "must be a rule name"),
    ("algorithm:\n  clip_hgh: 0.3\n", "algorithm.clip_hgh", "did you mean algorithm.clip_high"),
    ("algorithm:\n  name: ppo\n", "algorithm.name", "must be one of"),
    ("algorithm:\n  kl_estimator: k4\n", "algorithm.kl_estimator", "must be one of"),
    ("rollout:\n  temperature: hot\n", "rollout.temperature", "must be float"),
    ("rollout:\n  n_samples_per_prompt: 2.5\n", "rollout.n_samples_per_prompt", "must be int"),
    ("rollout:\n  stop_token_ids: [1, x]\n", "rollout.stop_token_ids[1]", "must be int"),
    ("rollout:\n  sglang:\n    tp_sise: 2\n", "rollout.sglang.tp_sise", "unknown key"),
    ("parallel:\n  tensor_model_parallel_size: 0\n", "parallel.tensor_model_parallel_size", ">= 1"),
    ("metrics:\n  enabled: 'yes'\n", "metrics.enabled", "must be bool"),
    ("model: 3\n", "model", "must be a mapping"),
    ("modle:\n  path: x\n", "modle", "did you mean model"),
    (
        "train:\n  prompts_per_step: 10\n  mini_batch_prompts: 4\n",
        "train.prompts_per_step",
        "multiple of",
    ),
    ("algorithm:\n  overlong_cache_length: 30000\n", "algorithm.overlong_cache_length", "exceed"),
]


@pytest.mark.parametrize(("text", "key", "why"), BAD, ids=[b[1] for b in BAD])
def test_bad_values_name_file_and_key(tmp_path, text, key, why):
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(p)
    msg = str(err.value)
    assert str(p) in msg and key in msg and why in msg, msg


def test_bad_override_and_missing_file(tmp_path):
    p = _write(tmp_path, "")
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(p, ["no_equals_sign"])
    with pytest.raises(ConfigError, match="rollout.top_p"):
        load_config(p, ["rollout.top_p=2.0"])
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "broken.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml: invalid YAML"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listy)


def test_cli_config_show_and_errors(tmp_path, capsys):
    p = _write(tmp_path, "algorithm: {name: dapo}\n")
    assert main(["config", "show", str(p), "-o", "rollout.top_k=5"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["algorithm"]["clip_high"] == 0.28 and shown["rollout"]["top_k"] == 5
    bad = _write(tmp_path, "algorithm: {clip_low: -1}\n")
    assert main(["config", "show", str(bad)]) == 2
    assert "algorithm.clip_low" in capsys.readouterr().err


def test_console_script_help_and_version():
    exe = Path(sys.executable).parent / "archer"
    out = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip().startswith("archer-mcore ")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True)
    assert "config" in out.stdout
