"""Prompt datasets: rows from JSONL/Parquet, rendered by the tokenizer's chat template.

    ds = PromptDataset.from_files(["train.jsonl"], tokenizer, max_prompt_length=1024)
    ds.report.summary()   # rows read / kept / too long / malformed (file + line/row)
    ex = ds[i]            # PromptExample: prompt_ids, ground_truth, data_source...

Rendering: `tokenizer.apply_chat_template(messages, add_generation_prompt=True,
tokenize=False)`, encoded without adding special tokens (the template already writes
them), by `chat_render.ChatRenderer`: the messages' text is encoded as plain text, so
a row holding "<|im_end|>" or "<|im_start|>system" cannot write a control token; the
only control tokens of a prompt are the template's. Prompts longer than
`max_prompt_length` tokens are dropped and counted; malformed rows are skipped, counted
and listed with their location (reasons cut to `MAX_REASON_CHARS`); neither stops
loading.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from archer_mcore.config.errors import clip, shorten
from archer_mcore.data.chat_render import ChatRenderer
from archer_mcore.data.readers import read_rows
from archer_mcore.data.schema import MalformedRow, Message, PromptRow, parse_row

log = logging.getLogger(__name__)


class ChatTokenizer(Protocol):
    """The part of a transformers tokenizer this module uses."""

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def __call__(self, text: str, **kwargs: Any) -> Any: ...


@dataclass(frozen=True, kw_only=True)
class PromptExample:
    """One tokenised prompt.

    prompt_ids: token ids of the rendered prompt (ends with the assistant header).
    prompt_text: the rendered prompt text.
    source: "file:line N" / "file:row N", for error messages.
    """

    prompt_ids: list[int]
    prompt_text: str
    messages: list[Message]
    ground_truth: Any
    data_source: str
    reward_style: str
    extra_info: dict[str, Any]
    source: str
    ability: str = ""
    reward_kind: str | None = (
        None  # set by `assign_reward_kinds` when the source alone does not route
    )


#: The longest reason kept for a malformed row (reasons may quote the row's values).
MAX_REASON_CHARS = 300


@dataclass(frozen=True)
class BadRow:
    """A malformed row: where it is, and why (cut to `MAX_REASON_CHARS`)."""

    file: str
    location: str  # "line N" (JSONL, 1-based) or "row N" (Parquet, 0-based)
    reason: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "reason", shorten(self.reason, MAX_REASON_CHARS))


@dataclass(kw_only=True)
class DataReport:
    """What loading did: counts, and every malformed row's location and reason."""

    rows_read: int = 0
    kept: int = 0
    too_long: int = 0
    malformed: list[BadRow] = field(default_factory=list)

    def summary(self, max_listed: int = 10) -> str:
        lines = [
            f"{self.rows_read} rows read, {self.kept} kept, {self.too_long} over the prompt "
            f"length limit, {len(self.malformed)} malformed"
        ]
        for bad in self.malformed[:max_listed]:
            lines.append(f"  {bad.file}:{bad.location}: {bad.reason}")
        if len(self.malformed) > max_listed:
            lines.append(f"  ... and {len(self.malformed) - max_listed} more")
        return "\n".join(lines)

    def metrics(self) -> dict[str, int]:
        return {
            "data/rows_read": self.rows_read,
            "data/kept": self.kept,
            "data/too_long": self.too_long,
            "data/malformed": len(self.malformed),
        }


def render_prompt(tokenizer: ChatTokenizer, messages: list[Message]) -> tuple[str, list[int]]:
    """The chat-template text of `messages` with the generation prompt, and its ids; the
    messages' text never becomes a control token (`ChatRenderer`; MalformedRow when a
    template makes that impossible to tell)."""
    return ChatRenderer(tokenizer).render(messages)


