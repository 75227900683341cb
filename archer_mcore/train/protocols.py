"""What the RL loop needs from its parts, as Protocols: the loop is written against
these, not against the Megatron policy, a particular engine or the reward workers.

The policy's protocol is `archer_mcore.actor.protocol.Policy` and the rollout engine's
`archer_mcore.rollout.types.RolloutEngine`; an
engine whose sampling RNG can be saved and restored (so that a resumed run samples
what the uninterrupted one would) also satisfies `SamplingRngOwner` here
(`LocalEngine`; an SGLang server's sampler cannot be restored).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from torch import Tensor

    from archer_mcore.rewards.types import RewardRequest, RewardResult

#: One bucket of HF-named full tensors, as the policy exports and the engine loads them.
NamedTensorBucket = list[tuple[str, "Tensor"]]


class Tokenizer(Protocol):
    """The parts of a transformers tokenizer the loop uses."""

    eos_token_id: int | None
    pad_token_id: int | None

    def __call__(self, text: str, add_special_tokens: bool = True) -> Mapping[str, Any]: ...

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    def __len__(self) -> int: ...


class SamplingRngOwner(Protocol):
    """An engine whose running sampling RNG (the stream of calls without a seed) can
    be saved in a checkpoint and restored on resume."""

    def rng_state(self) -> Any:
        """The running sampling streams, picklable."""
        ...

    def set_rng_state(self, state: Any) -> None:
        """Restore what `rng_state` returned."""
        ...


class RewardScorer(Protocol):
    """Scores responses (`archer_mcore.rewards.scorer.RewardScorer`)."""

    def score_batch(self, requests: Sequence[RewardRequest]) -> list[RewardResult]:
        """Results in request order; a failing reward scores zero, never raises."""
        ...

    def counters(self) -> dict[str, int]:
        """Cumulative counts, "faults" among them."""
        ...

    def close(self) -> None: ...


class MetricsSink(Protocol):
    """Where step metrics go besides metrics.jsonl (`metrics.exporter.MetricsExporter`)."""

    def record_step(self, step: int, metrics: Mapping[str, float]) -> None: ...

    def close(self, delete_push_group: bool = True) -> None: ...
