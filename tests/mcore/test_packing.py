"""Packed micro-batches (parallel.pack_sequences) equal the same sequences run one by
one: per-token log-probs, entropies, the loss, the gradients and the weights after one
optimizer step (fp32, 1e-5), at TP=1 (also with the fused LM head's torch path),
TP=2 (also with sequence parallelism: packs padded to a multiple of TP) and PP=2, on
gloo. The budgets include one that a sequence fills exactly and ones that force the
sequences into several packs. The local spec's per-segment core attention equals
megatron's own attention under an explicit block-diagonal causal mask."""

from __future__ import annotations

import json

import packing_workers
import pytest
import torch
import torch.multiprocessing as mp
from conftest import free_port, save_tiny_hf

# sequence lengths 12, 7, 5, 9, 3, 12 (prompt + response); 48 tokens in all
PROMPTS = [3, 2, 4, 1, 2, 5]
RESPONSES = [9, 5, 1, 8, 1, 7]


def _batch(vocab: int) -> dict:
    g = torch.Generator().manual_seed(7)
    b, width, resp_w = len(PROMPTS), 14, 10
    ids = torch.randint(1, vocab, (b, width), generator=g)
    mask = torch.arange(resp_w).unsqueeze(0) < torch.tensor(RESPONSES).unsqueeze(1)
    return {
        "input_ids": ids.tolist(),
        "prompt_lengths": PROMPTS,
        "response_mask": mask.tolist(),
        "old_logp": (-2.0 + 0.3 * torch.randn(b, resp_w, generator=g)).tolist(),
        "advantages": [1.0, -0.5, 0.8, -1.2, 0.3, 0.6],
    }


def _spawn(payload: dict, world: int, tmp_path) -> dict:
    result = tmp_path / "packing_result.json"
    mp.start_processes(
        packing_workers.entry,
        args=(world, free_port(), "packing", payload, str(result)),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    return json.loads(result.read_text())


def _check(res: dict, expect_packs: dict[str, list[int]]) -> None:
    # the reference really ran one sequence per micro-batch
    assert all(n == 1 for *_, n in res["reference_shapes"]) and len(res["reference_shapes"]) == 6
    assert res["ref_grad_norm"] > 0 and res["ref_logp_nonzero"] == sum(RESPONSES)
    # the local spec's packed core attention equals megatron's attention over the whole
    # row under the block-diagonal causal mask (and the block structure matters)
    core = res["core_attention"]
    assert core["type"] == "PackedDotProductAttention"
    assert core["vs_mask"] < 1e-6 and core["causal_vs_mask"] > 1e-2, core
    for key, r in res["runs"].items():
        seqs = sorted(n for *_, n in r["shapes"])
        assert seqs == sorted(expect_packs[key.split("-")[0]]), (key, r["shapes"])
        assert all(b == 1 for b, *_ in r["shapes"]), key  # one packed row per micro-batch
        assert sum(s for _, s, _ in r["shapes"]) < sum(b * s for b, s, _ in r["unpacked_shapes"])
        for what in ("logprob", "entropy", "loss", "grad_norm", "weights"):
            assert r[what] < 1e-5, (key, what, r[what])
        assert r["grad"] < 1e-5 * max(1.0, r["grad_scale"]), (key, r["grad"])


# budget -> sequences per pack, first-fit decreasing over lengths 12, 12, 9, 7, 5, 3:
# 12: [12] [12] [9 3] [7 5]; 20: [12 7] [12 5 3] [9]; 64: all six
PACKS = {"12": [1, 1, 2, 2], "20": [2, 3, 1], "64": [6]}


def _payload(hf_dir, tp: int, pp: int, runs: list) -> dict:
    return {
        "hf_dir": str(hf_dir),
        "batch": _batch(100),
        "tp": tp,
        "pp": pp,
        "runs": runs,
        "loss": {"agg_mode": "token-mean"},
        "optim": {"lr": 1e-2, "clip_grad": 1.0, "adam_eps": 1e-4, "weight_decay": 0.0},
        "temperature": 0.9,
    }


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_packed_equals_one_by_one_tp1(tmp_path):
    hf = save_tiny_hf("qwen3", tmp_path / "hf", seed=5)
    runs = [[12, False, False], [20, False, False], [64, False, False], [20, False, True]]
    res = _spawn(_payload(hf, 1, 1, runs), 1, tmp_path)
    _check(res, PACKS)
    # parallel.pack_sequences: false on the same policy: padded rows [b, longest] with
    # b x longest <= 20, longest first: [12] [12] [9 7] [5 3] (66 tokens run, not 48)
    unpacked = res["runs"]["20-sp0-fused0"]["unpacked_shapes"]
    assert unpacked == [[1, 12, 1], [1, 12, 1], [2, 9, 2], [2, 5, 2]]
    assert res["runs"]["20-sp0-fused0"]["shapes"] == [[1, 19, 2], [1, 20, 3], [1, 9, 1]]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_packed_equals_one_by_one_tp2_with_and_without_sequence_parallel(tmp_path):
    hf = save_tiny_hf("qwen3", tmp_path / "hf", seed=6)
    runs = [[12, False, False], [20, True, False]]
    # under SP pack totals are padded to a multiple of TP: 12+7 -> 20, 12+5+3 = 20, 9 -> 10
    _check(_spawn(_payload(hf, 2, 1, runs), 2, tmp_path), PACKS)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_packed_equals_one_by_one_pp2(tmp_path):
    hf = save_tiny_hf("qwen2", tmp_path / "hf", seed=7)
    runs = [[12, False, False], [20, False, False]]
    _check(_spawn(_payload(hf, 1, 2, runs), 2, tmp_path), PACKS)
