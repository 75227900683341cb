"""Load benchmarks/algorithms.py as a module (benchmarks/ is not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def algorithms_bench() -> ModuleType:
    path = ROOT / "benchmarks" / "algorithms.py"
    spec = importlib.util.spec_from_file_location("bench_algorithms", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module
