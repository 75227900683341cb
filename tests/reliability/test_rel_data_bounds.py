"""Bad data rows stay small (issue 22, item 13, data side): a malformed row's reason,
the load summary and the unrouted-source error quote the data's values bounded, and a
row nested too deep or holding a 5000-digit number is a malformed row, not a crash."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from archer_mcore.data.arithmetic_tokenizer import build_arithmetic_tokenizer
from archer_mcore.data.prompt_dataset import PromptDataset, UnroutedDataError, assign_reward_kinds

HUGE = 1_000_000
LIMIT = 4096


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(build_arithmetic_tokenizer(tmp_path_factory.mktemp("t")))
    )


def test_malformed_rows_quote_their_values_bounded(tmp_path: Path, tokenizer: Any) -> None:
    lines = [
        json.dumps({"prompt": [{"role": "r" * HUGE, "content": "x"}], "answer": "1"}),
        json.dumps({"prompt": [{"role": ["deep"] * HUGE, "content": "x"}], "answer": "1"}),
        "[" * 100_000 + "]" * 100_000,  # json.loads: RecursionError
        '{"prompt": "x", "answer": ' + "9" * 5000 + "}",  # int() past the digit limit
        '{"prompt": "x", "reward_model": "' + "{" * HUGE + '"}',
        "{" + "x" * HUGE,
    ]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    ds = PromptDataset.from_files([path], tokenizer, 256)
    assert len(ds) == 0 and len(ds.report.malformed) == len(lines)
    assert [b.location for b in ds.report.malformed] == [f"line {i + 1}" for i in range(len(lines))]
    for bad in ds.report.malformed:
        assert len(bad.reason) <= 300, bad.reason[:200]
    assert len(ds.report.summary()) < LIMIT


def test_unrouted_sources_are_listed_bounded(tokenizer: Any) -> None:
    rows = [
        {"prompt": "Compute 1+1.", "answer": "2", "data_source": f"{i}-" + "s" * 10_000}
        for i in range(50)
    ]
    ds = PromptDataset.from_dicts(rows, tokenizer, 256)
    with pytest.raises(UnroutedDataError) as exc:
        assign_reward_kinds(ds, lambda s: None, {"math"})
    message = str(exc.value)
    assert len(message) < LIMIT and "45 more" in message
