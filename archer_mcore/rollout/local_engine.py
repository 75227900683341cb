"""In-process rollout engine: a transformers Qwen2/Qwen3 model generating on CPU (or
whatever device it sits on). The default engine without a GPU and the demo's engine.

All prompts x n samples run as one left-padded batch through a hand-written decode loop
with a KV cache (so sampling and log-probs follow `sampling.sample_next_tokens`
exactly); rows that finish are dropped from the batch to save compute.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import DynamicCache, PretrainedConfig

from archer_mcore.rollout.hf_model import build_causal_lm, load_named_tensors
from archer_mcore.rollout.sampling import sample_next_tokens
from archer_mcore.rollout.types import (
    EngineHealth,
    EnginePausedError,
    NamedTensorBucket,
    RolloutBatch,
    RolloutError,
    Sample,
    SamplingParams,
)


def _eos_ids(config: PretrainedConfig) -> tuple[int, ...]:
    eos = getattr(config, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (int(eos),)


class LocalEngine:
    """RolloutEngine backed by an in-process transformers model.

    config: HF config (object, dict with model_type, or path); state_dict: optional HF
    weights, else random weights from `seed`. `update_weights` takes the same buckets
    as the SGLang engine. Thread-safe for `pause()` from another thread while
    `generate` runs (the running call then finishes its unfinished samples as "abort").
    """

    def __init__(
        self,
        config: PretrainedConfig | Mapping[str, Any] | str | Path,
        *,
        state_dict: Mapping[str, Tensor] | None = None,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        pad_token_id: int | None = None,
        require_full_update: bool = True,
        num_threads: int | None = None,
    ) -> None:
        self.model = build_causal_lm(config, state_dict=state_dict, seed=seed, dtype=dtype)
        self.config = self.model.config
        self.pad_token_id = (
            pad_token_id if pad_token_id is not None else (self.config.pad_token_id or 0)
        )
        self.require_full_update = require_full_update
        # torch intra-op threads while generating (restored after). Tiny models decode
        # far faster single-threaded, and on a shared CPU multi-threaded spinning can cost
        # 1000x per matmul; None leaves torch's setting alone.
        self.num_threads = num_threads
        self._seed = seed
        self._generators: dict[str, torch.Generator] = {}
        self._paused = threading.Event()
        self._abort = threading.Event()
        self._lock = threading.Lock()
        self._version = 0

    @property
    def weight_version(self) -> int:
        return self._version

    # -- control ---------------------------------------------------------------------
    def pause(self) -> None:
        self._paused.set()
        self._abort.set()

    def resume(self) -> None:
        self._paused.clear()
        self._abort.clear()

    def health(self) -> EngineHealth:
        return EngineHealth(True, (f"local {self.config.model_type} v{self._version}",))

    def shutdown(self) -> None:
        pass

    def update_weights(
        self, buckets: Iterable[NamedTensorBucket], version: int | None = None
    ) -> None:
        with self._lock:
            load_named_tensors(self.model, buckets, require_all=self.require_full_update)
            self._version = self._version + 1 if version is None else int(version)

    # -- sampling RNG (checkpoint/resume) ----------------------------------------------
    def rng_state(self) -> dict[str, Tensor]:
        """The running sampling streams (device name -> generator state, a CPU uint8
        tensor) that calls without `params.seed` draw from; saved in checkpoints so a
        resumed run samples what the uninterrupted one would have."""
        with self._lock:
            return {device: g.get_state() for device, g in self._generators.items()}

    def set_rng_state(self, state: Mapping[str, Tensor]) -> None:
        """Restore streams saved by `rng_state` (devices not in `state` restart from
        the seed)."""
        with self._lock:
            self._generators = {}
            for device, s in state.items():
                g = torch.Generator(device=device)
                g.set_state(s)
                self._generators[device] = g

    # -- generation ------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[Sequence[int]], n: int, params: SamplingParams
    ) -> RolloutBatch:
        if self._paused.is_set():
            raise EnginePausedError("LocalEngine.generate called while paused")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        vocab = self.config.vocab_size
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise RolloutError(f"prompt {i} is empty")
            bad = [t for t in p if not 0 <= int(t) < vocab]
            if bad:
                raise RolloutError(f"prompt {i} has token ids outside [0, {vocab}): {bad[:5]}")
        if not prompts:
            return RolloutBatch([])
        with self._lock:
            rows = [list(map(int, p)) for p in prompts for _ in range(n)]
            saved_threads = torch.get_num_threads()
            if self.num_threads is not None:
                torch.set_num_threads(self.num_threads)
            try:
                tokens, logprobs, reasons = self._decode(rows, params)
            finally:
                torch.set_num_threads(saved_threads)
        groups: list[list[Sample]] = []
        for i, p in enumerate(prompts):
            groups.append(
                [
                    Sample(
                        prompt_index=i,
                        sample_index=j,
                        prompt_ids=list(map(int, p)),
                        token_ids=tokens[i * n + j],
                        logprobs=logprobs[i * n + j],
                        finish_reason=reasons[i * n + j],
                        weight_version=self._version,
                    )
                    for j in range(n)
                ]
            )
        return RolloutBatch(groups)

    @torch.no_grad()
    def _decode(
        self, rows: list[list[int]], params: SamplingParams
    ) -> tuple[list[list[int]], list[list[float]], list[str]]:
        """Generate for B rows. Returns per row: token ids, log-probs, finish reason."""
        device = next(self.model.parameters()).device
        if params.seed is not None:
            gen = torch.Generator(device=device).manual_seed(params.seed)
        else:  # the engine's running stream (one per device the model has lived on)
            if str(device) not in self._generators:
                self._generators[str(device)] = torch.Generator(device=device).manual_seed(
                    self._seed
                )
            gen = self._generators[str(device)]
        stop_ids = set(params.stop_token_ids)
        if not params.ignore_eos:
            stop_ids |= set(_eos_ids(self.config))
        stop_tensor = torch.tensor(sorted(stop_ids), dtype=torch.long, device=device)

        batch = len(rows)
        max_len = max(len(r) for r in rows)
        input_ids = torch.full((batch, max_len), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros((batch, max_len), dtype=torch.long)
        for b, r in enumerate(rows):  # left padding
            input_ids[b, max_len - len(r) :] = torch.tensor(r)
            attn[b, max_len - len(r) :] = 1
        input_ids, attn = input_ids.to(device), attn.to(device)
        positions = (attn.cumsum(-1) - 1).clamp(min=0)

        out_tokens: list[list[int]] = [[] for _ in range(batch)]
        out_logprobs: list[list[float]] = [[] for _ in range(batch)]
        reasons: list[str] = ["length"] * batch
        active = torch.arange(batch, device=device)  # original row index of each live row

        cache = DynamicCache(config=self.config)
        out = self.model(
            input_ids=input_ids,
            attention_mask=attn,
            position_ids=positions,
            past_key_values=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1, :]
        next_pos = positions[:, -1] + 1
        for step in range(params.max_new_tokens):
            if self._abort.is_set():
                for b in active.tolist():
                    reasons[b] = "abort"
                break
            tok, lp = sample_next_tokens(
                logits, params.temperature, params.top_k, params.top_p, generator=gen
            )
            for b, t, v in zip(active.tolist(), tok.tolist(), lp.tolist()):
                out_tokens[b].append(t)
                out_logprobs[b].append(v)
            stopped = torch.isin(tok, stop_tensor)
            for b in active[stopped].tolist():
                reasons[b] = "stop"
            if step == params.max_new_tokens - 1:
                break
            keep = ~stopped
            if not bool(keep.any()):
                break
            if not bool(keep.all()):  # drop finished rows from the batch and the cache
                idx = keep.nonzero().squeeze(-1)
                active, tok, attn, next_pos = active[idx], tok[idx], attn[idx], next_pos[idx]
                cache.batch_select_indices(idx)
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=-1)
            out = self.model(
                input_ids=tok.unsqueeze(-1),
                attention_mask=attn,
                position_ids=next_pos.unsqueeze(-1),
                past_key_values=cache,
                use_cache=True,
            )
            logits = out.logits[:, -1, :]
            next_pos = next_pos + 1
        return out_tokens, out_logprobs, reasons
