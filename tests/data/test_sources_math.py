"""`archer data prepare` for the math sources, end to end: a small fixture in each
dataset's published schema (docs/data.md) is converted by the CLI, loaded by the
trainer's own reader (`PromptDataset.from_files`, `route_rewards`) and scored by the
math reward it routes to: the ground truth in \\boxed{} scores 1, a wrong answer 0.
Bad records stop the conversion with file:line and the field, leaving nothing at --out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from archer_mcore.cli.main import main
from archer_mcore.config import Config
from archer_mcore.data.prepare import route_rewards
from archer_mcore.data.prompt_dataset import PromptDataset
from archer_mcore.rewards.registry import default_registry

MAX_PROMPT = 100_000  # the arithmetic tokenizer spells text character by character


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def _prepare(source: str, src: Path, out: Path, *extra: str) -> int:
    return main(["data", "prepare", source, "--input", str(src), "--out", str(out), *extra])


def _load(out: Path, tokenizer: Any) -> PromptDataset:
    data = PromptDataset.from_files([out], tokenizer, MAX_PROMPT)
    assert not data.report.malformed, data.report.summary()
    return route_rewards(Config(), data, "test")


def _score(ex: Any, response: str) -> float:
    kind = default_registry().kind_for(ex.data_source)
    assert kind is not None and kind.name == "math", ex.data_source
    return kind.fn(response, ex.ground_truth, ex.extra_info).score


def _check_scores(data: PromptDataset) -> None:
    for ex in data:
        right = f"Some reasoning.\n\\boxed{{{ex.ground_truth}}}"
        assert _score(ex, right) == 1.0, (ex.source, ex.ground_truth)
        assert _score(ex, "Some reasoning.\n\\boxed{123456789}") == 0.0, ex.source


DAPO_PROMPT = (
    "Solve the following math problem step by step. The last line of your response "
    "should be of the form Answer: $Answer (without quotes) where $Answer is the answer "
    'to the problem.\n\n{}\n\nRemember to put your answer on its own line after "Answer:".'
)


def _dapo_row(problem: str, answer: str, index: str) -> dict[str, Any]:
    return {
        "data_source": "math_dapo",
        "prompt": [{"content": DAPO_PROMPT.format(problem), "role": "user"}],
        "ability": "MATH",
        "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": index},
    }


def test_dapo_math_17k_parquet(tmp_path: Path, tokenizer: Any) -> None:
    rows = [
        _dapo_row("What is 30 + 4?", "34", "a"),
        _dapo_row("What is 30 + 4?", "34", "b"),  # the published file repeats problems
        _dapo_row("Half of one, as a fraction $\\frac{a}{b}$?", "\\frac{1}{2}", "c"),
        _dapo_row("What is 30 + 4?", "34", "d"),
    ]
    src = _parquet(tmp_path / "dapo-math-17k.parquet", rows)
    out = tmp_path / "out" / "dapo.parquet"
    assert _prepare("dapo-math-17k", src, out) == 0
    data = _load(out, tokenizer)
    assert len(data) == 2
    assert {ex.data_source for ex in data} == {"math_dapo"}
    assert [ex.ground_truth for ex in data] == ["34", "\\frac{1}{2}"]
    _check_scores(data)
    # DAPO's own prompt asks for "Answer: X", which the math reward reads too
    assert _score(data[0], "30 + 4 = 34.\nAnswer: 34") == 1.0
    kept = tmp_path / "kept.jsonl"
    assert _prepare("dapo-math-17k", src, kept, "--keep-duplicates") == 0
    assert len(_load(kept, tokenizer)) == 4


def test_aime_2024_both_published_schemas_in_a_directory(tmp_path: Path, tokenizer: Any) -> None:
    src = tmp_path / "aime_2024"
    _parquet(  # HuggingFaceH4/aime_2024
        src / "train-00000-of-00001.parquet",
        [
            {
                "id": 60,
                "problem": "Find $\\frac{m}{n}$ where $m + n = 7$ ...; give $m+n$.",
                "solution": "... so the answer is $\\boxed{7}$.",
                "answer": "7",
                "url": "https://artofproblemsolving.com/wiki/...",
                "year": "2024",
            }
        ],
    )
    _jsonl(  # Maxwell-Jia/AIME_2024: capitalised fields, integer answers
        src / "aime_2024_problems.jsonl",
        [{"ID": "2024-I-1", "Problem": "Every morning Aya ...", "Solution": "...", "Answer": 204}],
    )
    out = tmp_path / "aime_2024.jsonl"
    assert _prepare("aime2024", src, out) == 0
    data = _load(out, tokenizer)
    # files in name order: aime_2024_problems.jsonl, then train-00000-of-00001.parquet
    assert [ex.ground_truth for ex in data] == ["204", "7"]
    assert {ex.data_source for ex in data} == {"aime_2024"}
    assert data[1].messages[0]["content"].endswith("within \\boxed{}.")
    assert [ex.extra_info["index"] for ex in data] == ["2024-I-1", "60"]
    _check_scores(data)


def test_aime_2025_opencompass_files(tmp_path: Path, tokenizer: Any) -> None:
    src = tmp_path / "AIME2025"
    _jsonl(
        src / "aime2025-I.jsonl",
        [{"question": "Find the sum of all bases $b>9$ ...", "answer": "70"}],
    )
    _jsonl(src / "aime2025-II.jsonl", [{"question": "Six points ...", "answer": "468"}])
    (src / "README.md").write_text("not data: ignored")
    out = tmp_path / "aime_2025.jsonl"
    assert _prepare("aime2025", src, out) == 0
    data = _load(out, tokenizer)
    assert [ex.ground_truth for ex in data] == ["70", "468"]
    _check_scores(data)


MATH500 = [
    {
        "problem": "Convert the point $(0,3)$ to polar coordinates.",
        "solution": "... $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}.$",
        "answer": "\\left( 3, \\frac{\\pi}{2} \\right)",
        "subject": "Precalculus",
        "level": 2,
        "unique_id": "test/precalculus/807.json",
    },
    {
        "problem": "What is $\\frac{14}{3}$ in lowest terms?",
        "solution": "$\\boxed{\\frac{14}{3}}$",
        "answer": "\\frac{14}{3}",
        "subject": "Algebra",
        "level": 1,
        "unique_id": "test/algebra/1.json",
    },
    {
        "problem": "Evaluate $\\sqrt{8}$.",
        "solution": "$\\boxed{2\\sqrt{2}}$",
        "answer": "2\\sqrt{2}",
        "subject": "Algebra",
        "level": 1,
        "unique_id": "test/algebra/2.json",
    },
]


def test_math_500_latex_answers(tmp_path: Path, tokenizer: Any) -> None:
    out = tmp_path / "math500.parquet"
    assert _prepare("math500", _jsonl(tmp_path / "test.jsonl", MATH500), out) == 0
    data = _load(out, tokenizer)
    assert [ex.ground_truth for ex in data] == [r["answer"] for r in MATH500]
    assert data[0].extra_info == {
        "index": "test/precalculus/807.json",
        "solution": MATH500[0]["solution"],
    }
    _check_scores(data)
    assert _score(data[1], "\\boxed{\\dfrac{14}{3}}") == 1.0  # equivalent LaTeX
    assert _score(data[2], "\\boxed{\\sqrt{8}}") == 1.0  # equal value, not a plain number


def test_deepscaler_json_array(tmp_path: Path, tokenizer: Any) -> None:
    src = tmp_path / "deepscaler.json"
    src.write_text(
        json.dumps(
            [
                {"problem": "Compute $1+1$.", "answer": "2", "solution": "1+1=2"},
                {"problem": "Compute $3/4$ as a fraction.", "answer": "\\frac{3}{4}"},
            ]
        )
    )
    out = tmp_path / "deepscaler.jsonl"
    assert _prepare("deepscaler", src, out) == 0
    data = _load(out, tokenizer)
    assert len(data) == 2 and {ex.data_source for ex in data} == {"deepscaler"}
    _check_scores(data)


def test_a_bad_record_names_file_line_field_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [dict(MATH500[0]), dict(MATH500[1]), dict(MATH500[2])]
    del rows[2]["answer"]
    src = _jsonl(tmp_path / "test.jsonl", rows)
    out = tmp_path / "math500.jsonl"
    assert _prepare("math500", src, out) == 2
    err = capsys.readouterr().err
    assert f"{src}:line 3: field 'answer' or 'Answer': missing" in err, err
    assert not out.exists() and not list(tmp_path.glob("math500.jsonl*"))
    # an existing output is left as it was
    out.write_text("old\n")
    assert _prepare("math500", src, out) == 2
    assert out.read_text() == "old\n"
    # --skip-bad converts the rest and lists the bad record
    assert _prepare("math500", src, out, "--skip-bad") == 0
    assert f"skipped: {src}:line 3: field 'answer'" in capsys.readouterr().err
    assert len(out.read_text().splitlines()) == 2


def test_bad_input_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "test.jsonl"
    src.write_text(json.dumps(MATH500[0]) + "\n{not json\n")
    out = tmp_path / "o.jsonl"
    assert _prepare("math500", src, out) == 2
    assert f"{src}:line 2: invalid JSON" in capsys.readouterr().err
    wrong_type = _jsonl(tmp_path / "t2.jsonl", [{**MATH500[0], "answer": {"x": 1}}])
    assert _prepare("math500", wrong_type, out) == 2
    assert f"{wrong_type}:line 1: field 'answer': expected text" in capsys.readouterr().err
    dapo = _jsonl(tmp_path / "d.jsonl", [{**_dapo_row("q", "1", "a"), "prompt": []}])
    assert _prepare("dapo-math-17k", dapo, out) == 2
    assert f"{dapo}:line 1: 'prompt' must be a non-empty list" in capsys.readouterr().err
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    assert _prepare("math500", broken, out) == 2
    assert f"{broken}:row 0: unreadable Parquet" in capsys.readouterr().err
    assert _prepare("math500", tmp_path / "missing.jsonl", out) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert not out.exists()


def test_source_names_of_the_cli_match_the_registry() -> None:
    from archer_mcore.cli.data import SOURCE_NAMES
    from archer_mcore.data.sources import SOURCES

    assert tuple(SOURCES) == SOURCE_NAMES


def test_inspect_counts_lengths_limits_and_bad_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tokenizer: Any
) -> None:
    out = tmp_path / "math500.jsonl"
    assert _prepare("math500", _jsonl(tmp_path / "test.jsonl", MATH500), out) == 0
    with out.open("a") as f:
        f.write('{"prompt": "no answer here"}\n')
    capsys.readouterr()
    report = tmp_path / "report.json"
    config = tmp_path / "c.yaml"
    config.write_text("data:\n  max_prompt_length: 100\n")
    assert main(["data", "inspect", str(out), "--config", str(config), "--json", str(report)]) == 0
    text = capsys.readouterr().out
    assert "math_500: 3" in text and "math: 3" in text, text
    assert f"{out}:line 4: missing ground truth" in text, text
    # the count the trainer drops at this limit, with the same (the demo's) tokenizer
    too_long = PromptDataset.from_files([out], tokenizer, 100).report.too_long
    assert too_long == 2
    assert f"over data.max_prompt_length (100): {too_long} prompts" in text, text
    got = json.loads(report.read_text())
    assert got["rows"] == 4 and got["by_reward_kind"] == {"math": 3}
    assert got["answer_tokens"]["min"] >= 1 and sum(got["prompt_tokens"]["buckets"].values()) == 3
