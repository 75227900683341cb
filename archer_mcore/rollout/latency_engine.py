"""A rollout engine whose generation time follows a latency model, for measuring how
much of the rollout an async trainer hides (benchmarks/async_rollout.py) and for
testing the async scheduler against slow generation on a CPU.

One `generate` call takes

    seconds = per_call_s + per_token_s * (response tokens of the call)

of wall time, spent sleeping on the calling thread (no CPU), as a server that decodes
at a fixed token throughput would. The samples come from an `inner` engine (its
weights, its sampler, its log-probs; the call then sleeps only the part of the modelled
time the inner engine did not use) or, without one, are synthesised: seeded random
response lengths in [max_new_tokens // 2, max_new_tokens] of random non-stop tokens,
log-prob log(1 / vocab_size) each (a uniform policy), so that generation costs no CPU.
Weight updates go to the inner engine, or are consumed and counted (the trainer's
export runs either way) and advance `weight_version`, which every sample carries.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from archer_mcore.rollout.types import (
    EngineHealth,
    NamedTensorBucket,
    RolloutBatch,
    RolloutEngine,
    Sample,
    SamplingParams,
)


class LatencyModelEngine:
    """RolloutEngine with modelled generation time (see the module docstring).

    per_token_s: seconds per generated response token (all samples of a call summed);
    per_call_s: fixed seconds per call; vocab_size: synthetic token range [0, vocab);
    seed: the synthetic sampler's seed. `calls` records (weight_version, tokens,
    seconds) per generate call.
    """

    def __init__(
        self,
        per_token_s: float,
        per_call_s: float = 0.0,
        inner: RolloutEngine | None = None,
        vocab_size: int = 64,
        seed: int = 0,
    ) -> None:
        if per_token_s < 0 or per_call_s < 0:
            raise ValueError("per_token_s and per_call_s must be >= 0")
        self.per_token_s = per_token_s
        self.per_call_s = per_call_s
        self.inner = inner
        self.vocab_size = vocab_size
        self._gen = torch.Generator().manual_seed(seed)
        self._version = 0
        self._lock = threading.Lock()
        self.calls: list[tuple[int, int, float]] = []

    @property
    def weight_version(self) -> int:
        return self.inner.weight_version if self.inner is not None else self._version

    def generate(
        self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams
    ) -> RolloutBatch:
        start = time.perf_counter()
        if self.inner is not None:
            batch = self.inner.generate(prompts, n, params)
        else:
            with self._lock:
                batch = self._synthesise(prompts, n, params)
        tokens = sum(len(s.token_ids) for g in batch.groups for s in g)
        modelled = self.per_call_s + self.per_token_s * tokens
        time.sleep(max(0.0, modelled - (time.perf_counter() - start)))
        self.calls.append((self.weight_version, tokens, time.perf_counter() - start))
        return batch

    def _synthesise(
        self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams
    ) -> RolloutBatch:
        stops = set(params.stop_token_ids)
        allowed = torch.tensor([t for t in range(self.vocab_size) if t not in stops])
        lo = max(1, params.max_new_tokens // 2)
        logp = -math.log(self.vocab_size)
        groups = []
        for i, p in enumerate(prompts):
            group = []
            for j in range(n):
                length = int(
                    torch.randint(lo, params.max_new_tokens + 1, (1,), generator=self._gen)
                )
                pick = torch.randint(0, len(allowed), (length,), generator=self._gen)
                ids = allowed[pick].tolist()
                group.append(
                    Sample(
                        prompt_index=i,
                        sample_index=j,
                        prompt_ids=list(map(int, p)),
                        token_ids=ids,
                        logprobs=[logp] * length,
                        finish_reason="length",
                        weight_version=self._version,
                    )
                )
            groups.append(group)
        return RolloutBatch(groups)

    def update_weights(
        self, buckets: Iterable[NamedTensorBucket], version: int | None = None
    ) -> None:
        if self.inner is not None:
            self.inner.update_weights(buckets, version=version)
            return
        for _ in buckets:  # the trainer's export is collective: run it to the end
            pass
        self._version = self._version + 1 if version is None else int(version)

    def rng_state(self) -> Any:
        """The sampler state (inner engine's, or the synthetic generator's) for checkpoints."""
        if self.inner is not None:
            get = getattr(self.inner, "rng_state", None)
            return get() if get is not None else None
        return {"latency_model": self._gen.get_state()}

    def set_rng_state(self, state: Mapping[str, Any]) -> None:
        if self.inner is not None:
            put = getattr(self.inner, "set_rng_state", None)
            if put is not None:
                put(state)
        else:
            self._gen.set_state(state["latency_model"])

    def pause(self) -> None:
        if self.inner is not None:
            self.inner.pause()

    def resume(self) -> None:
        if self.inner is not None:
            self.inner.resume()

    def health(self) -> EngineHealth:
        return EngineHealth(True, (f"latency model: {self.per_token_s} s/token",))

    def shutdown(self) -> None:
        if self.inner is not None:
            self.inner.shutdown()
