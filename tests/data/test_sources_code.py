"""`archer data prepare` for the code sources (LiveCodeBench, the Archer code data), end
to end: a fixture in the published schema (docs/data.md) is converted by the CLI,
loaded by the trainer's reader and routed (`PromptDataset.from_files`,
`route_rewards`), and scored by the sandboxed code reward it routes to: a correct
Python program scores 1, a wrong one 0. LiveCodeBench's pickled private tests are
never unpickled: refused naming the field unless the string-only opcode reader is
asked for, and a pickle holding anything but one string is refused even then.
"""

from __future__ import annotations

import base64
import json
import pickle
import subprocess
import sys
import zlib
from pathlib import Path
from typing import Any

import pytest

from archer_mcore.cli.main import main
from archer_mcore.config import Config
from archer_mcore.data.prepare import route_rewards
from archer_mcore.data.prompt_dataset import PromptDataset
from archer_mcore.rewards.registry import default_registry

MAX_PROMPT = 100_000  # the arithmetic tokenizer spells text character by character
HUGE_COUNT = 200_000  # numbers in the huge stdin case (~1.3 MB of input)

SUM_PROGRAM = "```python\nimport sys\nprint(sum(map(int, sys.stdin.read().split())))\n```"
SUM_WRONG = "```python\nimport sys\nprint(sum(map(int, sys.stdin.read().split())) + 1)\n```"
ADD_PROGRAM = (
    "```python\nclass Solution:\n    def addTwo(self, a: int, b: int) -> int:\n"
    "        return a + b\n```"
)
ADD_WRONG = ADD_PROGRAM.replace("a + b", "a - b")


def _packed(text: str, obj: Any = None) -> str:
    """LiveCodeBench's compression: base64(zlib(pickle(JSON text))); `obj` instead of
    the text makes a pickle of something else (pickling only: nothing is loaded)."""
    return base64.b64encode(zlib.compress(pickle.dumps(text if obj is None else obj))).decode()


class _Exploit:
    """Pickles to a call of os.system: what an unpickler would run."""

    def __reduce__(self) -> tuple[Any, ...]:
        import os

        return (os.system, ("touch /tmp/archer-pwned",))


def _lcb(
    qid: str, *, public: list, private: Any, starter: str = "", meta: str = "{}", date: str
) -> dict[str, Any]:
    """A record of livecodebench/code_generation_lite (test*.jsonl)."""
    return {
        "question_title": f"problem {qid}",
        "question_content": f"Problem {qid}: read integers and answer.",
        "platform": "atcoder" if not starter else "leetcode",
        "question_id": qid,
        "contest_id": "abc999",
        "contest_date": date,
        "starter_code": starter,
        "difficulty": "easy",
        "public_test_cases": json.dumps(public),
        "private_test_cases": private if isinstance(private, str) else json.dumps(private),
        "metadata": meta,
    }


def _stdin(i: str, o: str) -> dict[str, str]:
    return {"input": i, "output": o, "testtype": "stdin"}


def _func(i: str, o: str) -> dict[str, str]:
    return {"input": i, "output": o, "testtype": "functional"}


def _lcb_records(huge: bool = True) -> list[dict[str, Any]]:
    big = " ".join(["7"] * HUGE_COUNT) + "\n" if huge else "7 7\n"
    big_sum = str(7 * HUGE_COUNT) if huge else "14"
    return [
        _lcb(
            "abc999_a",
            public=[_stdin("1 2\n", "3\n")],
            private=[_stdin("10 20 30\n", "60\n"), _stdin(big, big_sum + "\n")],
            date="2024-09-01T00:00:00",
        ),
        _lcb(
            "3000",
            public=[_func("1\n2", "3")],
            private=_packed(json.dumps([_func("5\n-7", "-2"), _func("100\n200", "300")])),
            starter="class Solution:\n    def addTwo(self, a: int, b: int) -> int:\n        ",
            meta=json.dumps({"func_name": "addTwo"}),
            date="2024-10-05T00:00:00",
        ),
        _lcb(
            "abc001_a",
            public=[_stdin("4 5\n", "9\n")],
            private=[],
            date="2023-05-01T00:00:00",
        ),
    ]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _prepare(source: str, src: Path, out: Path, *extra: str) -> int:
    return main(["data", "prepare", source, "--input", str(src), "--out", str(out), *extra])


