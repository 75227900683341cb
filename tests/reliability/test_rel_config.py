"""Config errors that used to be accepted or end in a traceback (issue 14): non-finite
numbers, duplicate YAML keys, bad `-o` values, a non-UTF-8 file, one sample per prompt,
a warm start that eats every training prompt. Each is a one-line `ConfigError` naming
the key (and the override or the file it came from); the CLI exits 2."""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import pytest

from archer_mcore.cli import main
from archer_mcore.config import Config, ConfigError, load_config


def _float_fields(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key whose annotation admits a float (walked independently of the
    loader: from the dataclasses' own type hints)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _float_fields(tp, f"{prefix}{f.name}.")
            continue
        args = (
            typing.get_args(tp)
            if typing.get_origin(tp) in (typing.Union, types.UnionType)
            else (tp,)
        )
        if float in args:
            out.append(prefix + f.name)
    return out


FLOAT_KEYS = _float_fields()


def _yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_walk_finds_the_float_fields() -> None:
    # A sanity check of the helper itself: known float fields of several sections.
    for key in ("optimizer.lr", "rollout.tis_cap", "algorithm.clip_ratio_c", "warmstart.lr"):
        assert key in FLOAT_KEYS
    assert "train.steps" not in FLOAT_KEYS and len(FLOAT_KEYS) > 30


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan", "1e999"])
def test_non_finite_numbers_are_config_errors(tmp_path: Path, key: str, value: str) -> None:
    section, _, name = key.rpartition(".")
    nested = section.split(".")
    text = ""
    for depth, part in enumerate(nested):
        text += "  " * depth + f"{part}:\n"
    text += "  " * len(nested) + f"{name}: {value}\n"
    path = _yaml(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError, match=rf"{key} must be a finite number"):
        load_config(path)
    # and the same value given as an override blames the override
    with pytest.raises(ConfigError, match=rf"override '{key}={value}'.*{key} must be a finite"):
        load_config(_yaml(tmp_path / "empty.yaml", ""), [f"{key}={value}"])


def test_finite_floats_still_load(tmp_path: Path) -> None:
    cfg = load_config(_yaml(tmp_path / "c.yaml", "optimizer:\n  lr: 1e-5\n  min_lr: 0\n"))
    assert cfg.optimizer.lr == 1e-5 and cfg.optimizer.min_lr == 0.0


def test_duplicate_keys_are_config_errors(tmp_path: Path) -> None:
    path = _yaml(tmp_path / "dup.yaml", "train:\n  steps: 3\n  seed: 1\n  steps: 5\n")
    with pytest.raises(
        ConfigError, match=r"dup.yaml: duplicate key 'steps' at line 4 \(first set at line 2\)"
    ):
        load_config(path)
    path = _yaml(
        tmp_path / "dup2.yaml", "train:\n  steps: 3\noptimizer:\n  lr: 1.0e-5\ntrain:\n  seed: 2\n"
    )
    with pytest.raises(ConfigError, match="duplicate key 'train' at line 5"):
        load_config(path)
    # the same key in two different sections is fine
    cfg = load_config(_yaml(tmp_path / "ok.yaml", "optimizer:\n  lr: 0.1\nwarmstart:\n  lr: 0.2\n"))
    assert (cfg.optimizer.lr, cfg.warmstart.lr) == (0.1, 0.2)


def test_bad_override_yaml_is_blamed_on_the_override(tmp_path: Path, capsys) -> None:
    path = _yaml(tmp_path / "c.yaml", "train:\n  steps: 3\n")
    with pytest.raises(
        ConfigError, match=r"^override 'train.steps=\[1': the value is not valid YAML"
    ):
        load_config(path, ["train.steps=[1"])
    # a well-formed value of the wrong type: the override, not the file, is named
    with pytest.raises(ConfigError) as err:
        load_config(path, ["optimizer.lr=abc"])
    assert str(err.value).startswith("override 'optimizer.lr=abc': optimizer.lr must be float")
    assert "c.yaml" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^override 'train.stepz=3': unknown key train.stepz"):
        load_config(path, ["train.stepz=3"])
    # while an error in the file still names the file
    bad = _yaml(tmp_path / "bad.yaml", "optimizer:\n  lr: abc\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: optimizer.lr must be float"):
        load_config(bad, ["train.steps=2"])
    assert main(["config", "show", str(path), "-o", "train.steps=[1"]) == 2
    err_text = capsys.readouterr().err
    assert err_text.startswith("archer: config error: override 'train.steps=[1'")
    assert err_text.count("\n") == 1 and "Traceback" not in err_text


def test_config_file_that_is_not_utf8(tmp_path: Path, capsys) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("train:\n  run_name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(
        ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 0xe9 at offset 22\)"
    ):
        load_config(path)
    assert main(["config", "show", str(path)]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_one_sample_per_prompt_is_rejected_with_the_reason(tmp_path: Path) -> None:
    path = _yaml(tmp_path / "c.yaml", "rollout:\n  n_samples_per_prompt: 1\n")
    with pytest.raises(
        ConfigError, match=r"n_samples_per_prompt = 1: advantages are normalised within"
    ):
        load_config(path)
    assert load_config(path, ["rollout.n_samples_per_prompt=2"]).rollout.n_samples_per_prompt == 2


def test_warm_start_examples_must_leave_training_prompts(tmp_path: Path) -> None:
    text = "warmstart:\n  steps: 10\n  examples: 512\ndata:\n  synthetic_train_size: 512\n"
    path = _yaml(tmp_path / "c.yaml", text)
    with pytest.raises(
        ConfigError,
        match=r"warmstart.examples \(512\) must be smaller than data.synthetic_train_size \(512\)",
    ):
        load_config(path)
    assert load_config(path, ["warmstart.examples=511"]).warmstart.examples == 511
    assert (
        load_config(path, ["warmstart.steps=0"]).warmstart.steps == 0
    )  # no warm start: no overlap
