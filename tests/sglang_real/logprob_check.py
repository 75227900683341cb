"""The proof that a weight sync is right: the real server's log-probs of fixed
responses against the Megatron policy's own, and greedy output."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import httpx2
import torch

from archer_mcore.actor.policy_batch import PolicyBatch

#: fp32 on both sides (server --dtype float32, policy params fp32); what differs is the
#: kernels (SGLang's torch-native attention vs megatron's local layers) and summation
#: order, so agreement is to float32 round-off accumulated over 2 layers, not bitwise.
FP32_ATOL = 2e-4


def policy_logprobs(policy: Any, prompts: Sequence[Sequence[int]],
                    responses: Sequence[Sequence[int]]) -> list[list[float]]:  # fmt: skip
    """The policy's log p(response token | prefix) at temperature 1, per response."""
    b = len(prompts)
    t = max(len(p) + len(r) for p, r in zip(prompts, responses))
    lmax = max(len(r) for r in responses)
    ids = torch.zeros(b, t, dtype=torch.long)
    mask = torch.zeros(b, lmax, dtype=torch.bool)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, : len(p) + len(r)] = torch.tensor([*p, *r])
        mask[i, : len(r)] = True
    batch = PolicyBatch(input_ids=ids, prompt_lengths=torch.tensor([len(p) for p in prompts]),
                        response_mask=mask)  # fmt: skip
    logp, _ = policy.compute_logprobs(batch)
    return [logp[i, : len(r)].tolist() for i, r in enumerate(responses)]


def reported_input_ids(ids: Sequence[int], vocab_size: int) -> list[int]:
    """The token ids SGLang 0.5.23 reports beside input log-probs: it replaces every id
    >= vocab_size - 1 with 0 (meant for multimodal hash ids; the log-prob itself is the
    real token's), in `LogprobResultProcessor` of
    sglang/srt/managers/scheduler_components/logprob_result_processor.py."""
    return [i if i < vocab_size - 1 else 0 for i in ids]


def server_logprobs(url: str, prompt: Sequence[int], response: Sequence[int],
                    vocab_size: int = 256) -> list[float]:  # fmt: skip
    """The server's log p(response token | prefix): prompt+response as the input, with
    input log-probs from position 0 (SGLang returns None for position 0, then the
    log-prob of each input token given the tokens before it). The test servers run with
    --disable-radix-cache (sglang_harness.CPU_FLAGS), so every input position is computed
    and comes back; the ids beside them follow `reported_input_ids`."""
    ids = [*prompt, *response]
    want_ids = reported_input_ids(ids, vocab_size)
    body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
            "return_logprob": True, "logprob_start_len": 0}  # fmt: skip
    r = httpx2.post(url + "/generate", json=body, timeout=120, trust_env=False)
    r.raise_for_status()
    triples = r.json()["meta_info"]["input_token_logprobs"]
    got_ids = [int(x[1]) for x in triples]
    assert got_ids == want_ids, (
        f"input log-probs are not aligned to the input: sent {ids}, got ids {got_ids}"
    )
    return [float(x[0]) for x in triples[len(prompt) :]]


def greedy(url: str, prompt: Sequence[int], n: int = 8) -> list[int]:
    body = {"input_ids": list(prompt), "sampling_params": {"max_new_tokens": n,
            "temperature": 0.0, "ignore_eos": True}}  # fmt: skip
    r = httpx2.post(url + "/generate", json=body, timeout=120, trust_env=False)
    r.raise_for_status()
    return [int(t) for t in r.json()["output_ids"]]


def assert_close_logprobs(got: Sequence[Sequence[float]], want: Sequence[Sequence[float]],
                          atol: float, what: str) -> float:  # fmt: skip
    """Max |difference| over all tokens; fails naming the first mismatch."""
    worst = 0.0
    for i, (g, w) in enumerate(zip(got, want)):
        assert len(g) == len(w), f"{what}: response {i} has {len(g)} vs {len(w)} log-probs"
        for k, (a, b) in enumerate(zip(g, w)):
            worst = max(worst, abs(a - b))
            assert abs(a - b) <= atol, f"{what}: response {i} token {k}: server {a} vs policy {b}"
    return worst