def _load(out: Path, tokenizer: Any) -> PromptDataset:
    data = PromptDataset.from_files([out], tokenizer, MAX_PROMPT)
    assert not data.report.malformed, data.report.summary()
    return route_rewards(Config(), data, "test")


@pytest.fixture(scope="module")
def sandbox() -> Any:
    from archer_mcore.rewards.sandbox import Sandbox, SandboxLimits, probe_isolation

    if not probe_isolation().net:
        pytest.skip("no network namespace on this machine; the sandbox refuses to run")
    limits = SandboxLimits(wall_s=10.0, cpu_s=5.0, memory_mb=512, file_size_mb=4, max_processes=16)
    return Sandbox(limits, base_uid=320_000)


def _score(ex: Any, response: str, sandbox: Any) -> float:
    kind = default_registry().kind_for(ex.data_source)
    assert kind is not None and kind.name == "code", ex.data_source
    result = kind.fn(response, ex.ground_truth, ex.extra_info, sandbox)
    return result.score


def test_livecodebench_pickled_private_tests_are_refused_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _jsonl(tmp_path / "test5.jsonl", _lcb_records(huge=False))
    out = tmp_path / "lcb.parquet"
    assert _prepare("livecodebench", src, out) == 2
    err = capsys.readouterr().err
    assert f"{src}:line 2: field 'private_test_cases': is base64+zlib+pickle" in err, err
    assert "never unpickles" in err and not out.exists()


def test_livecodebench_stdin_and_functional_scored_in_the_sandbox(
    tmp_path: Path, tokenizer: Any, sandbox: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _jsonl(tmp_path / "lcb" / "test5.jsonl", _lcb_records())
    out = tmp_path / "livecodebench_v5.parquet"
    assert _prepare("livecodebench", src.parent, out, "--decode-string-pickles") == 0
    data = _load(out, tokenizer)
    assert [ex.extra_info["index"] for ex in data] == ["abc999_a", "3000", "abc001_a"]
    assert {ex.data_source for ex in data} == {"livecodebench"}
    stdin_row, func_row, _ = data
    cases = json.loads(stdin_row.ground_truth)
    assert len(cases) == 3 and len(cases[2]["input"]) > 2 * HUGE_COUNT - 1
    assert (stdin_row.extra_info["public_tests"], stdin_row.extra_info["private_tests"]) == (1, 2)
    assert func_row.extra_info["fn_name"] == "addTwo"
    assert len(json.loads(func_row.ground_truth)) == 3
    assert "```python\nclass Solution:" in func_row.messages[0]["content"]
    assert _score(stdin_row, SUM_PROGRAM, sandbox) == 1.0
    assert _score(stdin_row, SUM_WRONG, sandbox) == 0.0
    assert _score(func_row, ADD_PROGRAM, sandbox) == 1.0
    assert _score(func_row, ADD_WRONG, sandbox) == 0.0
    # the release window (Archer's LiveCodeBench v5: 2024-08-01 .. 2025-02-01)
    window = tmp_path / "window.jsonl"
    args = ("--decode-string-pickles", "--since", "2024-08-01", "--until", "2025-02-01")
    assert _prepare("livecodebench", src, window, *args) == 0
    assert "3 records read, 2 rows written, 1 outside the selection" in capsys.readouterr().err
    assert [json.loads(line)["extra_info"]["index"] for line in window.open()] == [
        "abc999_a",
        "3000",
    ]


def test_livecodebench_public_tests_only(tmp_path: Path, tokenizer: Any) -> None:
    src = _jsonl(tmp_path / "test.jsonl", _lcb_records(huge=False))
    out = tmp_path / "public.jsonl"
    assert _prepare("livecodebench", src, out, "--public-tests-only") == 0
    data = _load(out, tokenizer)
    assert [len(json.loads(ex.ground_truth)) for ex in data] == [1, 1, 1]
    assert data[0].extra_info["private_tests"] == 0


def test_a_pickle_of_anything_but_one_string_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = _lcb_records(huge=False)
    records[1]["private_test_cases"] = _packed("", obj=_Exploit())
    src = _jsonl(tmp_path / "test.jsonl", records)
    out = tmp_path / "o.jsonl"
    assert _prepare("livecodebench", src, out, "--decode-string-pickles") == 2
    err = capsys.readouterr().err
    assert f"{src}:line 2: field 'private_test_cases': the pickle holds more" in err, err
    assert not Path("/tmp/archer-pwned").exists() and not out.exists()
    records[1]["private_test_cases"] = _packed("", obj=["a list", "of strings"])
    _jsonl(src, records)
    assert _prepare("livecodebench", src, out, "--decode-string-pickles") == 2
    assert "field 'private_test_cases'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"question_content": None}, "field 'question_content': missing or empty"),
        ({"public_test_cases": "[{]"}, "field 'public_test_cases': not JSON"),
        ({"public_test_cases": '[{"input": "1"}]'}, "field 'public_test_cases': case 0 is not"),
        ({"metadata": "{}"}, "field 'metadata': public_test_cases case 0 is functional"),
        ({"private_test_cases": "!!not base64!!"}, "neither JSON nor base64"),
    ],
)
def test_bad_livecodebench_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict, message: str
) -> None:
    records = _lcb_records(huge=False)
    records[1].update(change)
    src = _jsonl(tmp_path / "test.jsonl", records)
    out = tmp_path / "o.jsonl"
    assert _prepare("livecodebench", src, out, "--decode-string-pickles") == 2
    err = capsys.readouterr().err
    assert f"{src}:line 2: " in err and message in err, err
    assert not out.exists()


