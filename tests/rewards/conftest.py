"""Fixtures for reward tests: worker processes must import reward_test_helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.fixture
def worker_pythonpath(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reward workers are fresh interpreters: let them import this directory's helpers."""
    old = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", f"{HERE}{os.pathsep}{old}" if old else str(HERE))
