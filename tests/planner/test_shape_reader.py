"""The planner sizes the model the trainer builds: both read a config's `model` section
through `model.hf_config.model_hf_config`, and a relative `model.path` is found from the
config file's directory when the working directory is elsewhere."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from archer_mcore.config import ConfigError, load_config
from archer_mcore.model.hf_config import model_hf_config, shape_from_hf_config
from archer_mcore.plan import shape_from_config

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("preset", ["demo_cpu", "qwen3_8b_archer", "r1_distill_1p5b_archer"])
def test_planner_and_builder_read_the_same_shape(tmp_path: Path, monkeypatch, preset: str):
    from archer_mcore.data.prepare import build_tokenizer
    from archer_mcore.train.components import hf_config_dict

    monkeypatch.chdir(ROOT)  # the presets' model.path is relative to the repository
    path = ROOT / "configs" / f"{preset}.yaml"
    cfg = load_config(path)
    tok = build_tokenizer(load_config(ROOT / "configs" / "demo_cpu.yaml"), tmp_path)
    built = shape_from_hf_config(hf_config_dict(cfg, tok))
    assert shape_from_config(cfg, path) == built
    if not cfg.model.path:  # the inline arch, field by field (hand-read from the YAML)
        a = cfg.model.arch
        assert (built.vocab_size, built.hidden_size, built.ffn_hidden_size) == (
            a.vocab_size,
            a.hidden_size,
            a.intermediate_size,
        )
        assert (built.num_layers, built.num_heads, built.num_kv_heads, built.head_dim) == (
            a.num_hidden_layers,
            a.num_attention_heads,
            a.num_key_value_heads,
            a.head_dim,
        )
        assert built.qk_norm == (a.family == "qwen3") and built.qkv_bias == (a.family == "qwen2")
    else:  # the file itself, read here with json
        raw = json.loads((ROOT / cfg.model.path / "config.json").read_text())
        assert built.num_layers == raw["num_hidden_layers"]
        assert built.vocab_size == raw["vocab_size"]


def test_relative_model_path_is_found_from_the_config_file(tmp_path: Path, monkeypatch):
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "configs" / "hf" / "Qwen3-8B-Base", repo / "models" / "q8")
    (repo / "configs").mkdir()
    yaml_path = repo / "configs" / "run.yaml"
    yaml_path.write_text("model:\n  path: models/q8\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(yaml_path)
    # the config's directory, then the one above it (the repository root)
    assert shape_from_config(cfg, yaml_path).num_layers == 36
    # without the config's location only the working directory is tried
    with pytest.raises(ConfigError, match=r"model\.path: models/q8/config\.json does not exist"):
        model_hf_config(cfg.model)
    with pytest.raises(ConfigError, match=r"model\.path = 'nope': no config\.json found"):
        shape_from_config(load_config(yaml_path, ["model.path=nope"]), yaml_path)
