"""The step time under `rollout.async_steps: 1`: generation of step k+1 overlaps the
training of step k on disaggregated servers, so a steady-state step takes
max(rollout, training) + weight sync, not their sum (the term that put the planner
at 1.4-1.5x NeMo-RL's published one-step-off step times; benchmarks/plan_vs_published.py)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from archer_mcore.config import load_config
from archer_mcore.model.hf_config import shape_from_hf_config
from archer_mcore.plan import (
    GPU_SPECS,
    Cluster,
    RolloutLayout,
    StepTime,
    TrainLayout,
    Workload,
    make_plan,
    plan_config,
    plan_to_dict,
    total_params,
)

ROOT = Path(__file__).resolve().parents[2]

TINY = {
    "model_type": "qwen3",
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "tie_word_embeddings": False,
    "max_position_embeddings": 1024,
}


def _step(overlapped: bool) -> StepTime:
    return StepTime(
        rollout_s=80.0,
        weight_sync_s=1.5,
        training_s=200.0,
        train_flops=0.0,
        decode_step_s=0.02,
        concurrency=256,
        overlapped=overlapped,
    )


def test_total_by_hand():
    # in series: 80 + 1.5 + 200; overlapped: max(80, 200) + 1.5
    assert _step(False).total_s == 281.5
    assert _step(True).total_s == 201.5
    # rollout-bound: the generation is what the trainer waits for
    slow = dataclasses.replace(_step(True), rollout_s=300.0)
    assert slow.total_s == 301.5


def _tiny_plan(*, async_steps: int, colocated: bool):
    m = shape_from_hf_config(TINY)
    work = Workload(
        prompts_per_step=2,
        samples_per_prompt=4,
        mini_batch_prompts=2,
        ppo_epochs=1,
        max_prompt_tokens=100,
        max_new_tokens=412,
        needs_reference=False,
    )
    return make_plan(
        m,
        Cluster(nodes=2, gpus_per_node=8, gpu="h800", rollout_nodes=0 if colocated else 1),
        TrainLayout(gpus=16 if colocated else 8, micro_batch_tokens=512),
        RolloutLayout(
            num_servers=8,
            tp=1,
            mem_fraction_static=0.8,
            colocated=colocated,
            async_steps=async_steps,
        ),
        work,
    )


def test_disaggregated_async_overlaps_and_keeps_the_phases():
    serial = _tiny_plan(async_steps=0, colocated=False)
    ahead = _tiny_plan(async_steps=1, colocated=False)
    assert not serial.time.overlapped and ahead.time.overlapped
    # the phases themselves do not change, only how they add up
    for f in ("rollout_s", "weight_sync_s", "training_s", "train_flops"):
        assert getattr(ahead.time, f) == getattr(serial.time, f)
    r, t, s = ahead.time.rollout_s, ahead.time.training_s, ahead.time.weight_sync_s
    assert ahead.time.total_s == pytest.approx(max(r, t) + s)
    assert serial.time.total_s == pytest.approx(r + t + s)
    # weight sync by hand: bf16 weights over one 50 GB/s NIC (disaggregated)
    m = shape_from_hf_config(TINY)
    assert s == pytest.approx(2 * total_params(m) / GPU_SPECS["h800"].network_bytes_per_s)
    assert plan_to_dict(ahead)["time_s"]["overlapped"] is True


def test_colocated_never_overlaps():
    # colocated servers share the trainer's GPUs and are paused while it trains
    plan = _tiny_plan(async_steps=1, colocated=True)
    assert not plan.rollout.overlaps_training and not plan.time.overlapped
    t = plan.time
    assert t.total_s == pytest.approx(t.rollout_s + t.weight_sync_s + t.training_s)


def test_config_async_steps_reaches_the_plan():
    path = ROOT / "configs" / "qwen3_8b_dapo.yaml"
    base = load_config(path, ["rollout.mode=disaggregated"])
    ahead = load_config(
        path, ["rollout.mode=disaggregated", "rollout.async_steps=1", "rollout.tis_cap=2.0"]
    )
    p0, p1 = plan_config(base, path), plan_config(ahead, path)
    assert p0.rollout.async_steps == 0 and p1.rollout.async_steps == 1
    assert p1.time.overlapped and "step ahead of training" in p1.rollout.describe()
    t = p1.time
    assert t.total_s == pytest.approx(max(t.rollout_s, t.training_s) + t.weight_sync_s)
    assert t.total_s < p0.time.total_s
