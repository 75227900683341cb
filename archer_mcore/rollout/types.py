"""The rollout engine interface and the data it takes and returns.

Every engine (in-process `LocalEngine`, SGLang servers `SGLangEngine`) implements
`RolloutEngine`. The trainer calls

    batch = engine.generate(prompts, n, params)   # prompts: P lists of token ids

and gets a `RolloutBatch` of P groups of n `Sample`s, group i answering prompts[i].
Token ids are ints of the policy's vocabulary; log-probs are natural-log floats.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

FinishReason = Literal["stop", "length", "abort"]
FINISH_REASONS: tuple[str, ...] = ("stop", "length", "abort")

# One bucket of weights: (HF parameter name as in a transformers Qwen2/Qwen3
# state_dict, e.g. "model.layers.0.self_attn.q_proj.weight", full unsharded tensor).
NamedTensorBucket = list[tuple[str, Tensor]]


class RolloutError(RuntimeError):
    """A rollout step could not complete; the message says which server/request and why."""


class EnginePausedError(RolloutError):
    """`generate` was called between `pause()` and `resume()`."""


@dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """Sampling parameters, one set for a whole `generate` call.

    temperature: > 0 samples from softmax(z / T); 0 means greedy (argmax), in which
        case the returned log-probs are log softmax(z) (T = 1), as in SGLang.
    top_p: keep the smallest set of most likely tokens whose probability (after
        temperature and top-k, renormalised) reaches top_p; 1.0 disables.
    top_k: keep the k most likely tokens; -1 (or 0) disables.
    max_new_tokens: response length cap (tokens), >= 1.
    stop_token_ids: generation of a sample ends after it samples one of these ids
        (the stop id is part of the returned tokens, finish reason "stop").
    ignore_eos: if False the model config's eos_token_id(s) also stop generation.
    seed: optional seed for the engine's sampler (LocalEngine honours it exactly).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 128
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0.0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"SamplingParams.top_k must be -1 (off) or >= 0, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(
                f"SamplingParams.max_new_tokens must be >= 1, got {self.max_new_tokens}"
            )
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def logprob_temperature(self) -> float:
        """The T of the returned log-probs log softmax(z / T): 1.0 for greedy."""
        return 1.0 if self.greedy else self.temperature


@dataclass(kw_only=True)
class Sample:
    """One generated response.

    prompt_index: index of its prompt in the `generate` call; sample_index: 0..n-1.
    prompt_ids: the prompt's token ids (length Lp).
    token_ids: the response token ids (length L, 1 <= L <= max_new_tokens except for
        an aborted sample, which may be empty); includes the stop token for "stop".
    logprobs: length L; logprobs[t] = log softmax(z_t / T)[token_ids[t]] under the
        engine's weights, T = SamplingParams.logprob_temperature.
    finish_reason: "stop" (sampled a stop/eos id), "length" (hit max_new_tokens),
        "abort" (cut short by pause/abort; the trainer should drop it).
    weight_version: the weight version the engine had when it generated the sample.
    request_id: the engine's id of the request that produced it ("" for LocalEngine).
    """

    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    weight_version: int = 0
    request_id: str = ""

    def __post_init__(self) -> None:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(
                f"sample ({self.prompt_index}, {self.sample_index}): "
                f"{len(self.token_ids)} token ids but {len(self.logprobs)} logprobs"
            )
        if self.finish_reason not in FINISH_REASONS:
            raise ValueError(f"unknown finish_reason {self.finish_reason!r}")


@dataclass
class RolloutBatch:
    """The result of one `generate` call: groups[i] holds the n samples of prompt i,
    ordered by sample_index. Iterating/indexing it behaves like list[list[Sample]].
    """

    groups: list[list[Sample]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self) -> Iterator[list[Sample]]:
        return iter(self.groups)

    def __getitem__(self, i: int) -> list[Sample]:
        return self.groups[i]

    def samples(self) -> list[Sample]:
        """All samples, prompt-major: length P * n."""
        return [s for g in self.groups for s in g]

    def padded_responses(self, pad_id: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        """(token_ids [B, Lmax] int64, logprobs [B, Lmax] float32, mask [B, Lmax] bool),
        B = P * n prompt-major, right-padded with pad_id / 0.0 / False."""
        flat = self.samples()
        lmax = max((len(s.token_ids) for s in flat), default=0)
        ids = torch.full((len(flat), lmax), pad_id, dtype=torch.long)
        lps = torch.zeros((len(flat), lmax), dtype=torch.float32)
        mask = torch.zeros((len(flat), lmax), dtype=torch.bool)
        for b, s in enumerate(flat):
            k = len(s.token_ids)
            ids[b, :k] = torch.tensor(s.token_ids, dtype=torch.long)
            lps[b, :k] = torch.tensor(s.logprobs, dtype=torch.float32)
            mask[b, :k] = True
        return ids, lps, mask


@dataclass(frozen=True)
class EngineHealth:
    """healthy: every server/model answers; detail: one line per server."""

    healthy: bool
    detail: tuple[str, ...] = ()


@runtime_checkable
class RolloutEngine(Protocol):
    """What the trainer needs from a rollout engine."""

    @property
    def weight_version(self) -> int: ...

    def generate(
        self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams
    ) -> RolloutBatch:
        """n samples for each prompt (token ids in); raises RolloutError on failure,
        never returns a sample twice or a partial group silently."""
        ...

    def update_weights(
        self, buckets: Iterable[NamedTensorBucket], version: int | None = None
    ) -> None:
        """Load new weights, given as buckets of (hf_name, tensor); the weight version
        becomes `version` (default: previous + 1)."""
        ...

    def pause(self) -> None:
        """Stop generating: in-flight requests end with finish reason "abort", new
        `generate` calls raise EnginePausedError until `resume()`."""
        ...

    def resume(self) -> None: ...

    def health(self) -> EngineHealth: ...

    def shutdown(self) -> None: ...
