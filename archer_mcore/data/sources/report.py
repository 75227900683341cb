"""`archer data inspect FILE`: what a prompt file holds, as the trainer would read it.

For each row, as `PromptDataset.from_files` and `route_rewards` read it: its
data_source and reward kind (the registry's routing, then reward_model.style /
ability / data.default_reward_kind), its prompt length in tokens (the chat template of
the config's tokenizer, rendered by the trainer's `ChatRenderer`) and its answer
length in tokens (a math answer's text; for code rows, the number of test cases).
Rows the trainer would skip are listed with file:line and the reason.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from archer_mcore.config import Config

if TYPE_CHECKING:
    from archer_mcore.rewards.registry import RewardRegistry

#: Histogram buckets (tokens): [0, 64), [64, 128), ... doubling, then the last bucket.
FIRST_BUCKET = 64
MAX_LISTED = 20


@dataclass(kw_only=True)
class FileReport:
    """Counts and lengths of one or more prompt files (module docstring)."""

    rows: int = 0
    by_source: Counter = field(default_factory=Counter)  # data_source -> rows
    by_kind: Counter = field(default_factory=Counter)  # reward kind ("unrouted") -> rows
    prompt_tokens: list[int] = field(default_factory=list)
    answer_tokens: list[int] = field(default_factory=list)
    test_cases: list[int] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)  # "file:line N: reason"
    over_prompt_limit: int = 0  # prompts over data.max_prompt_length
    over_context: int = 0  # prompt + rollout.max_new_tokens over the model's context

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "by_data_source": dict(self.by_source),
            "by_reward_kind": dict(self.by_kind),
            "prompt_tokens": histogram(self.prompt_tokens),
            "answer_tokens": histogram(self.answer_tokens),
            "test_cases": histogram(self.test_cases, first=1),
            "malformed": self.malformed,
            "over_max_prompt_length": self.over_prompt_limit,
            "over_context": self.over_context,
        }


def histogram(values: list[int], first: int = FIRST_BUCKET) -> dict[str, Any]:
    """Counts per doubling bucket ("[64, 128)": n) with min / max / mean; {} if empty."""
    if not values:
        return {}
    buckets: Counter = Counter()
    for v in values:
        low, high = 0, first
        while v >= high:
            low, high = high, high * 2
        buckets[(low, high)] += 1
    return {
        "min": min(values),
        "max": max(values),
        "mean": round(sum(values) / len(values), 1),
        "buckets": {f"[{lo}, {hi})": buckets[(lo, hi)] for lo, hi in sorted(buckets)},
    }


def _kind(row: Any, registry: Any, default_kind: str) -> str:
    kind = registry.kind_for(row.data_source)
    if kind is not None:
        return kind.name
    candidates = (row.reward_style, row.ability, default_kind)
    return next((k for k in candidates if k and k in registry.kinds), "unrouted")


def context_length(cfg: Config) -> int:
    """The model's context in tokens: max_position_embeddings of model.path's
    config.json when that is a local directory that has one, else
    model.arch.max_position_embeddings."""
    config_json = Path(cfg.model.path) / "config.json" if cfg.model.path else None
    if config_json is not None and config_json.is_file():
        try:
            value = json.loads(config_json.read_text()).get("max_position_embeddings")
        except (OSError, ValueError):
            value = None
        if isinstance(value, int) and value > 0:
            return value
    return cfg.model.arch.max_position_embeddings


def inspect_files(
    files: list[str | Path], cfg: Config, tokenizer: Any, registry: RewardRegistry | None = None
) -> FileReport:
    """The report of `files` under `cfg`'s limits, lengths counted with `tokenizer`, rows
    routed by `registry` (None: the run's, built from `cfg.rewards`)."""
    from archer_mcore.data.chat_render import ChatRenderer
    from archer_mcore.data.readers import read_rows
    from archer_mcore.data.schema import MalformedRow, parse_row
    from archer_mcore.rewards.code_tests import BadTestCases, parse_test_cases

    if registry is None:
        from archer_mcore.rewards.config_kinds import registry_from_config

        registry = registry_from_config(cfg.rewards)
    renderer = ChatRenderer(tokenizer)
    report = FileReport()
    context_room = context_length(cfg) - cfg.rollout.max_new_tokens
    for f in files:
        for location, raw in read_rows(f):
            report.rows += 1
            where = f"{f}:{location}"
            try:
                if isinstance(raw, str):
                    raise MalformedRow(raw)
                row = parse_row(raw)
                _, ids = renderer.render(row.messages)
            except Exception as err:  # MalformedRow, or the template refuses the messages
                why = str(err) if isinstance(err, MalformedRow) else f"{type(err).__name__}: {err}"
                report.malformed.append(f"{where}: {why}")
                continue
            kind = _kind(row, registry, cfg.data.default_reward_kind)
            report.by_source[row.data_source or "(none)"] += 1
            report.by_kind[kind] += 1
            report.prompt_tokens.append(len(ids))
            report.over_prompt_limit += len(ids) > cfg.data.max_prompt_length
            report.over_context += len(ids) > context_room
            if kind == "code":
                try:
                    cases = parse_test_cases(row.ground_truth, row.extra_info.get("fn_name"))
                except BadTestCases as err:
                    report.malformed.append(f"{where}: code ground truth: {err}")
                    continue
                report.test_cases.append(len(cases))
            else:
                answer = row.ground_truth
                text = answer if isinstance(answer, str) else json.dumps(answer)
                try:
                    report.answer_tokens.append(len(renderer.encode_plain(text)))
                except MalformedRow as err:
                    report.malformed.append(f"{where}: ground truth: {err}")
    return report


def format_report(report: FileReport, cfg: Config) -> str:
    """The report as text (what `archer data inspect` prints)."""
    lines = [f"rows: {report.rows} ({len(report.malformed)} malformed)"]
    lines.append("per data_source:")
    lines += [f"  {src}: {n}" for src, n in report.by_source.most_common()]
    lines.append("per reward kind:")
    lines += [f"  {kind}: {n}" for kind, n in report.by_kind.most_common()]
    for title, values, first in (
        ("prompt length (tokens)", report.prompt_tokens, FIRST_BUCKET),
        ("answer length (tokens, non-code rows)", report.answer_tokens, FIRST_BUCKET),
        ("test cases per code row", report.test_cases, 1),
    ):
        hist = histogram(values, first)
        if not hist:
            continue
        lines.append(f"{title}: min {hist['min']}, mean {hist['mean']}, max {hist['max']}")
        width = max(hist["buckets"].values())
        for bucket, n in hist["buckets"].items():
            bar = "#" * max(1, round(40 * n / width))
            lines.append(f"  {bucket:>16} {n:>8} {bar}")
    lines.append(
        f"over data.max_prompt_length ({cfg.data.max_prompt_length}): "
        f"{report.over_prompt_limit} prompts (the trainer drops them)"
    )
    context = context_length(cfg)
    lines.append(
        f"prompt + rollout.max_new_tokens ({cfg.rollout.max_new_tokens}) over the model's "
        f"context ({context} tokens): {report.over_context} prompts"
    )
    if report.malformed:
        lines.append("malformed rows:")
        lines += [f"  {m}" for m in report.malformed[:MAX_LISTED]]
        if len(report.malformed) > MAX_LISTED:
            lines.append(f"  ... and {len(report.malformed) - MAX_LISTED} more")
    return "\n".join(lines)
