"""LocalEngine against transformers' own full forward pass (float64 copy, no cache, no
padding), and its weight update, stop, pause and protocol behaviour."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch
from conftest import tiny_config

from archer_mcore.rollout.hf_model import build_causal_lm
from archer_mcore.rollout.local_engine import LocalEngine
from archer_mcore.rollout.types import (
    EnginePausedError,
    RolloutBatch,
    RolloutEngine,
    RolloutError,
    SamplingParams,
)

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20], [30, 31, 32, 33]]


def _full_forward_logprobs(model_f64, prompt, response, temperature):
    """log softmax(z / T) of each response token from one unpadded float64 forward."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model_f64(input_ids=ids).logits[0].double()
    lp = torch.log_softmax(logits[len(prompt) - 1 : -1] / temperature, dim=-1)
    return lp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1), logits[len(prompt) - 1 : -1]


@pytest.mark.parametrize("model_type", ["qwen3", "qwen2"])
def test_logprobs_match_full_forward_recomputation(model_type):
    """Left padding (prompts of 1..7 tokens), rows finishing at different steps (stop
    ids that are hit often) and T != 1: each returned logprob equals the float64
    recomputation from the model's full forward."""
    engine = LocalEngine(tiny_config(model_type), seed=3)
    ref = copy.deepcopy(engine.model).double()
    params = SamplingParams(temperature=0.8, max_new_tokens=12, stop_token_ids=(2, 3, 4, 5), seed=7)
    batch = engine.generate(PROMPTS, 3, params)
    assert isinstance(batch, RolloutBatch) and len(batch) == len(PROMPTS)
    reasons = set()
    for i, group in enumerate(batch):
        assert [s.sample_index for s in group] == [0, 1, 2]
        for s in group:
            assert s.prompt_index == i and s.prompt_ids == PROMPTS[i]
            expected, _ = _full_forward_logprobs(ref, s.prompt_ids, s.token_ids, 0.8)
            torch.testing.assert_close(
                torch.tensor(s.logprobs, dtype=torch.float64), expected, atol=2e-5, rtol=0
            )
            reasons.add(s.finish_reason)
    assert reasons == {"stop", "length"}, "test must exercise rows finishing early"


def test_top_k_and_top_p_respected_in_generation():
    engine = LocalEngine(tiny_config(), seed=4)
    ref = copy.deepcopy(engine.model).double()
    for params in (
        SamplingParams(temperature=1.0, top_k=3, max_new_tokens=10, ignore_eos=True, seed=1),
        SamplingParams(temperature=1.0, top_p=0.5, max_new_tokens=10, ignore_eos=True, seed=2),
    ):
        for s in engine.generate(PROMPTS, 4, params).samples():
            _, logits = _full_forward_logprobs(ref, s.prompt_ids, s.token_ids, 1.0)
            probs = torch.softmax(logits, dim=-1)
            for t, tok in enumerate(s.token_ids):
                sorted_p, order = probs[t].sort(descending=True)
                rank = (order == tok).nonzero().item()
                if params.top_k > 0:
                    assert rank < params.top_k
                else:  # mass of strictly more likely tokens must be <= top_p
                    assert sorted_p[:rank].sum().item() <= params.top_p + 1e-6


