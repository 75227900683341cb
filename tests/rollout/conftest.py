"""Shared fixtures for the rollout tests: tiny Qwen configs."""

from __future__ import annotations

from typing import Any

import pytest
import torch


def tiny_config(model_type: str = "qwen3", **overrides: Any) -> dict[str, Any]:
    """A 2-layer, hidden-32, vocab-64 HF config dict. initializer_range 0.5 makes the
    random model's next-token distributions peaked enough for top-k/top-p to matter."""
    cfg: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        eos_token_id=1,
        pad_token_id=0,
        tie_word_embeddings=False,
        initializer_range=0.5,
    )
    if model_type == "qwen3":
        cfg["head_dim"] = 8
    cfg.update(overrides)
    return cfg


@pytest.fixture(autouse=True)
def _single_thread():
    """Tiny matmuls on a shared 2-core machine: one intra-op thread is ~1000x faster."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)
