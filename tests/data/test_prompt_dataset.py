"""PromptDataset from JSONL and Parquet: chat template, length filter, malformed rows."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from archer_mcore.data.prompt_dataset import PromptDataset
from archer_mcore.data.schema import MalformedRow, parse_row
from archer_mcore.data.synthetic import generate_arithmetic_rows, write_jsonl

GOOD_VERL = {
    "data_source": "openai/gsm8k",
    "prompt": [{"role": "user", "content": "Compute 1 + 2."}],
    "reward_model": {"style": "rule", "ground_truth": "3"},
    "extra_info": {"split": "train"},
}
GOOD_FLAT = {"prompt": "Compute 2 * 3.", "answer": "6"}
LONG = {"prompt": "Compute " + " + ".join(["1"] * 40) + ".", "answer": "40"}


def _expected_ids(tokenizer: Any, user_text: str) -> list[int]:
    text = f"<|im_start|>user\n{user_text}<|im_end|>\n<|im_start|>assistant\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_jsonl_good_bad_and_too_long_rows(tmp_path: Path, tokenizer: Any) -> None:
    lines = [
        json.dumps(GOOD_VERL),  # line 1: kept
        "{not json",  # line 2: malformed
        json.dumps(GOOD_FLAT),  # line 3: kept
        "",  # blank: ignored, not a row
        json.dumps({"prompt": [{"role": "wizard", "content": "x"}], "answer": "1"}),  # line 5
        json.dumps({"answer": "1"}),  # line 6: no prompt
        json.dumps({"prompt": "hi"}),  # line 7: no ground truth
        json.dumps([1, 2]),  # line 8: not an object
        json.dumps(LONG),  # line 9: too long
    ]
    path = _write_lines(tmp_path / "d.jsonl", lines)
    # LONG: template "<|im_start|>" "user" "\n" ... "<|im_end|>" "\n" "<|im_start|>"
    # "assistant" "\n" = 8 tokens; content "Compute" " " + 40 "1"s + 39 " + " (3 tokens
    # each) + "." = 1 + 1 + 40 + 117 + 1 = 160; total 168
    assert len(_expected_ids(tokenizer, LONG["prompt"])) == 168
    ds = PromptDataset.from_files(
        [path], tokenizer, max_prompt_length=100, default_data_source="dflt"
    )
    assert len(ds) == 2
    assert ds.report.rows_read == 8 and ds.report.kept == 2 and ds.report.too_long == 1
    assert [(b.location, b.reason.split(":")[0]) for b in ds.report.malformed] == [
        ("line 2", "invalid JSON"),
        (
            "line 5",
            "prompt[0].role must be one of ('system', 'user', 'assistant', 'tool'), got 'wizard'",
        ),
        ("line 6", "missing 'prompt'"),
        ("line 7", "missing ground truth"),
        ("line 8", "not a JSON object"),
    ]
    assert all(b.file == str(path) for b in ds.report.malformed)
    first, second = ds[0], ds[1]
    assert first.prompt_ids == _expected_ids(tokenizer, "Compute 1 + 2.")
    assert first.prompt_text.endswith("<|im_start|>assistant\n")
    assert (first.ground_truth, first.data_source, first.reward_style) == (
        "3",
        "openai/gsm8k",
        "rule",
    )
    assert first.extra_info == {"split": "train"} and first.source == f"{path}:line 1"
    assert second.prompt_ids == _expected_ids(tokenizer, "Compute 2 * 3.")
    assert (second.ground_truth, second.data_source) == ("6", "dflt")
    assert "line 2" in ds.report.summary() and ds.report.metrics()["data/malformed"] == 5
    # the limit is inclusive: a prompt of exactly max_prompt_length tokens is kept
    assert len(PromptDataset.from_files([path], tokenizer, max_prompt_length=168)) == 3


def test_parquet_rows_are_reported_by_row_index(tmp_path: Path, tokenizer: Any) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    synthetic = generate_arithmetic_rows(3, seed=0)
    rows = [
        {"data_source": r["data_source"], "prompt": r["prompt"], "reward_model": r["reward_model"]}
        for r in synthetic
    ]
    rows.insert(
        1, {"data_source": "x", "prompt": [{"role": "user", "content": "a"}], "reward_model": None}
    )
    table = pa.Table.from_pylist(rows)
    path = tmp_path / "d.parquet"
    pq.write_table(table, path)
    ds = PromptDataset.from_files([path], tokenizer, max_prompt_length=256)
    assert len(ds) == 3 and ds.report.rows_read == 4
    assert [(b.location, b.reason) for b in ds.report.malformed] == [
        ("row 1", "missing ground truth: neither 'reward_model.ground_truth' nor 'answer'")
    ]
    for ex, src in zip(ds, synthetic):
        assert ex.prompt_ids == _expected_ids(tokenizer, src["prompt"][0]["content"])
        assert ex.ground_truth == src["reward_model"]["ground_truth"]
    assert ds[2].source == f"{path}:row 3"


def test_jsonl_works_without_pyarrow(
    tmp_path: Path, tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    path = write_jsonl(generate_arithmetic_rows(4, seed=1), tmp_path / "a.jsonl")
    assert len(PromptDataset.from_files([path], tokenizer, max_prompt_length=256)) == 4
    (tmp_path / "b.parquet").write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="needs pyarrow"):
        PromptDataset.from_files([tmp_path / "b.parquet"], tokenizer, max_prompt_length=256)


def test_file_errors_name_the_file(tmp_path: Path, tokenizer: Any) -> None:
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        PromptDataset.from_files([tmp_path / "missing.jsonl"], tokenizer, 10)
    (tmp_path / "d.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported data file type '.csv'"):
        PromptDataset.from_files([tmp_path / "d.csv"], tokenizer, 10)


def test_parse_row_variants() -> None:
    row = parse_row(
        {"prompt": "q", "reward_model": json.dumps({"ground_truth": {"inputs": []}})}, "src"
    )
    assert row.ground_truth == {"inputs": []} and row.data_source == "src"
    with pytest.raises(MalformedRow, match="ground truth is empty"):
        parse_row({"prompt": "q", "answer": "  "})
    with pytest.raises(MalformedRow, match=r"prompt\[0\].content must be a string"):
        parse_row({"prompt": [{"role": "user", "content": 3}], "answer": "1"})
    with pytest.raises(MalformedRow, match="'extra_info' must be an object"):
        parse_row({"prompt": "q", "answer": "1", "extra_info": [1]})


def test_from_dicts_with_synthetic_rows(tokenizer: Any) -> None:
    rows = generate_arithmetic_rows(5, seed=2)
    rows.append({"prompt": 7})  # malformed
    ds = PromptDataset.from_dicts(rows, tokenizer, max_prompt_length=256, name="synthetic")
    assert len(ds) == 5 and [(b.file, b.location) for b in ds.report.malformed] == [
        ("synthetic", "row 5")
    ]
    assert [ex.prompt_ids for ex in ds] == [
        _expected_ids(tokenizer, r["prompt"][0]["content"]) for r in rows[:5]
    ]
