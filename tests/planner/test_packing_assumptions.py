"""`archer plan`'s micro-batch count and padding share are what the trainer's batching
code produces: for every preset, micro-batches built (as tensors, by
`build_microbatches`, the way `MegatronPolicy` does) for the planner's length mix hold
exactly the tokens, and come in exactly the number, the plan reports; hand-computed
figures for a small mix; parallel.pack_sequences changes the plan's figures."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from archer_mcore.actor.policy_batch import PolicyBatch, build_microbatches, plan_microbatches
from archer_mcore.config import load_config
from archer_mcore.plan import (
    Assumptions,
    TrainLayout,
    Workload,
    assumed_sequence_lengths,
    format_plan,
    microbatch_estimate,
    plan_config,
    resolved_choices,
)

ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((ROOT / "configs").glob("*.yaml"))


def _built(lengths: list[int], budget: int, multiple: int, pack: bool) -> tuple[int, int]:
    """(micro-batches, tokens they run) from real micro-batch tensors of these lengths."""
    n, width = len(lengths), max(lengths)
    seq = torch.tensor(lengths)
    ids = torch.ones(n, width, dtype=torch.uint8)  # token ids play no part here
    resp = torch.arange(width - 1).unsqueeze(0) < (seq - 1).unsqueeze(1)  # prompt of 1 token
    batch = PolicyBatch(ids, torch.ones(n, dtype=torch.long), resp)
    assert batch.seq_lengths().tolist() == lengths
    plan = plan_microbatches(batch.seq_lengths(), budget, seq_multiple=multiple, pack=pack)
    mbs = build_microbatches(batch, plan)
    assert sorted(torch.cat([mb.extras["rows"] for mb in mbs]).tolist()) == list(range(n))
    return len(mbs), sum(mb.input_ids.numel() for mb in mbs)


@pytest.mark.slow
@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
@pytest.mark.parametrize("pack", [True, False], ids=["packed", "padded"])
def test_plan_batching_matches_built_microbatches(path, pack):
    cfg = load_config(path, [f"parallel.pack_sequences={str(pack).lower()}"])
    assume = Assumptions()
    plan = plan_config(cfg, path, assume=assume)
    est = plan.training.batching
    assert est is not None and est.packed is pack and plan.train.pack_sequences is pack
    # the policy's own length multiple for this config on the planned cluster
    choices = resolved_choices(cfg, assume.te_version, plan.cluster.spec.compute_capability)
    assert plan.train.seq_multiple == choices.build.seq_multiple
    n = math.ceil(cfg.train.mini_batch_prompts * cfg.rollout.n_samples_per_prompt / plan.train.dp)
    lengths = assumed_sequence_lengths(n, plan.work, assume)
    assert est.sequences == n and est.tokens == sum(lengths)
    count, run = _built(lengths, cfg.parallel.micro_batch_tokens, choices.build.seq_multiple, pack)
    assert (est.count, est.tokens_run) == (count, run)
    assert plan.training.microbatches == count
    assert est.count >= math.ceil(est.tokens / cfg.parallel.micro_batch_tokens)
    text = format_plan(plan, assume)
    assert f"padding {est.padded_fraction:.1%}" in text
    assert ("packed sequences" if pack else "padded rows") in text


def test_hand_computed_mix_packed_and_padded():
    # lengths 10, 6, 4, 3 (prompt 1 + responses 9, 5, 3, 2), budget 12.
    # packed, first-fit decreasing: [10] [6 4] [3]: 3 micro-batches, 23 tokens, no padding.
    # padded rows, longest first: [10] (10), [6 4] (2 x 6 = 12), [3] (3): 25 tokens, 2 padding.
    lengths = [10, 6, 4, 3]
    assert _built(lengths, 12, 1, True) == (3, 23)
    assert _built(lengths, 12, 1, False) == (3, 25)
    # x4 (e.g. SP at TP=4): packed [10 -> 12] [6 4 -> 12] [3 -> 4] = 28 tokens;
    # padded rows: [10 -> 12], [6 -> 8] (adding 4 would make 2 x 8 = 16 > 12), [4 3] at 4:
    # 12 + 8 + 2 x 4 = 28 tokens
    assert _built(lengths, 12, 4, True) == (3, 28)
    assert _built(lengths, 12, 4, False) == (3, 28)


def test_assumed_lengths_follow_the_stated_lognormal():
    work = Workload(
        prompts_per_step=1, samples_per_prompt=1, mini_batch_prompts=1, ppo_epochs=1,
        max_prompt_tokens=512, max_new_tokens=20000, needs_reference=False
    )
    assume = Assumptions(
        mean_prompt_tokens=256, mean_response_fraction=0.2, response_length_sigma=0.5
    )
    lengths = assumed_sequence_lengths(2001, work, assume)
    # the median quantile: exp(mu) with mu = ln(mean) - sigma^2 / 2
    median = 256 + round(0.2 * 20000 * math.exp(-0.125))
    assert sorted(lengths)[1000] == median and lengths == sorted(lengths)
    assert max(lengths) <= 256 + 20000 and min(lengths) >= 257
    mean_resp = sum(x - 256 for x in lengths) / len(lengths)
    assert abs(mean_resp - 4000) / 4000 < 0.01  # the lognormal's mean (cap barely bites)


def test_pack_sequences_changes_the_plan():
    work = Workload(
        prompts_per_step=64, samples_per_prompt=8, mini_batch_prompts=64, ppo_epochs=1,
        max_prompt_tokens=512, max_new_tokens=8192, needs_reference=False
    )
    layout = TrainLayout(gpus=8, tp=8, micro_batch_tokens=16384, sequence_parallel=True)
    packed = microbatch_estimate(layout, work, Assumptions())
    padded = microbatch_estimate(
        TrainLayout(
            gpus=8, tp=8, micro_batch_tokens=16384, sequence_parallel=True, pack_sequences=False
        ),
        work,
        Assumptions(),
    )
    assert packed.tokens == padded.tokens
    # packed: each pack is padded once, to a multiple of TP (SP): < 8 tokens per pack
    assert 0 <= packed.tokens_run - packed.tokens < 8 * packed.count
    assert packed.padded_fraction < padded.padded_fraction
    assert packed.count < padded.count
