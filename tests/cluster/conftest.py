"""Make tests/services.py and the real-SGLang harness (tests/sglang_real) importable."""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parents[1]
for _p in (_TESTS, _TESTS / "sglang_real"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))
