"""Rollout engines: the `RolloutEngine` protocol and its two implementations.

    from archer_mcore.rollout import LocalEngine, SamplingParams
    engine = LocalEngine(hf_config)                        # in-process, CPU default
    batch = engine.generate(prompt_ids, n=8, params=SamplingParams(temperature=1.0))
    engine.update_weights(buckets)                         # [[(hf_name, tensor), ...], ...]

`SGLangEngine` (sglang_engine.py) drives SGLang servers; `SGLangEngine.launch` starts
them (sglang_launcher.py). Engines are imported lazily (transformers / httpx2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from archer_mcore.rollout.types import (
    EngineHealth,
    EnginePausedError,
    FinishReason,
    NamedTensorBucket,
    RolloutBatch,
    RolloutEngine,
    RolloutError,
    Sample,
    SamplingParams,
)

if TYPE_CHECKING:
    from archer_mcore.rollout.local_engine import LocalEngine
    from archer_mcore.rollout.sglang_engine import SGLangEngine
    from archer_mcore.rollout.sglang_protocol import WeightSyncConfig

__all__ = [
    "EngineHealth",
    "EnginePausedError",
    "FinishReason",
    "LocalEngine",
    "NamedTensorBucket",
    "RolloutBatch",
    "RolloutEngine",
    "RolloutError",
    "SGLangEngine",
    "Sample",
    "SamplingParams",
    "WeightSyncConfig",
]

_LAZY = {
    "LocalEngine": "archer_mcore.rollout.local_engine",
    "SGLangEngine": "archer_mcore.rollout.sglang_engine",
    "WeightSyncConfig": "archer_mcore.rollout.sglang_protocol",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'archer_mcore.rollout' has no attribute {name!r}")