class PromptDataset(Sequence[PromptExample]):
    """An in-memory list of `PromptExample`s with the `DataReport` of its loading."""

    def __init__(self, examples: list[PromptExample], report: DataReport) -> None:
        self.examples = examples
        self.report = report

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> PromptExample:  # type: ignore[override]
        return self.examples[index]

    @classmethod
    def from_rows(
        cls,
        rows: Iterable[tuple[str, str, Any]],
        tokenizer: ChatTokenizer,
        max_prompt_length: int,
        default_data_source: str = "",
    ) -> PromptDataset:
        """Build from `(file, location, raw row or decode-error string)` triples."""
        report = DataReport()
        examples: list[PromptExample] = []
        renderer = ChatRenderer(tokenizer)
        for file, location, raw in rows:
            report.rows_read += 1
            try:
                if isinstance(raw, str):
                    raise MalformedRow(raw)
                row: PromptRow = parse_row(raw, default_data_source)
                text, ids = renderer.render(row.messages)
            except MalformedRow as err:
                report.malformed.append(BadRow(file, location, str(err)))
                continue
            except Exception as err:  # e.g. the chat template rejects the messages
                report.malformed.append(BadRow(file, location, f"{type(err).__name__}: {err}"))
                continue
            if len(ids) > max_prompt_length:
                report.too_long += 1
                continue
            examples.append(
                PromptExample(
                    prompt_ids=ids,
                    prompt_text=text,
                    messages=row.messages,
                    ground_truth=row.ground_truth,
                    data_source=row.data_source,
                    reward_style=row.reward_style,
                    extra_info=row.extra_info,
                    source=f"{file}:{location}",
                    ability=row.ability,
                )
            )
        report.kept = len(examples)
        if report.malformed or report.too_long:
            log.warning("prompt data: %s", report.summary())
        return cls(examples, report)

    @classmethod
    def from_dicts(
        cls,
        rows: Iterable[Any],
        tokenizer: ChatTokenizer,
        max_prompt_length: int,
        name: str = "<memory>",
        default_data_source: str = "",
    ) -> PromptDataset:
        """Build from in-memory rows (e.g. `generate_arithmetic_rows(...)`); locations
        are reported as "row N" (0-based) of `name`."""
        triples = ((name, f"row {i}", row) for i, row in enumerate(rows))
        return cls.from_rows(triples, tokenizer, max_prompt_length, default_data_source)

    @classmethod
    def from_files(
        cls,
        files: Sequence[str | Path],
        tokenizer: ChatTokenizer,
        max_prompt_length: int,
        default_data_source: str = "",
    ) -> PromptDataset:
        """Load JSONL/Parquet files in order (see the module docstring)."""

        def rows() -> Iterable[tuple[str, str, Any]]:
            for f in files:
                for location, raw in read_rows(f):
                    yield str(f), location, raw

        return cls.from_rows(rows(), tokenizer, max_prompt_length, default_data_source)


#: The unrouted data sources an `UnroutedDataError` names (the rest are counted).
MAX_SOURCES_LISTED = 5


class UnroutedDataError(ValueError):
    """Rows whose data_source maps to no reward function (and that name none)."""


def assign_reward_kinds(
    dataset: PromptDataset,
    kind_of: Callable[[str], str | None],
    kinds: Collection[str],
    default_kind: str = "",
    object_kinds: Collection[str] = ("code",),
) -> PromptDataset:
    """Check, at load time, that every row can be scored, and record how.

    A row is routed by its data_source when `kind_of(data_source)` names a kind (the
    reward registry knows the source); else by the first of its `reward_model.style`,
    its `ability` and `default_kind` that is one of `kinds`, which becomes its
    `reward_kind`. Rows routed no way raise UnroutedDataError naming each such
    data_source with the file and line of its first row (training on them would
    score every response as a reward fault, i.e. train on nothing). A row whose
    ground truth is a JSON object while its kind is not in `object_kinds` (code test
    cases are objects; a math answer cannot be) is malformed: dropped and listed in
    the report with its location."""
    unrouted: dict[str, tuple[str, int]] = {}
    examples = []
    report = dataset.report
    for ex in dataset:
        routed = kind_of(ex.data_source)
        assigned = None
        if routed is None:
            candidates = (ex.reward_style, ex.ability, default_kind)
            assigned = next((k for k in candidates if k and k in kinds), None)
            if assigned is None:
                where, count = unrouted.get(ex.data_source, (ex.source, 0))
                unrouted[ex.data_source] = (where, count + 1)
                continue
        kind = routed or assigned
        if isinstance(ex.ground_truth, dict) and kind not in object_kinds:
            file, _, location = ex.source.rpartition(":")
            report.malformed.append(
                BadRow(
                    file,
                    location,
                    f"ground truth is a JSON object, which a {kind} reward cannot match",
                )
            )
            continue
        examples.append(dataclasses.replace(ex, reward_kind=assigned) if assigned else ex)
    if unrouted:
        listed = "; ".join(
            f"data_source {clip(src)} ({count} rows, first at {shorten(where)})"
            for src, (where, count) in list(unrouted.items())[:MAX_SOURCES_LISTED]
        )
        if len(unrouted) > MAX_SOURCES_LISTED:
            listed += f"; and {len(unrouted) - MAX_SOURCES_LISTED} more data sources"
        raise UnroutedDataError(
            f"no reward function for {listed}: give the rows a known data_source, or name "
            f"a reward kind ({', '.join(sorted(kinds))}) in reward_model.style or ability, "
            "or set data.default_reward_kind"
        )
    report.kept = len(examples)
    return PromptDataset(examples, report)