def test_greedy_equals_uncached_argmax_decoding():
    engine = LocalEngine(tiny_config(), seed=5)
    ref = copy.deepcopy(engine.model).double()
    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
    batch = engine.generate(PROMPTS, 2, params)
    for group in batch:
        assert group[0].token_ids == group[1].token_ids  # greedy: n copies agree
        seq = list(group[0].prompt_ids)
        for _ in range(8):  # recompute greedy decoding with full forwards
            with torch.no_grad():
                seq.append(int(ref(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
        assert group[0].token_ids == seq[len(group[0].prompt_ids) :]
        expected, _ = _full_forward_logprobs(ref, group[0].prompt_ids, group[0].token_ids, 1.0)
        torch.testing.assert_close(
            torch.tensor(group[0].logprobs, dtype=torch.float64), expected, atol=2e-5, rtol=0
        )


def test_finish_reasons_stop_length_and_eos():
    engine = LocalEngine(tiny_config(eos_token_id=1), seed=6)
    stop = (2, 3, 4, 5, 6, 7)
    batch = engine.generate(
        PROMPTS, 4, SamplingParams(max_new_tokens=6, stop_token_ids=stop, seed=3)
    )
    stops = set(stop) | {1}
    for s in batch.samples():
        assert 1 <= len(s.token_ids) <= 6
        assert not any(t in stops for t in s.token_ids[:-1]), "generation ran past a stop id"
        if s.finish_reason == "stop":
            assert s.token_ids[-1] in stops
        else:
            assert s.finish_reason == "length" and len(s.token_ids) == 6
            assert s.token_ids[-1] not in stops
    # ignore_eos: the eos id no longer stops, explicit stop ids still do.
    batch = engine.generate(
        PROMPTS, 4, SamplingParams(max_new_tokens=8, stop_token_ids=(2,), ignore_eos=True, seed=3)
    )
    for s in batch.samples():
        assert 2 not in s.token_ids[:-1]
        assert s.finish_reason == ("stop" if s.token_ids[-1] == 2 else "length")


def test_seed_reproducible_and_padded_view():
    engine = LocalEngine(tiny_config(), seed=1)
    params = SamplingParams(max_new_tokens=5, seed=11)
    a, b = engine.generate(PROMPTS, 2, params), engine.generate(PROMPTS, 2, params)
    assert [s.token_ids for s in a.samples()] == [s.token_ids for s in b.samples()]
    ids, lps, mask = a.padded_responses(pad_id=0)
    assert ids.shape == (8, 5) and lps.shape == (8, 5) and mask.shape == (8, 5)
    for row, s in enumerate(a.samples()):
        k = len(s.token_ids)
        assert ids[row, :k].tolist() == s.token_ids and int(mask[row].sum()) == k
        assert lps[row, :k].tolist() == pytest.approx(s.logprobs)


def test_update_weights_in_buckets_matches_source_model():
    cfg = tiny_config()
    engine = LocalEngine(cfg, seed=0)
    source = build_causal_lm(cfg, seed=123)  # the "trainer's" weights
    items = list(source.state_dict().items())
    buckets = [items[i : i + 5] for i in range(0, len(items), 5)]
    engine.update_weights(iter(buckets))
    assert engine.weight_version == 1
    for name, tensor in source.state_dict().items():
        assert torch.equal(engine.model.state_dict()[name], tensor), name
    batch = engine.generate(PROMPTS[:2], 2, SamplingParams(max_new_tokens=6, seed=0))
    ref = copy.deepcopy(source).double()
    for s in batch.samples():
        assert s.weight_version == 1
        expected, _ = _full_forward_logprobs(ref, s.prompt_ids, s.token_ids, 1.0)
        torch.testing.assert_close(
            torch.tensor(s.logprobs, dtype=torch.float64), expected, atol=2e-5, rtol=0
        )
    engine.update_weights([items], version=7)
    assert engine.weight_version == 7


def test_update_weights_errors_name_the_problem():
    engine = LocalEngine(tiny_config(), seed=0)
    with pytest.raises(RolloutError, match=r"unknown HF parameter name 'model\.bogus'"):
        engine.update_weights([[("model.bogus", torch.zeros(1))]])
    with pytest.raises(RolloutError, match="model.norm.weight.*shape"):
        engine.update_weights([[("model.norm.weight", torch.zeros(3))]])
    with pytest.raises(RolloutError, match="unset"):
        engine.update_weights([[("model.norm.weight", torch.ones(32))]])


def test_tied_embeddings_update_without_lm_head():
    engine = LocalEngine(tiny_config("qwen2", tie_word_embeddings=True), seed=0)
    items = [
        (k, v.clone() + 1.0) for k, v in engine.model.state_dict().items() if k != "lm_head.weight"
    ]
    engine.update_weights([items])  # lm_head shares the embedding: not required
    assert torch.equal(engine.model.lm_head.weight, engine.model.model.embed_tokens.weight)


def test_pause_aborts_in_flight_and_blocks_new_calls():
    engine = LocalEngine(tiny_config(), seed=0)
    params = SamplingParams(max_new_tokens=200, ignore_eos=True, seed=0)
    result: list[RolloutBatch] = []
    worker = threading.Thread(target=lambda: result.append(engine.generate(PROMPTS, 4, params)))
    worker.start()
    time.sleep(0.05)
    engine.pause()
    worker.join(timeout=30)
    assert result, "generate did not return after pause"
    samples = result[0].samples()
    assert all(s.finish_reason == "abort" for s in samples)
    assert all(len(s.token_ids) < 200 and len(s.token_ids) == len(s.logprobs) for s in samples)
    with pytest.raises(EnginePausedError):
        engine.generate(PROMPTS, 1, params)
    engine.resume()
    assert len(engine.generate(PROMPTS, 1, SamplingParams(max_new_tokens=2))) == len(PROMPTS)


def test_protocol_and_bad_prompts():
    engine = LocalEngine(tiny_config(), seed=0)
    assert isinstance(engine, RolloutEngine) and engine.health().healthy
    with pytest.raises(RolloutError, match="prompt 1 has token ids outside"):
        engine.generate([[1, 2], [3, 64]], 1, SamplingParams())
    with pytest.raises(RolloutError, match="prompt 0 is empty"):
        engine.generate([[]], 1, SamplingParams())
