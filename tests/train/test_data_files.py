"""`data.eval_files` and `data.train_files`: which files a run trains and evaluates on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from archer_mcore.config import ConfigError, config_from_dict
from archer_mcore.data.prepare import data_files

SMALL = {"synthetic_train_size": 32, "synthetic_eval_size": 8}


def _user_file(path: Path, n: int = 3) -> str:
    rows = [{"prompt": f"Compute {i} + 1.", "answer": str(i + 1)} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(**data):
    return config_from_dict({"data": {**SMALL, **data}})


def _rows(files: list[str]) -> list[dict]:
    return [json.loads(line) for f in files for line in Path(f).read_text().splitlines()]


def test_eval_files_are_used_with_synthetic_training_data(tmp_path):
    user = _user_file(tmp_path / "eval.jsonl")
    train, evals = data_files(_cfg(eval_files=[user]), tmp_path / "cache")
    assert evals == [user]  # the user's held-out set, not the synthetic split
    assert len(_rows(train)) == 32  # training stays the synthetic task
    assert all(r["data_source"] == "synthetic_arithmetic" for r in _rows(train))


def test_without_eval_files_synthetic_training_evaluates_on_its_held_out_split(tmp_path):
    train, evals = data_files(_cfg(), tmp_path / "cache")
    held_out, seen = _rows(evals), {r["extra_info"]["expression"] for r in _rows(train)}
    assert len(held_out) == 8
    assert not {r["extra_info"]["expression"] for r in held_out} & seen


def test_user_training_files_come_with_their_own_eval_files_or_none(tmp_path):
    user_train = _user_file(tmp_path / "train.jsonl")
    user_eval = _user_file(tmp_path / "eval.jsonl")
    assert data_files(_cfg(train_files=[user_train]), tmp_path) == ([user_train], [])
    got = data_files(_cfg(train_files=[user_train], eval_files=[user_eval]), tmp_path)
    assert got == ([user_train], [user_eval])


def test_a_missing_eval_file_is_named(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(ConfigError, match=r"data\.eval_files: file .*nope\.jsonl does not exist"):
        data_files(_cfg(eval_files=[missing]), tmp_path / "cache")


def test_eval_every_without_a_held_out_set_fails_at_load(tmp_path):
    user_train = _user_file(tmp_path / "train.jsonl")
    with pytest.raises(ConfigError, match="eval.every = 5 but data.eval_files is empty"):
        config_from_dict({"data": {"train_files": [user_train]}, "eval": {"every": 5}})
