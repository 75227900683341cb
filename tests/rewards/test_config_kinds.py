"""Rewards added from the config (`rewards.kinds`, issue 25 item 3): imported by path
at config load with errors that name the key, the index and the path; routed before
the built-in routes; one registry for the data routing, the checks and the scorer; and
graded results checked against the contract (a bad score is a fault, not a crash).

The kinds live in tests/rewards/custom_reward_kinds.py, outside the package."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from archer_mcore.config import ConfigError, config_from_dict, load_config
from archer_mcore.rewards.config_kinds import registry_from_config
from archer_mcore.rewards.registry import RewardRegistry
from archer_mcore.rewards.scorer import RewardScorer
from archer_mcore.rewards.types import BAD_RESULT, WRONG_ANSWER, RewardRequest

CUSTOM = "custom_reward_kinds"


def _cfg(*kinds: dict[str, Any], **rewards: Any) -> Any:
    return config_from_dict({"rewards": {"kinds": list(kinds), **rewards}}, "test.yaml")


def _kind(**over: Any) -> dict[str, Any]:
    return {"name": "partial", "fn": f"{CUSTOM}:boxed_partial_credit", **over}


def test_a_config_kind_is_registered_and_routed_before_the_builtin_routes() -> None:
    cfg = _cfg(_kind(sources=["synthetic_arithmetic", "my_*"], graded=True))
    reg = registry_from_config(cfg.rewards)
    import custom_reward_kinds

    kind = reg.kind_for("synthetic_arithmetic")  # the built-in math route loses
    assert kind is not None and kind.name == "partial" and kind.graded
    assert kind.fn is custom_reward_kinds.boxed_partial_credit
    assert kind.execution == "process" and kind.timeout_s is None
    assert reg.kind_for("MY_set").name == "partial"  # case-insensitive pattern
    assert reg.kind_for("openai/gsm8k").name == "math"  # the other routes stay
    assert reg.kind_for("codecontests").name == "code"
    assert sorted(reg.kinds) == ["code", "math", "partial"]
    assert not reg.kinds["math"].graded


def test_without_the_config_entry_nothing_changes() -> None:
    reg = registry_from_config(_cfg().rewards)
    assert sorted(reg.kinds) == ["code", "math"]
    assert reg.kind_for("synthetic_arithmetic").name == "math"
    assert reg.kind_for("my_set") is None


def test_override_replaces_a_builtin_kind() -> None:
    cfg = _cfg(
        _kind(name="math", fn=f"{CUSTOM}:digit_overlap", override=True, graded=True, timeout_s=2.0)
    )
    kind = registry_from_config(cfg.rewards).kind_for("openai/gsm8k")
    assert kind.name == "math" and kind.graded and kind.timeout_s == 2.0
    assert kind.fn.__name__ == "digit_overlap"


def test_math_strict_answer_form_reaches_the_config_registry() -> None:
    lenient = registry_from_config(_cfg(math_strict_answer_form=False).rewards)
    strict = registry_from_config(_cfg().rewards)
    args = ("so \\boxed{3 + 3}", "6", {})
    assert lenient.kinds["math"].fn(*args).correct
    assert not strict.kinds["math"].fn(*args).correct


BAD_ENTRIES = [
    # (entries, the key the error names, a piece of its message)
    ([_kind(fn="no_such_module_xyz.sub:f")], "rewards.kinds[0].fn", "not found"),
    ([_kind(fn=f"{CUSTOM}:missing")], "rewards.kinds[0].fn", "has no attribute 'missing'"),
    ([_kind(fn=f"{CUSTOM}:NOT_CALLABLE")], "rewards.kinds[0].fn", "int, not callable"),
    (
        [_kind(fn=f"{CUSTOM}.boxed_partial_credit")],
        "rewards.kinds[0].fn",
        "'package.module:function'",
    ),
    (
        [_kind(fn=f"{CUSTOM}:two_arguments")],
        "rewards.kinds[0].fn",
        "must accept (response, ground_truth, extra)",
    ),
    (
        [_kind(execution="sandbox")],
        "rewards.kinds[0].fn",
        "must accept (response, ground_truth, extra, sandbox)",
    ),
    ([_kind(fn=f"{CUSTOM}:as_lambda")], "rewards.kinds[0].fn", "picklable module-level function"),
    ([_kind(name="math")], "rewards.kinds[0].name", "is a built-in reward kind"),
    ([_kind(override=True)], "rewards.kinds[0].override", "nothing to replace"),
    ([_kind(), _kind(name="other"), _kind()], "rewards.kinds[2].name", "already added"),
    ([_kind(name=" ")], "rewards.kinds[0].name", "must not be empty"),
    ([_kind(execution="inline", timeout_s=3.0)], "rewards.kinds[0].timeout_s", "process only"),
    ([_kind(sources=["ok", ""])], "rewards.kinds[0].sources[1]", "is empty"),
]


@pytest.mark.parametrize(("entries", "key", "message"), BAD_ENTRIES)
def test_bad_entries_fail_at_config_load_naming_key_and_path(
    entries: list[dict[str, Any]], key: str, message: str
) -> None:
    with pytest.raises(ConfigError) as err:
        _cfg(*entries)
    text = str(err.value)
    assert text.startswith("test.yaml: ") and key in text and message in text, text
    if key.endswith(".fn"):
        assert repr(entries[0]["fn"]) in text  # the path itself


def test_an_inline_kind_may_be_a_lambda() -> None:
    reg = registry_from_config(_cfg(_kind(fn=f"{CUSTOM}:as_lambda", execution="inline")).rewards)
    assert reg.kinds["partial"].fn("", "", {}) == 1.0


def test_errors_from_a_file_and_an_override_name_their_origin(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text(f'rewards:\n  kinds:\n    - {{name: p, fn: "{CUSTOM}:missing"}}\n')
    with pytest.raises(ConfigError, match=r"run\.yaml: rewards\.kinds\[0\]\.fn = "):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^override .*rewards\.kinds\[0\]\.fn = .*not found"):
        load_config(tmp_path / "run.yaml", ['rewards.kinds=[{name: p, fn: "nope_xyz:f"}]'])


def test_unknown_keys_of_an_entry_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"unknown key rewards\.kinds\[0\]\.grade"):
        _cfg(_kind(grade=True))


def test_default_reward_kind_may_name_a_config_kind() -> None:
    cfg = config_from_dict(
        {"rewards": {"kinds": [_kind()]}, "data": {"default_reward_kind": "partial"}}
    )
    assert cfg.data.default_reward_kind == "partial"
    with pytest.raises(ConfigError, match="data.default_reward_kind must be one of code, math"):
        config_from_dict({"data": {"default_reward_kind": "partial"}})


def test_data_routing_uses_the_config_registry(tmp_path: Path) -> None:
    """Rows of a source only the config kind routes load (they are an error without
    it), and a row naming the kind in reward_model.style gets it."""
    import os

    from archer_mcore.data.arithmetic_tokenizer import build_arithmetic_tokenizer
    from archer_mcore.data.prepare import route_rewards
    from archer_mcore.data.prompt_dataset import PromptDataset

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(build_arithmetic_tokenizer(tmp_path / "tok")))
    rows = [
        {"prompt": "1+1", "answer": "2", "data_source": "my_set"},
        {
            "prompt": "1+2",
            "data_source": "x",
            "reward_model": {"style": "partial", "ground_truth": "3"},
        },
    ]
    data = PromptDataset.from_dicts(rows, tokenizer, 64)
    with pytest.raises(ConfigError, match="my_set"):
        route_rewards(_cfg(), data, "data.train_files")
    cfg = _cfg(_kind(sources=["my_*"]))
    routed = route_rewards(cfg, data, "data.train_files", registry_from_config(cfg.rewards))
    assert [ex.reward_kind for ex in routed] == [None, "partial"]  # by source, by style
    # the same config without a registry passed builds the same routing
    assert [ex.reward_kind for ex in route_rewards(cfg, data, "t")] == [None, "partial"]


# ------------------------------------------------------------- graded results, scored
def _inline_registry(**graded: bool) -> RewardRegistry:
    import custom_reward_kinds as c

    reg = RewardRegistry()
    for name in ("boxed_partial_credit", "digit_overlap", "out_of_range", "not_a_number"):
        reg.register_kind(name, getattr(c, name), "inline", graded=graded.get(name, True))
        reg.map_source(name, name)
    return reg


def test_graded_scores_are_kept_and_bad_ones_are_faults() -> None:
    reqs = [
        RewardRequest(
            response="so \\boxed{6}", ground_truth="6", data_source="boxed_partial_credit"
        ),
        RewardRequest(
            response="so \\boxed{7}", ground_truth="6", data_source="boxed_partial_credit"
        ),
        RewardRequest(response="1 and 3", ground_truth="1234", data_source="digit_overlap"),
        RewardRequest(response="x", ground_truth="6", data_source="out_of_range"),
        RewardRequest(response="x", ground_truth="6", data_source="not_a_number"),
    ]
    with RewardScorer(_inline_registry(), num_workers=2, preload=()) as scorer:
        results = scorer.score_batch(reqs)
        faults = scorer.counters()["faults"]
    got = [(r.score, r.correct, r.failure, r.graded) for r in results]
    assert got == [
        (1.0, True, None, True),
        (0.25, False, WRONG_ANSWER, True),
        (0.5, False, WRONG_ANSWER, True),
        (0.0, False, BAD_RESULT, True),
        (0.0, False, BAD_RESULT, True),
    ]
    assert "score = 1.5 is not a finite number in [0, 1]" in results[3].detail
    assert "'out_of_range'" in results[3].detail and "nan" in results[4].detail
    assert faults == 2 and all(r.is_fault for r in results[3:])


def test_a_pass_fail_kind_keeps_pass_fail_semantics() -> None:
    """Ungraded: a number is correct if > 0 and scores 1.0; graded=False is recorded."""
    reg = _inline_registry(boxed_partial_credit=False)
    with RewardScorer(reg, num_workers=1, preload=()) as scorer:
        (r,) = scorer.score_batch(
            [
                RewardRequest(
                    response="\\boxed{7}", ground_truth="6", data_source="boxed_partial_credit"
                )
            ]
        )
    assert (r.score, r.correct, r.failure, r.graded) == (1.0, True, None, False)


@pytest.mark.usefixtures("worker_pythonpath")
def test_a_config_kind_runs_in_the_worker_processes() -> None:
    cfg = _cfg(_kind(sources=["my_set"], graded=True, timeout_s=30.0))
    with RewardScorer.from_config(cfg.rewards) as scorer:
        assert scorer.registry.kind_for("my_set").name == "partial"
        results = scorer.score_batch(
            [
                RewardRequest(response="\\boxed{2}", ground_truth="2", data_source="my_set"),
                RewardRequest(response="\\boxed{3}", ground_truth="2", data_source="my_set"),
                RewardRequest(response="none", ground_truth="2", data_source="my_set"),
            ]
        )
    assert [(r.score, r.graded) for r in results] == [(1.0, True), (0.25, True), (0.0, True)]
    assert all(math.isfinite(r.elapsed_s) for r in results)
