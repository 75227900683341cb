"""Group filtering and DAPO's dynamic sampling, independent of the engine.

A *group* is one prompt with its n scored responses. DAPO keeps only groups whose
accuracy has non-zero std (all-correct and all-wrong groups carry no GRPO signal),
generating further batches until the prompt batch is full; Archer drops them without
refilling. This module holds that policy; the trainer supplies `generate(n_prompts)`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

import torch

from archer_mcore.algo.advantages import group_keep_mask

log = logging.getLogger(__name__)

G = TypeVar("G")


@dataclass(kw_only=True)
class SamplingOutcome(Generic[G]):
    """The groups to train on and what it cost to get them."""

    groups: list[G]
    generation_batches: int
    generated_groups: int
    dropped_groups: int
    full: bool  # False when the refill cap was hit before the batch was full
    all_groups: list[G] = field(default_factory=list)  # everything generated, for metrics

    @property
    def drop_rate(self) -> float:
        return self.dropped_groups / max(1, self.generated_groups)


def collect_groups(
    generate: Callable[[int], Sequence[G]],
    correctness: Callable[[G], Sequence[float]],
    target: int,
    mode: Literal["none", "drop", "refill"],
    *,
    max_generation_batches: int = 10,
) -> SamplingOutcome[G]:
    """Generate and filter groups until `target` are kept (mode refill) or once.

    Args:
        generate: returns freshly generated, scored groups for that many prompts.
        correctness: a group's per-response accuracy (0/1) or reward, [n].
        target: prompts per step (the batch to fill).
        mode: none keeps everything; drop filters one batch; refill filters and tops up
            from further batches, at most `max_generation_batches` in all, then trains on
            what it has (and says so).
    """
    kept: list[G] = []
    seen: list[G] = []
    dropped = batches = 0
    while True:
        batches += 1
        groups = list(generate(target))
        seen.extend(groups)
        if mode == "none":
            kept = groups
            break
        scores = torch.tensor([list(correctness(g)) for g in groups], dtype=torch.float32)
        keep = group_keep_mask(scores).tolist() if groups else []
        dropped += sum(1 for k in keep if not k)
        kept.extend(g for g, k in zip(groups, keep) if k)
        if mode == "drop" or len(kept) >= target:
            break
        if batches >= max_generation_batches:
            log.warning(
                "dynamic sampling: only %d of %d groups have mixed outcomes after %d "
                "generation batches (the cap); training on those",
                len(kept),
                target,
                batches,
            )
            break
    full = mode != "refill" or len(kept) >= target
    return SamplingOutcome(
        groups=kept[:target] if mode == "refill" else kept,
        generation_batches=batches,
        generated_groups=len(seen),
        dropped_groups=dropped,
        full=full,
        all_groups=seen,
    )
