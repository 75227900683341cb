"""What the RL loop needs from its parts, as Protocols: the loop is written against
these, not against the Megatron policy, a particular engine or the reward workers.

The policy's protocol is `archer_mcore.actor.protocol.Policy` and the rollout engine's
`archer_mcore.rollout.types.RolloutEngine`; an
engine whose sampling RNG can be saved and restored (so that a resumed run samples
what the uninterrupted one would) also satisfies `SamplingRngOwner` here
(`LocalEngine`; an SGLang server's sampler cannot be restored).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import Tensor

    from archer_mcore.rewards.types import RewardRequest, RewardResult
    from archer_mcore.train.advantage_batch import ScoredGroup
    from archer_mcore.train.dynamic_sampling import SamplingOutcome
    from archer_mcore.train.progress import PhaseTimer

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


@runtime_checkable
class RolloutScheduler(Protocol):
    """Where each step's rollout groups come from and when the engine gets new weights
    (train/rollout_scheduler.py: `SyncRollout` for `rollout.async_steps: 0`,
    `AsyncRollout` for 1). Versions: the engine's weight version is the step whose
    update it holds; `synced` lists the versions sent so far, the last being the
    trainer's."""

    async_steps: int
    synced: list[int]

    def collect(
        self, step: int, timer: PhaseTimer, boundary: Callable[[str], None] | None = None
    ) -> SamplingOutcome[ScoredGroup]:
        """Step `step`'s scored groups, on every rank. `boundary(phase)` runs on every
        rank after each generation batch and may raise to drop the step."""
        ...

    def state_before(self, step: int) -> dict[str, Any]:
        """The data position and sampling RNG as they were before step `step`'s rollout
        (a checkpoint of step `step` - 1 written while step `step` runs)."""
        ...

    def initial_sync(self) -> int:
        """Before the first step: the policy's weights into the engine; bytes sent."""
        ...

    def sync_weights(self, step: int) -> int:
        """The policy's weights into the engine as version `step`; bytes sent."""
        ...

    def skip_sync(self, step: int) -> None:
        """Record version `step` without sending it (the run stops first)."""
        ...

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        """Holds off generation while other engine use (the periodic eval) runs."""
        ...

    def checkpoint_state(self, step: int) -> dict[str, Any]:
        """What a checkpoint after step `step` needs to continue the rollouts exactly."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `checkpoint_state`'s result; refuse what this mode cannot use."""
        ...

    def step_metrics(
        self, step: int, timer: PhaseTimer, start: float, end: float
    ) -> dict[str, float]:
        """Staleness and idle/overlap metrics of step `step` (wall clock start..end, s)."""
        ...

    def close(self) -> None:
        """Stop background work; idempotent."""
        ...
