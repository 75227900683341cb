"""data.max_prompt_length + rollout/eval.max_new_tokens against the model's positions:
a config error at load (inline model.arch) or at component build before the policy
(model.path), unless YaRN rope scaling extends the positions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from archer_mcore.config import ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[2]


def test_inline_arch_checked_at_load_naming_both_keys():
    ok = {"model": {"arch": {"max_position_embeddings": 300}}, "data": {"max_prompt_length": 100}}
    cfg = config_from_dict(
        {**ok, "rollout": {"max_new_tokens": 200}, "eval": {"max_new_tokens": 8}}
    )
    assert cfg.rollout.max_new_tokens == 200  # exactly at the limit: accepted
    with pytest.raises(ConfigError) as e:
        config_from_dict({**ok, "rollout": {"max_new_tokens": 201}, "eval": {"max_new_tokens": 8}})
    msg = str(e.value)
    for key in ("data.max_prompt_length (100)", "rollout.max_new_tokens (201)", "= 301"):
        assert key in msg, msg
    assert "model.arch.max_position_embeddings = 300" in msg and "yarn" in msg
    with pytest.raises(ConfigError, match=r"eval\.max_new_tokens \(250\)"):
        config_from_dict({**ok, "rollout": {"max_new_tokens": 8}, "eval": {"max_new_tokens": 250}})


def test_defaults_and_shipped_configs_fit():
    config_from_dict({})
    load_config(REPO / "configs" / "demo_cpu.yaml")


def test_demo_override_past_limit_fails_at_load(tmp_path):
    with pytest.raises(ConfigError, match="rollout.max_new_tokens"):
        load_config(REPO / "configs" / "demo_cpu.yaml", ["rollout.max_new_tokens=200"])


def _hf_dir(tmp_path: Path, **extra) -> Path:
    d = tmp_path / "hf"
    d.mkdir()
    cfg = {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "max_position_embeddings": 64,
        "tie_word_embeddings": True,
        **extra,
    }
    from archer_mcore.data.arithmetic_tokenizer import build_arithmetic_tokenizer

    build_arithmetic_tokenizer(d)  # the synthetic task's tokenizer, read from model.path
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def _build(tmp_path: Path, model_dir: Path, new_tokens: int):
    from archer_mcore.train import components

    cfg = config_from_dict(
        {
            "model": {"path": str(model_dir), "tokenizer": ""},
            "data": {"max_prompt_length": 32, "synthetic_train_size": 16, "synthetic_eval_size": 4},
            "rollout": {"max_new_tokens": new_tokens},
            "eval": {"max_new_tokens": 8},
            "train": {"output_dir": str(tmp_path / "run")},
            "warmstart": {"cache_dir": str(tmp_path / "cache")},
            "metrics": {"enabled": False},
        }
    )
    return components.build_components(cfg)


def test_model_path_checked_before_the_policy(tmp_path, monkeypatch):
    """32 + 40 > 64 positions: ConfigError naming the keys and the config.json, raised
    before MegatronPolicy.from_hf is ever called."""
    from archer_mcore.actor import policy

    def no_policy(*a, **k):
        raise AssertionError("the policy was built before the position check")

    monkeypatch.setattr(policy.MegatronPolicy, "from_hf", no_policy)
    d = _hf_dir(tmp_path)
    with pytest.raises(ConfigError) as e:
        _build(tmp_path, d, 40)
    msg = str(e.value)
    assert "data.max_prompt_length (32) + rollout.max_new_tokens (40) = 72" in msg
    assert f"max_position_embeddings of {d}/config.json = 64" in msg


def test_yarn_extends_the_limit(tmp_path, monkeypatch):
    """The same run with YaRN factor 2 over 64 positions (128) passes the check (and
    reaches the policy); factor x original still bounds it."""
    from archer_mcore.actor import policy

    class Reached(Exception):
        pass

    def reached(*a, **k):
        raise Reached

    monkeypatch.setattr(policy.MegatronPolicy, "from_hf", reached)
    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}
    d = _hf_dir(tmp_path, rope_scaling=yarn)
    with pytest.raises(Reached):
        _build(tmp_path, d, 96)
    with pytest.raises(ConfigError, match=r"rope_scaling.factor x .* = 128: .*raise rope_scaling"):
        _build(tmp_path, d, 97)
