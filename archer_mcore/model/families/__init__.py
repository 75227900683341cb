"""The model families the trainer supports, keyed by HF ``model_type``.

Adding a family: write its module here (a `ModelFamily`, `base.py`) and add it to
`_FAMILIES` below; docs/design.md "How to add a model family" has the checklist.
"""

from __future__ import annotations

from archer_mcore.model.families.base import ModelFamily, ParamRule, PlannerCounts
from archer_mcore.model.families.qwen import QWEN2, QWEN3
from archer_mcore.model.families.qwen3_moe import QWEN3_MOE

_FAMILIES: tuple[ModelFamily, ...] = (QWEN2, QWEN3, QWEN3_MOE)

FAMILIES: dict[str, ModelFamily] = {f.model_type: f for f in _FAMILIES}
SUPPORTED_MODEL_TYPES: tuple[str, ...] = tuple(FAMILIES)


def family_of(model_type: str | None) -> ModelFamily:
    """The family of an HF ``model_type``; ValueError naming it when unsupported."""
    try:
        return FAMILIES[model_type]  # type: ignore[index]
    except KeyError:
        raise ValueError(
            f"model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
        ) from None


def is_fp8_linear(name: str) -> bool:
    """Whether an HF tensor name is a linear weight the rollout runs in FP8, in any
    family (HF names do not collide across the registered families)."""
    return any(f.fp8_linear.match(name) is not None for f in _FAMILIES)


__all__ = [
    "FAMILIES",
    "SUPPORTED_MODEL_TYPES",
    "ModelFamily",
    "ParamRule",
    "PlannerCounts",
    "family_of",
    "is_fp8_linear",
]