def _archer_row(index: int, ground_truth: Any, data_source: str = "livecodebench") -> dict:
    """A row of wizardII/ArcherCodeR-Dataset (a JSON array of verl rows)."""
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": f"Solve problem {index} in Python."}],
        "ability": "code",
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": {"split": "train", "index": index},
    }


def test_archer_code_rows_scored_in_the_sandbox(
    tmp_path: Path, tokenizer: Any, sandbox: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        _archer_row(0, json.dumps([_stdin("1 2\n", "3\n"), _stdin("2 2\n", "4\n")])),
        _archer_row(1, json.dumps({"inputs": ["3 4\n"], "outputs": ["7\n"]}), "primeintellect"),
        _archer_row(2, json.dumps([_stdin("5 5\n", "10\n")]), "some_set"),
    ]
    src = tmp_path / "archercoder-1.5b-train.json"
    src.write_text(json.dumps(rows))
    out = tmp_path / "archer_code.parquet"
    assert _prepare("archer-code", src, out) == 0
    data = _load(out, tokenizer)
    assert [ex.data_source for ex in data] == ["livecodebench", "primeintellect", "archer_code"]
    assert data[2].extra_info["original_data_source"] == "some_set"
    for ex in data:
        assert _score(ex, SUM_PROGRAM, sandbox) == 1.0, ex.source
        assert _score(ex, SUM_WRONG, sandbox) == 0.0, ex.source
    rows.append(_archer_row(3, json.dumps({"inputs": ["1"], "outputs": []})))
    src.write_text(json.dumps(rows))
    assert _prepare("archer-code", src, out) == 2
    err = capsys.readouterr().err
    assert f"{src}:item 3: field 'reward_model.ground_truth': the code reward cannot" in err


def test_data_help_does_not_import_torch() -> None:
    probe = (
        "import sys\nfrom archer_mcore.cli.main import main\n"
        "try:\n    main(['data', 'prepare', '--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'torch', 'transformers', 'megatron', 'pyarrow', 'tokenizers'}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True
    )
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout[-2000:]


def test_inspect_counts_code_rows_and_their_tests(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _jsonl(tmp_path / "test.jsonl", _lcb_records(huge=False))
    out = tmp_path / "lcb.jsonl"
    assert _prepare("livecodebench", src, out, "--decode-string-pickles") == 0
    capsys.readouterr()
    assert main(["data", "inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "livecodebench: 3" in text and "code: 3" in text, text
    assert "test cases per code row: min 1, mean 2.3, max 3" in text, text
    assert "malformed" not in text.split("\n", 1)[1], text
