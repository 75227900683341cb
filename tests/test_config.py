"""Config loading: presets, overrides, and errors that name the file and dotted key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from archer_mcore.cli import main
from archer_mcore.config import (
    ALGORITHM_PRESETS,
    Config,
    ConfigError,
    config_from_dict,
    dump_yaml,
    load_config,
)


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_defaults_load_from_empty_file(tmp_path):
    cfg = load_config(_write(tmp_path, ""))
    assert cfg == Config()
    assert cfg.algorithm.name == "grpo" and cfg.algorithm.token_rule == "none"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (
            "dapo",
            {
                "clip_low": 0.2,
                "clip_high": 0.28,
                "clip_ratio_c": 10.0,
                "kl_coef": 0.0,
                "agg_mode": "token-mean",
                "reward_incorrect": -1.0,
                "group_filter": "refill",
                "overlong_shaping": True,
            },
        ),
        (
            "archer_code",
            {
                "token_rule": "archer",
                "clip_low": 0.2,
                "clip_high": 0.2,
                "reasoning_clip_low": 0.5,
                "reasoning_clip_high": 0.5,
                "kl_coef": 0.001,
                "reasoning_kl_coef": 0.0,
                "kl_estimator": "k3",
                "agg_mode": "seq-mean-token-mean",
                "clip_ratio_c": 10.0,
                "archer_quantile": 0.8,
                "group_filter": "drop",
            },
        ),
        ("archer_math", {"reasoning_clip_low": 0.4, "reasoning_clip_high": 0.4, "kl_coef": 0.001}),
        (
            "forking",
            {
                "token_rule": "forking",
                "forking_rho": 0.2,
                "clip_high": 0.28,
                "forking_scope": "micro_batch",
                "forking_normalizer": "selected",
                "agg_mode": "token-mean",
                "clip_ratio_c": 10.0,
            },
        ),
        ("grpo", {"token_rule": "none", "kl_coef": 0.0, "group_filter": "none"}),
    ],
)
def test_presets_carry_the_papers_recipes(tmp_path, name, expected):
    cfg = load_config(_write(tmp_path, f"algorithm:\n  name: {name}\n"))
    for key, value in expected.items():
        assert getattr(cfg.algorithm, key) == value, key


def test_preset_fields_can_be_overridden_one_by_one(tmp_path):
    p = _write(tmp_path, "algorithm:\n  name: archer_math\n  reasoning_kl_coef: 0.0005\n")
    cfg = load_config(p, ["algorithm.clip_high=0.25"])
    assert cfg.algorithm.reasoning_clip_low == 0.4  # from the preset
    assert cfg.algorithm.reasoning_kl_coef == 0.0005  # from the file
    assert cfg.algorithm.clip_high == 0.25  # from the override


def test_the_loss_reads_the_algorithm_section_itself(tmp_path):
    # No copy in between: the object the loss takes is the config's own section, so
    # every algorithm field the loss reads arrives as loaded.
    from archer_mcore.algo.losses import LossConfig

    lc = load_config(_write(tmp_path, "algorithm: {name: archer}\n")).algorithm
    assert isinstance(lc, LossConfig)
    assert (lc.token_rule, lc.reasoning_clip_high, lc.kl_coef) == ("archer", 0.5, 0.001)


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


def test_all_presets_are_valid():
    for name in ALGORITHM_PRESETS:
        assert config_from_dict({"algorithm": {"name": name}}).algorithm.name == name


BAD = [
    ("algorithm:\n  archer_quantile: 1.5\n", "algorithm.archer_quantile", "out of range"),
    ("algorithm:\n  archer_quantile: 0.0\n", "algorithm.archer_quantile", "out of range"),
    ("algorithm:\n  clip_low: -0.1\n", "algorithm.clip_low", "out of range"),
    ("algorithm:\n  reasoning_clip_high: -1\n", "algorithm.reasoning_clip_high", "out of range"),
    ("algorithm:\n  forking_rho: 1.5\n", "algorithm.forking_rho", "out of range"),
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
