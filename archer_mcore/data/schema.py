"""The prompt-row schema shared with common RL data sets (verl-style), and its parser.

Accepted rows (one JSON object per JSONL line, or one Parquet row):

* verl style: {"prompt": [{"role": "user", "content": "..."}, ...],
  "reward_model": {"ground_truth": ..., "style": "rule"}, "data_source": "...",
  optional "extra_info": {...}, "ability": "..."};
* flat: {"prompt": "...", "answer": ...[, "data_source": "..."]}; the prompt string
  becomes one user message.

`parse_row` turns a raw dict into a `PromptRow` or raises `MalformedRow` saying why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from archer_mcore.config.errors import clip

Message = dict[str, str]
_ROLES = ("system", "user", "assistant", "tool")


class MalformedRow(ValueError):
    """A row that does not follow the schema; the message names the bad field."""


@dataclass(frozen=True, kw_only=True)
class PromptRow:
    """One prompt of a data set, before tokenisation.

    messages: the chat messages ({"role", "content"}) the chat template renders.
    ground_truth: what the reward checks against (a math answer, code test cases...).
    data_source: the data set name; the reward registry routes on it.
    reward_style: reward_model.style ("rule" in most sets).
    extra_info: passed through (e.g. a reference solution, fn_name for code).
    """

    messages: list[Message]
    ground_truth: Any
    data_source: str
    reward_style: str = "rule"
    extra_info: dict[str, Any] = field(default_factory=dict)
    ability: str = ""  # the row's "ability" ("math", "code", ...), if any


def _messages(prompt: Any) -> list[Message]:
    if isinstance(prompt, str):
        if not prompt.strip():
            raise MalformedRow("'prompt' is an empty string")
        return [{"role": "user", "content": prompt}]
    if hasattr(prompt, "tolist"):  # a numpy array from a pandas/parquet round trip
        prompt = prompt.tolist()
    if not isinstance(prompt, list) or not prompt:
        raise MalformedRow(
            f"'prompt' must be a non-empty list of messages or a string, got {type(prompt).__name__}"
        )
    messages = []
    for k, msg in enumerate(prompt):
        if not isinstance(msg, dict):
            raise MalformedRow(
                f"prompt[{k}] must be a {{role, content}} object, got {type(msg).__name__}"
            )
        role, content = msg.get("role"), msg.get("content")
        if role not in _ROLES:
            raise MalformedRow(f"prompt[{k}].role must be one of {_ROLES}, got {clip(role)}")
        if not isinstance(content, str):
            raise MalformedRow(
                f"prompt[{k}].content must be a string, got {type(content).__name__}"
            )
        messages.append({"role": role, "content": content})
    return messages


def parse_row(row: Any, default_data_source: str = "") -> PromptRow:
    """Validate and normalise one raw row (see the module docstring)."""
    if not isinstance(row, dict):
        raise MalformedRow(f"row must be a JSON object, got {type(row).__name__}")
    if "prompt" not in row:
        raise MalformedRow("missing 'prompt'")
    messages = _messages(row["prompt"])
    reward_model = row.get("reward_model")
    if isinstance(reward_model, str):  # some sets store it JSON-encoded
        try:
            reward_model = json.loads(reward_model)
        except json.JSONDecodeError as err:
            raise MalformedRow(f"'reward_model' is a string but not JSON: {err}") from err
    if reward_model is not None:
        if not isinstance(reward_model, dict) or "ground_truth" not in reward_model:
            raise MalformedRow("'reward_model' must be an object with 'ground_truth'")
        ground_truth = reward_model["ground_truth"]
        style = reward_model.get("style") or "rule"
    elif "answer" in row:
        ground_truth, style = row["answer"], "rule"
        if isinstance(ground_truth, dict):
            # A flat row's answer is what a math verifier compares with: an object can
            # never match, so every response would be scored wrong.
            raise MalformedRow("'answer' is a JSON object; expected a string or a number")
    else:
        raise MalformedRow("missing ground truth: neither 'reward_model.ground_truth' nor 'answer'")
    if ground_truth is None or (isinstance(ground_truth, str) and not ground_truth.strip()):
        raise MalformedRow("ground truth is empty")
    data_source = row.get("data_source") or default_data_source
    if not isinstance(data_source, str):
        raise MalformedRow(f"'data_source' must be a string, got {type(data_source).__name__}")
    extra = row.get("extra_info") or {}
    if not isinstance(extra, dict):
        raise MalformedRow(f"'extra_info' must be an object, got {type(extra).__name__}")
    ability = row.get("ability") or ""
    if not isinstance(ability, str):
        raise MalformedRow(f"'ability' must be a string, got {type(ability).__name__}")
    return PromptRow(
        messages=messages,
        ground_truth=ground_truth,
        data_source=data_source,
        reward_style=str(style),
        extra_info=dict(extra),
        ability=ability,
    )
