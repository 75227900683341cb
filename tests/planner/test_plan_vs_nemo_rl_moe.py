"""The planner on a MoE run against NeMo-RL's published Qwen3-30B-A3B figures (issue 23
item 6): v0.6.0's docs/about/performance-summary.md (github.com/NVIDIA-NeMo/RL, tag
v0.6.0, commit 5fb588932bf835506a8a5bac01de4f8c7ab0a065), H100 BF16 table, GRPO
on-policy row, with its recipe examples/configs/recipes/llm/performance/
grpo-qwen3-30ba3b-4n8g.yaml (on grpo_math_1B.yaml): 32 H100 colocated, vLLM TP2,
Megatron TP1 CP1 EP8 PP1, 64 prompts x 32 samples, training batch 512, 4096-token
sequences (mean 3,203), micro-batches of 4096 packed tokens, no activation
checkpointing, KL 0.01 (k3). Planned the way benchmarks/plan_vs_published.py plans the
dense rows (same assumptions: 128-token prompts, 35 % MFU, 60 % HBM bandwidth; nothing
fitted). The ratio is printed (`pytest -s`) and reported in docs/cluster.md; the test
does not force agreement, it bounds it loosely so that a broken MoE count (all experts
as active, EP traffic off by the expert count) fails."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))

import plan_vs_published as pvp  # noqa: E402

#: | GRPO |Qwen3-30B3A|On policy |4,096 |3,203 |32 |2,048|512 |[2,1] |[1,1,8,1,n/a] |1102 | 192|
ROW = pvp.PublishedRun(
    name="Qwen3-30B-A3B on-policy",
    row="| GRPO      |Qwen3-30B3A|On policy    |4,096                |3,203            |32    "
    "|2,048|512  |[2,1]             |[1,1,8,1,n/a]             |1102               | 192|",
    recipe="grpo-qwen3-30ba3b-4n8g.yaml",
    model="Qwen3-30B-A3B",
    precision="bf16",
    gpus=32,
    generation_gpus=0,
    train_tp=1,
    train_pp=1,
    train_cp=1,
    recompute="none",
    gen_tp=2,
    gen_memory_fraction=0.6,
    one_step_off=False,
    mean_seq_tokens=3203,
    tokens_per_s_per_gpu=1102,
    step_time_s=192,
    train_ep=8,
)
EP = ROW.train_ep


def plan_row(mean_prompt: int = 128, prompt_cap: int = 256) -> dict:
    plan, cfg = pvp.plan_run(ROW, prompt_cap, mean_prompt, pvp.Assumptions.mfu_train)
    assume = pvp.assumptions_for(ROW, prompt_cap, mean_prompt, pvp.Assumptions.mfu_train)
    return pvp.row_of(ROW, plan, cfg, assume) | {"plan": plan}


def offloaded_step(plan: Any, assume: Any) -> Any:
    """The step with the colocated servers' memory as NeMo-RL runs them, and as the
    trainer does with `rollout.colocated_offload` (actor/offload.py): the optimizer
    state, fp32 main params and gradients in host memory while the servers generate,
    only the bf16 weights (and the KL reference) resident. The planner itself reserves
    weights + gradients + optimizer for colocated servers (plan/search.py make_plan)."""
    from archer_mcore.plan import rollout_memory, step_time

    peak = plan.training.peak
    rmem = rollout_memory(
        plan.model,
        plan.rollout,
        plan.work,
        plan.cluster.spec,
        assume=assume,
        reserved_by_trainer=peak.weights + peak.reference,
    )
    return step_time(
        plan.model,
        plan.train,
        plan.rollout,
        plan.work,
        plan.cluster.spec,
        rmem=rmem,
        assume=assume,
        gpus_per_node=plan.cluster.gpus_per_node,
    )


def test_qwen3_30b_a3b_against_nemo_rl_v06() -> None:
    r = plan_row()
    plan, p, k = r["plan"], r["predicted"], r["ratio"]
    assert plan.train.ep == EP and plan.train.dp == 32 and plan.train.expert_dp == 4
    assert plan.model.num_experts == 128 and plan.model.moe_top_k == 8
    assert plan.time.ep_comm_s > 0  # the all-to-alls are in the step
    # As planned, the colocated servers find no KV cache beside the resident trainer.
    assert not p["fits"] and any("KV pool" in e for e in p["problems"]), p["problems"]
    assume = pvp.assumptions_for(ROW, 256, 128, pvp.Assumptions.mfu_train)
    t = offloaded_step(plan, assume)
    tokens = ROW.prompts * ROW.samples * ROW.mean_seq_tokens
    step_ratio = t.total_s / ROW.step_time_s
    tps_ratio = tokens / (t.total_s * ROW.gpus) / ROW.tokens_per_s_per_gpu
    print(
        f"\nQwen3-30B-A3B on-policy, 32 H100 (NeMo-RL v0.6, published 192 s, 1102 tok/s/GPU)"
        f"\n  as planned (trainer state resident): step {p['step_time_s']:.0f} s, ratio "
        f"{k['step_time']:.2f}; tokens/s/GPU ratio {k['tokens_per_s_per_gpu']:.2f}; "
        f"{'; '.join(p['problems'])}"
        f"\n  trainer state offloaded (colocated_offload): step {t.total_s:.0f} s = rollout "
        f"{t.rollout_s:.0f} + sync {t.weight_sync_s:.1f} + training {t.training_s:.0f} (EP "
        f"all-to-all {t.ep_comm_s:.1f}, {t.train_flops / 1e15:.0f} PFLOP); ratio "
        f"{step_ratio:.2f}; tokens/s/GPU {tokens / (t.total_s * ROW.gpus):.0f}, ratio "
        f"{tps_ratio:.2f}; training peak {p['training_peak_gib']:.1f} GiB"
    )
    # loose: a factor of 3 either way (the dense rows are within 30 %)
    assert 1 / 3 < step_ratio < 3, step_ratio


def test_moe_flops_count_active_experts_and_memory_all_of_them() -> None:
    """Hand count for Qwen3-30B-A3B (h 2048, f 768, 128 experts, top 8, 48 layers)."""
    from archer_mcore.model.hf_config import shape_from_hf_config
    from archer_mcore.plan import TrainLayout, stage_params, total_params
    from archer_mcore.plan.formulas import active_params, stage_expert_params

    m = shape_from_hf_config(ROOT / "configs" / "hf" / "Qwen3-30B-A3B")
    expert = 3 * 2048 * 768
    attn = 2048 * 128 * (32 + 8) + 32 * 128 * 2048 + 2 * 128
    layer = attn + 128 * expert + 128 * 2048 + 2 * 2048
    embed = 2 * 151936 * 2048
    assert total_params(m) == 48 * layer + embed + 2048
    assert active_params(m) == total_params(m) - 48 * 120 * expert
    assert stage_expert_params(m, 1, 1, 8) == 48 * 128 * expert // 8
    dense = stage_params(m, 1, 1, "first")
    assert dense == 48 * (layer - 128 * expert) + 151936 * 2048 * 2 + 2048  # vocab padded: 151936
    lay = TrainLayout(gpus=32, ep=8, micro_batch_tokens=4096)
    assert lay.expert_dp == 4 and lay.dp == 32
