"""Data that trained on nothing without a word (issue 14, items 10, 12, 13): rows whose
data_source maps to no reward, non-UTF-8 lines and JSON-object answers, a warm start
that covers every training prompt; and the data counters exported as metrics."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from archer_mcore.cli import main
from archer_mcore.config import load_config
from archer_mcore.data.arithmetic_tokenizer import build_arithmetic_tokenizer
from archer_mcore.data.prepare import route_rewards
from archer_mcore.data.prompt_dataset import PromptDataset
from archer_mcore.rollout.types import RolloutBatch
from archer_mcore.train.scoring import score_groups

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo_cpu.yaml"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(build_arithmetic_tokenizer(tmp_path_factory.mktemp("tok")))


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _train(tmp_path: Path, *overrides: str) -> list[str]:
    args = ["train", str(DEMO), "-o", f"train.output_dir={tmp_path / 'out'}"]
    args += ["-o", f"warmstart.cache_dir={tmp_path / 'cache'}", "-o", "metrics.enabled=false"]
    for o in overrides:
        args += ["-o", o]
    return args


# ------------------------------------------------------------------ item 10
def test_unknown_data_source_is_a_config_error_naming_source_and_file(tmp_path, capsys) -> None:
    data = _jsonl(
        tmp_path / "flat.jsonl",
        [{"prompt": "Compute 1+2.", "answer": "3"}, {"prompt": "Compute 2+2.", "answer": "4"}],
    )
    rc = main(_train(tmp_path, f"data.train_files=[{data}]", "warmstart.steps=0", "eval.every=0"))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "data.train_files: no reward function for data_source '' (2 rows, first at " in err
    assert f"{data}:line 1" in err and "data.default_reward_kind" in err
    assert "Traceback" not in err

    data2 = _jsonl(
        tmp_path / "named.jsonl",
        [{"prompt": "Compute 1+2.", "answer": "3", "data_source": "my_set"}],
    )
    rc = main(_train(tmp_path, f"data.train_files=[{data2}]", "warmstart.steps=0", "eval.every=0"))
    assert rc == 2 and "data_source 'my_set' (1 rows" in capsys.readouterr().err


def test_default_reward_kind_must_be_a_registered_kind(tmp_path: Path) -> None:
    from archer_mcore.config import ConfigError

    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  default_reward_kind: maths\n")
    with pytest.raises(ConfigError, match="data.default_reward_kind must be one of code, math"):
        load_config(cfg)


def test_rows_route_by_style_ability_or_default_and_are_then_scored(tmp_path, tokenizer) -> None:
    # Three rows with unknown sources, routed three ways, each given the right answer:
    # on main every one was an unknown_source fault, scored 0.
    rows = [
        {"prompt": "Compute 1+2.", "answer": "3", "data_source": "by_default"},
        {
            "prompt": "Compute 2+2.",
            "data_source": "by_style",
            "reward_model": {"style": "math", "ground_truth": "4"},
        },
        {
            "prompt": "Compute 2+3.",
            "data_source": "by_ability",
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": "5"},
        },
        {"prompt": "Compute 9+0.", "answer": "9", "data_source": "gsm8k"},  # routed by name
    ]
    cfg = load_config(_jsonl(tmp_path / "c.yaml", []), ["data.default_reward_kind=math"])
    data = PromptDataset.from_dicts(rows, tokenizer, 256)
    routed = route_rewards(cfg, data, "test")
    assert [ex.reward_kind for ex in routed] == ["math", "math", "math", None]

    from archer_mcore.rewards.scorer import RewardScorer

    answers = ["\\boxed{3}", "\\boxed{4}", "\\boxed{5}", "\\boxed{9}"]
    wrong = "\\boxed{1}"
    ids = [tokenizer(a, add_special_tokens=False)["input_ids"] for a in answers]
    bad = tokenizer(wrong, add_special_tokens=False)["input_ids"]
    from archer_mcore.rollout.types import Sample

    def sample(p: int, k: int, toks: list[int]) -> Sample:
        return Sample(
            prompt_index=p,
            sample_index=k,
            prompt_ids=list(routed[p].prompt_ids),
            token_ids=toks,
            logprobs=[0.0] * len(toks),
            finish_reason="stop",
        )

    batch = RolloutBatch(groups=[[sample(p, 0, i), sample(p, 1, bad)] for p, i in enumerate(ids)])
    with RewardScorer.from_config(cfg.rewards) as scorer:
        groups = score_groups(scorer, tokenizer, list(routed), batch)
        assert scorer.counters().get("faults", 0) == 0
    assert [g.correct for g in groups] == [[1.0, 0.0]] * 4


# ------------------------------------------------------------------ item 12
def test_non_utf8_lines_and_object_answers_are_malformed_rows(tmp_path, tokenizer) -> None:
    from archer_mcore.config import Config

    path = tmp_path / "mixed.jsonl"
    good = json.dumps({"prompt": "Compute 1+2.", "answer": "3", "data_source": "gsm8k"})
    latin = json.dumps(
        {"prompt": "Compute 1+2 caf\u00e9.", "answer": "3", "data_source": "gsm8k"},
        ensure_ascii=False,
    )
    obj = json.dumps({"prompt": "Compute 1+1.", "answer": {"value": 2}, "data_source": "gsm8k"})
    verl_obj = json.dumps(
        {
            "prompt": [{"role": "user", "content": "Compute 2+1."}],
            "data_source": "gsm8k",
            "reward_model": {"ground_truth": {"value": 3}},
        }
    )
    path.write_bytes(
        "\n".join([good, latin, obj, verl_obj, good])
        .encode("utf-8")
        .replace(b"caf\xc3\xa9", b"caf\xe9")
        + b"\n"
    )
    data = PromptDataset.from_files([path], tokenizer, 256)
    routed = route_rewards(Config(), data, "data.train_files")
    report = routed.report
    assert len(routed) == 2 and report.kept == 2 and report.rows_read == 5
    bad = {(b.location, b.reason.split(" (")[0]) for b in report.malformed}
    assert bad == {
        ("line 2", "not UTF-8 text"),
        ("line 3", "'answer' is a JSON object; expected a string or a number"),
        ("line 4", "ground truth is a JSON object, which a math reward cannot match"),
    }
    assert all(b.file == str(path) for b in report.malformed)
    assert "byte 0xe9" in next(b.reason for b in report.malformed if b.location == "line 2")
    assert report.metrics() == {
        "data/rows_read": 5,
        "data/kept": 2,
        "data/too_long": 0,
        "data/malformed": 3,
    }
    assert f"{path}:line 2: not UTF-8 text" in report.summary()
    # a code row's object ground truth (its test cases) stays valid
    code = [
        {
            "prompt": "Write f.",
            "data_source": "apps",
            "reward_model": {"ground_truth": {"inputs": ["1"], "outputs": ["1"]}},
        }
    ]
    kept = route_rewards(Config(), PromptDataset.from_dicts(code, tokenizer, 256), "x")
    assert len(kept) == 1 and kept.report.malformed == []


def test_data_counters_are_exported_as_metrics() -> None:
    from archer_mcore.data.prompt_dataset import BadRow, DataReport
    from archer_mcore.metrics.exporter import MetricsExporter

    report = DataReport(rows_read=7, kept=4, too_long=1, malformed=[BadRow("f", "line 2", "x")] * 2)
    with MetricsExporter(run="r", job="archer", port=0) as exporter:
        exporter.start()
        exporter.record_values(report.metrics())
        text = urllib.request.urlopen(exporter.url, timeout=10).read().decode()
    values = {
        line.split("{")[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("archer_data_rows_")
    }
    assert values == {
        "archer_data_rows_read": 7.0,
        "archer_data_rows_kept": 4.0,
        "archer_data_rows_too_long": 1.0,
        "archer_data_rows_malformed": 2.0,
    }
    # no step was recorded: record_values leaves the step bookkeeping alone
    assert not any(line.startswith("archer_steps_total{") for line in text.splitlines())


# ------------------------------------------------------------------ item 13
def test_warm_start_covering_every_file_prompt_is_a_config_error(tmp_path, capsys) -> None:
    rows = [
        {
            "prompt": f"Compute {i}+1.",
            "answer": str(i + 1),
            "data_source": "gsm8k",
            "extra_info": {"solution": f"{i}+1={i + 1} \\boxed{{{i + 1}}}"},
        }
        for i in range(5)
    ]
    data = _jsonl(tmp_path / "five.jsonl", rows)
    rc = main(
        _train(
            tmp_path,
            f"data.train_files=[{data}]",
            "warmstart.steps=5",
            "warmstart.examples=5",
            "eval.every=0",
        )
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "warmstart.examples (5) must be smaller than the 5 usable training prompts" in err


def test_eval_rejects_unknown_data_sources_before_loading_the_model(tmp_path, capsys) -> None:
    # A step directory whose manifest verifies (one listed file, its size and CRC32).
    import zlib

    step = tmp_path / "ckpt" / "step_00000001"
    step.mkdir(parents=True)
    (step / "x").write_bytes(b"x")
    manifest = {"format_version": 1, "step": 1, "files": {"x": [1, zlib.crc32(b"x")]}}
    (step / "MANIFEST.json").write_text(json.dumps(manifest))
    data = _jsonl(tmp_path / "flat.jsonl", [{"prompt": "Compute 1+2.", "answer": "3"}])
    args = ["eval", str(DEMO), "--checkpoint", str(step), "--data", str(data)]
    rc = main([*args, "-o", f"warmstart.cache_dir={tmp_path / 'cache'}"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "--data: no reward function for data_source ''" in err and f"{data}:line 1" in err
