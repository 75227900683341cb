"""Prompt data: JSONL/Parquet datasets in the common RL schema, the synthetic
arithmetic task and its tokenizer, and a resumable sampler.

    build_arithmetic_tokenizer("tok/"); write_jsonl(generate_arithmetic_rows(512), "a.jsonl")
    ds = PromptDataset.from_files(["a.jsonl"], AutoTokenizer.from_pretrained("tok/"), 256)
    sampler = EpochSampler(len(ds), seed=1234)
    batch = [ds[i] for i in sampler.next_batch(8)]
"""

from archer_mcore.data.arithmetic_tokenizer import build_arithmetic_tokenizer
from archer_mcore.data.prompt_dataset import DataReport, PromptDataset, PromptExample
from archer_mcore.data.sampler import EpochSampler
from archer_mcore.data.schema import MalformedRow, PromptRow, parse_row
from archer_mcore.data.synthetic import (
    ArithmeticTaskConfig,
    generate_arithmetic_rows,
    solution_text,
    write_jsonl,
)

__all__ = [
    "ArithmeticTaskConfig",
    "DataReport",
    "EpochSampler",
    "MalformedRow",
    "PromptDataset",
    "PromptExample",
    "PromptRow",
    "build_arithmetic_tokenizer",
    "generate_arithmetic_rows",
    "parse_row",
    "solution_text",
    "write_jsonl",
]
