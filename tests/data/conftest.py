"""Fixtures for data tests: the arithmetic tokenizer, built once per session, loaded
offline through transformers.AutoTokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from archer_mcore.data.arithmetic_tokenizer import build_arithmetic_tokenizer


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_arithmetic_tokenizer(tmp_path_factory.mktemp("arith_tok"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path) -> Any:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir))
