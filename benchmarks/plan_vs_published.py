#!/usr/bin/env python
"""`archer plan` against published RL runs: predicted vs published step time and
tokens/s/GPU.

The published figures are NVIDIA NeMo-RL's v0.5 H100 tables
(docs/about/performance-summary.md of github.com/NVIDIA-NeMo/RL at tag v0.5.0, commit
6c7089300fded94abfa49bb9cbf9eb357d862461), each run's layout and batch from its recipe
(examples/configs/recipes/llm/performance/*.yaml at the same tag, on top of
examples/configs/grpo_math_1B.yaml): GRPO, Megatron-core training, vLLM generation,
64 prompts x 32 samples per step (G-GBS 2048), training global batch 512 sequences
(4 optimizer steps per step), max sequence 4096 tokens, a KL term to the reference
policy (reference_policy_kl_penalty 0.01), packed sequences of 4096 tokens per training
micro-batch. Every row the planner can model is here (dense Qwen3/Llama on H100); the
rows it cannot (MoE models, GB200) and verl's docs/perf tables (MoE models on H20) are
listed under "not compared" with the reason.

Each run becomes an archer config (YAML written to a temporary file, read with
`load_config` and planned with `plan_config`, as `archer plan` does) on H100 with the
published parallel layout, batch and sequence lengths. The published mean sequence
length (the table's G-Average Seq len, prompt + response) sets the assumed length mix:
prompts of `--prompt-tokens` (not published; OpenMathInstruct-2 problems with NeMo-RL's
cot.txt prompt are short) and a mean response of the rest, as a fraction of
`rollout.max_new_tokens`. Nothing else is fitted: the training MFU (35 %) and decode
bandwidth efficiency (60 %) are the planner's defaults.

Predicted tokens/s/GPU uses the page's definition, total tokens / (step time x GPUs),
with the published mean sequence length: 2048 x mean / (predicted step x GPUs).
Memory: the page publishes none, so the table shows the planner's training peak only.

Usage (from the repository root):
    python benchmarks/plan_vs_published.py
    python benchmarks/plan_vs_published.py --json benchmarks/results/plan_vs_published.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from archer_mcore.config import load_config
from archer_mcore.plan import GIB, Assumptions, Plan, plan_config

ROOT = Path(__file__).resolve().parents[1]

SOURCE = {
    "repository": "github.com/NVIDIA-NeMo/RL",
    "path": "docs/about/performance-summary.md",
    "version": "v0.5.0",
    "commit": "6c7089300fded94abfa49bb9cbf9eb357d862461",
    "section": "Nemo RL v0.5 / H100 BF16 Benchmarks, H100 FP8 Benchmarks",
    "table_header": (
        "| Algorithm | Model |On/Off policy|T-Max Sequence Length|G-Average Seq len|#-GPUs|"
        "G-GBS|T-GBS|Generation [TP,PP]|Training [TP,CP,EP,PP,VPP]|Tokens / sec / GPU|"
        "Total Step time(s)|"
    ),
    "recipes": "examples/configs/recipes/llm/performance/ (same tag)",
}

#: The model shapes: Qwen3-32B's config.json, and Llama-3.1-8B written as the planner's
#: qwen2 family (same matmul shapes; qwen2 adds q/k/v biases, 0.002 % more parameters).
QWEN3_32B: dict[str, Any] = {"path": str(ROOT / "configs" / "hf" / "Qwen3-32B")}
LLAMA31_8B: dict[str, Any] = {
    "path": "",
    "arch": {
        "family": "qwen2",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rope_theta": 500000.0,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
    },
}


@dataclass(frozen=True)
class PublishedRun:
    """One published row, its recipe's settings, and the figures (seconds, tokens)."""

    name: str
    row: str  # the table row as published
    recipe: str  # under SOURCE["recipes"]
    model: str
    precision: str  # "bf16" or "fp8" (training and generation)
    gpus: int  # all GPUs of the run (the table's #-GPUs)
    generation_gpus: int  # 0: colocated with training
    train_tp: int
    train_pp: int
    train_cp: int
    recompute: str  # megatron_cfg.activation_checkpointing: true -> full
    gen_tp: int
    gen_memory_fraction: float  # vllm_cfg.gpu_memory_utilization
    one_step_off: bool  # async_grpo, max_trajectory_age_steps 1
    mean_seq_tokens: int  # G-Average Seq len
    tokens_per_s_per_gpu: float
    step_time_s: float
    prompts: int = 64
    samples: int = 32
    train_global_batch: int = 512  # sequences per optimizer step (T-GBS)
    max_seq_tokens: int = 4096  # T-Max Sequence Length
    micro_batch_tokens: int = 4096  # sequence_packing.train_mb_tokens = 4096 x 1
    train_ep: int = 1  # expert_model_parallel_size (MoE models)


PUBLISHED: tuple[PublishedRun, ...] = (
    PublishedRun(
        name="Qwen3-32B on-policy",
        row="| GRPO      |Qwen3-32B  |On policy    |4,096                |3,251            |32    "
        "|2,048|512  |[4,1]             |[4,1,1,4,n/a]             |571               | 376|",
        recipe="grpo-qwen3-32b-4n8g.yaml",
        model="Qwen3-32B",
        precision="bf16",
        gpus=32,
        generation_gpus=0,
        train_tp=4,
        train_pp=4,
        train_cp=1,
        recompute="none",
        gen_tp=4,
        gen_memory_fraction=0.6,
        one_step_off=False,
        mean_seq_tokens=3251,
        tokens_per_s_per_gpu=571,
        step_time_s=376,
    ),
    PublishedRun(
        name="Qwen3-32B 1-step off",
        row="| GRPO      |Qwen3-32B  |1-step Off   |4,096                |3,252            |64    "
        "|2,048|512  |[4,1]             |[4,1,1,4,n/a]             |538               | 200|",
        recipe="grpo-qwen3-32b-8n8g-async-1off.yaml",
        model="Qwen3-32B",
        precision="bf16",
        gpus=64,
        generation_gpus=32,
        train_tp=4,
        train_pp=4,
        train_cp=1,
        recompute="none",
        gen_tp=4,
        gen_memory_fraction=0.8,
        one_step_off=True,
        mean_seq_tokens=3252,
        tokens_per_s_per_gpu=538,
        step_time_s=200,
    ),
    PublishedRun(
        name="Llama-3.1-8B on-policy",
        row="| GRPO      |LLAMA3.1_8B|On policy    |4,096                |1,019            |16    "
        "|2,048|512  |[1,1]             |[1,1,1,1,1,2,n/a]         |1,581             | 92.8|",
        recipe="grpo-llama3.1-8b-instruct-2n8g.yaml",
        model="Llama-3.1-8B",
        precision="bf16",
        gpus=16,
        generation_gpus=0,
        train_tp=1,
        train_pp=2,  # the recipe's pipeline_model_parallel_size (the row lists 7 numbers)
        train_cp=1,
        recompute="full",
        gen_tp=1,
        gen_memory_fraction=0.6,
        one_step_off=False,
        mean_seq_tokens=1019,
        tokens_per_s_per_gpu=1581,
        step_time_s=92.8,
    ),
    PublishedRun(
        name="Llama-3.1-8B 1-step off",
        row="| GRPO      |LLAMA3.1_8B|1-step Off   |4,096                |1,123            |16    "
        "|2,048|512  |[1,1]             |[1,1,1,1,1,1,n/a]         |2,478             | 64.8|",
        recipe="grpo-llama3.1-8b-instruct-2n8g-async-1off.yaml",
        model="Llama-3.1-8B",
        precision="bf16",
        gpus=16,
        generation_gpus=8,
        train_tp=1,
        train_pp=1,
        train_cp=1,
        recompute="full",
        gen_tp=1,
        gen_memory_fraction=0.8,
        one_step_off=True,
        mean_seq_tokens=1123,
        tokens_per_s_per_gpu=2478,
        step_time_s=64.8,
    ),
    PublishedRun(
        name="Llama-3.1-8B 1-step off FP8",
        row="| GRPO      |LLAMA3.1_8B|1-step Off   |4,096                |1,128            |16    "
        "|2,048|512  |[1,1]             |[1,1,1,1,1,1,n/a]         |3,052             | 53.0|",
        recipe="grpo-llama3.1-8b-instruct-2n8g-fp8-async-1off.yaml",
        model="Llama-3.1-8B",
        precision="fp8",
        gpus=16,
        generation_gpus=8,
        train_tp=1,
        train_pp=1,
        train_cp=1,
        recompute="full",
        gen_tp=1,
        gen_memory_fraction=0.8,
        one_step_off=True,
        mean_seq_tokens=1128,
        tokens_per_s_per_gpu=3052,
        step_time_s=53.0,
    ),
)

#: Published rows the planner cannot model, and why.
NOT_COMPARED: tuple[dict[str, str], ...] = (
    {
        "rows": "NeMo-RL v0.5 H100: DeepSeek V3, Qwen3-235B, Qwen3-30B3A (GRPO/DAPO)",
        "why": "mixture-of-experts models; the planner models dense Qwen2/Qwen3 layers only",
    },
    {
        "rows": "NeMo-RL v0.5 GB200 BF16 (all rows)",
        "why": "no GB200 in the planner's GPU_SPECS (H800, H100, H200)",
    },
    {
        "rows": "verl docs/perf/dpsk.md (commit b178a3cd56f58b2d502255daba591e92833930a7): "
        "DeepSeek 671b on 96 GPUs, MFU 0.19, step 1700 s, GPU memory 66 GB; Qwen3-30B-A3B "
        "MFU 0.4 / 0.37 / 0.31 on 8 / 16 / 32 GPUs",
        "why": "mixture-of-experts models on H20 (96 GB) with optimizer/parameter offload; "
        "verl's docs/perf publishes no dense-model step time or throughput",
    },
)


def model_section(run: PublishedRun) -> dict[str, Any]:
    if run.model == "Qwen3-30B-A3B":  # tests/planner/test_plan_vs_nemo_rl_moe.py
        return {"path": str(ROOT / "configs" / "hf" / "Qwen3-30B-A3B")}
    return dict(QWEN3_32B if run.model == "Qwen3-32B" else LLAMA31_8B)


def config_dict(run: PublishedRun, prompt_tokens: int) -> dict[str, Any]:
    """The archer config of one published run (keys as in configs/*.yaml).

    `prompt_tokens` is the prompt cap (data.max_prompt_length); responses get the rest
    of the run's maximum sequence (vLLM's max_model_len = max_total_sequence_length)."""
    gpn = 8
    colocated = run.generation_gpus == 0
    fp8 = run.precision == "fp8"
    return {
        "model": {
            **model_section(run),
            "transformer_impl": "transformer_engine",
            "fp8": "blockwise" if fp8 else "none",  # the FP8 recipe: fp8_recipe blockwise
            "recompute": run.recompute,
        },
        "parallel": {
            "tensor_model_parallel_size": run.train_tp,
            "pipeline_model_parallel_size": run.train_pp,
            "context_parallel_size": run.train_cp,
            "expert_model_parallel_size": run.train_ep,
            "sequence_parallel": run.train_tp > 1,
            "use_distributed_optimizer": True,
            "micro_batch_tokens": run.micro_batch_tokens,
            "pack_sequences": True,
        },
        "rollout": {
            "engine": "sglang",
            "mode": "colocated" if colocated else "disaggregated",
            # colocated servers share the trainer's GPUs: sync by tensor (config/checks.py)
            "weight_sync": "tensor" if colocated else "distributed",
            "n_samples_per_prompt": run.samples,
            "max_new_tokens": run.max_seq_tokens - prompt_tokens,
            "fp8": fp8,
            "async_steps": 1 if run.one_step_off else 0,
            "tis_cap": 2.0 if run.one_step_off else None,  # NeMo-RL: importance sampling on
            "sglang": {
                "num_servers": (run.generation_gpus or run.gpus) // run.gen_tp,
                "tp_size": run.gen_tp,
                "mem_fraction_static": run.gen_memory_fraction,
            },
        },
        "algorithm": {"name": "grpo", "kl_coef": 0.01, "kl_estimator": "k3"},
        "data": {"max_prompt_length": prompt_tokens},
        "train": {
            "prompts_per_step": run.prompts,
            "mini_batch_prompts": run.train_global_batch // run.samples,
            "ppo_epochs": 1,
        },
        "eval": {"every": 0},
        "slurm": {
            "nodes": run.gpus // gpn,
            "rollout_nodes": 0 if colocated else run.generation_gpus // gpn,
            "gpus_per_node": gpn,
            "gpu_type": "h100",
        },
        "kernels": {"mode": "auto"},
    }


def assumptions_for(
    run: PublishedRun, prompt_tokens: int, mean_prompt: int, mfu: float
) -> Assumptions:
    """The planner's defaults, with the length mix set to the published mean sequence:
    prompts of `mean_prompt` tokens, responses of mean (mean_seq - mean_prompt)."""
    max_new = run.max_seq_tokens - prompt_tokens
    return Assumptions(
        mean_prompt_tokens=mean_prompt,
        mean_response_fraction=(run.mean_seq_tokens - mean_prompt) / max_new,
        mfu_train=mfu,
    )


def plan_run(
    run: PublishedRun, prompt_cap: int, mean_prompt: int, mfu: float
) -> tuple[Plan, dict[str, Any]]:
    """Plan one published run through the config path `archer plan` takes."""
    cfg_dict = config_dict(run, prompt_cap)
    assume = assumptions_for(run, prompt_cap, mean_prompt, mfu)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{run.recipe.removesuffix('.yaml')}.yaml"
        path.write_text(yaml.safe_dump(cfg_dict, sort_keys=False))
        plan = plan_config(load_config(path), path, assume=assume)
    return plan, cfg_dict


def row_of(
    run: PublishedRun, plan: Plan, cfg_dict: dict[str, Any], assume: Assumptions
) -> dict[str, Any]:
    t = plan.time
    total_tokens = run.prompts * run.samples * run.mean_seq_tokens
    pred_tps = total_tokens / (t.total_s * run.gpus)
    return {
        "name": run.name,
        "model": run.model,
        "precision": run.precision,
        "gpus": run.gpus,
        "generation_gpus": run.generation_gpus,
        "colocated": run.generation_gpus == 0,
        "one_step_off": run.one_step_off,
        "train_layout": f"TP{run.train_tp} PP{run.train_pp} CP{run.train_cp} DP{plan.train.dp}",
        "generation_layout": f"{plan.rollout.num_servers} x TP{run.gen_tp}",
        "batch": f"{run.prompts} x {run.samples}, train batch {run.train_global_batch}",
        "max_seq_tokens": run.max_seq_tokens,
        "published": {
            "row": run.row,
            "recipe": f"{SOURCE['recipes']}{run.recipe}",
            "mean_seq_tokens": run.mean_seq_tokens,
            "step_time_s": run.step_time_s,
            "tokens_per_s_per_gpu": run.tokens_per_s_per_gpu,
            "memory_gib": None,
        },
        "predicted": {
            "step_time_s": t.total_s,
            "rollout_s": t.rollout_s,
            "training_s": t.training_s,
            "weight_sync_s": t.weight_sync_s,
            "overlapped": t.overlapped,
            "decode_concurrency": t.concurrency,
            "tokens_per_s_per_gpu": pred_tps,
            "training_peak_gib": plan.training.peak.total / GIB,
            "fits": plan.fits,
            "problems": plan.problems,
        },
        "ratio": {
            "step_time": t.total_s / run.step_time_s,
            "tokens_per_s_per_gpu": pred_tps / run.tokens_per_s_per_gpu,
        },
        "assumptions": {
            "mean_prompt_tokens": assume.mean_prompt_tokens,
            "mean_response_fraction": assume.mean_response_fraction,
            "mfu_train": assume.mfu_train,
            "bandwidth_efficiency": assume.bandwidth_efficiency,
        },
        "config": cfg_dict,
    }


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| run | GPUs (gen) | train / generation layout | predicted step s = phases | "
        "published step s | ratio | predicted tok/s/GPU | published | ratio | "
        "planner training peak GiB |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        p, q, k = r["predicted"], r["published"], r["ratio"]
        phases = (
            f"max(R {p['rollout_s']:.0f}, T {p['training_s']:.0f}) + S {p['weight_sync_s']:.1f}"
            if p["overlapped"]
            else f"R {p['rollout_s']:.0f} + T {p['training_s']:.0f} + S {p['weight_sync_s']:.1f}"
        )
        gen = "colocated" if r["colocated"] else str(r["generation_gpus"])
        peak = f"{p['training_peak_gib']:.1f}" + ("" if p["fits"] else " (over)")
        lines.append(
            f"| {r['name']} | {r['gpus']} ({gen}) | {r['train_layout']} / {r['generation_layout']} "
            f"| {p['step_time_s']:.0f} = {phases} | {q['step_time_s']:g} | "
            f"**{k['step_time']:.2f}** | {p['tokens_per_s_per_gpu']:.0f} | "
            f"{q['tokens_per_s_per_gpu']:g} | {k['tokens_per_s_per_gpu']:.2f} | {peak} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--prompt-tokens",
        type=int,
        default=128,
        help="assumed mean prompt length (tokens; not published)",
    )
    parser.add_argument(
        "--prompt-cap",
        type=int,
        default=256,
        help="data.max_prompt_length; responses get the rest of the 4096-token sequence",
    )
    parser.add_argument(
        "--mfu", type=float, default=Assumptions.mfu_train, help="assumed training MFU"
    )
    parser.add_argument("--json", metavar="PATH", help="also write the table as JSON here")
    args = parser.parse_args(argv)
    if not 0 < args.prompt_tokens <= args.prompt_cap < 4096:
        parser.error("need 0 < --prompt-tokens <= --prompt-cap < 4096")

    rows = []
    for run in PUBLISHED:
        plan, cfg_dict = plan_run(run, args.prompt_cap, args.prompt_tokens, args.mfu)
        assume = assumptions_for(run, args.prompt_cap, args.prompt_tokens, args.mfu)
        rows.append(row_of(run, plan, cfg_dict, assume))

    print(
        f"Source: {SOURCE['repository']} {SOURCE['path']} @ {SOURCE['version']} "
        f"({SOURCE['commit']}), H100."
    )
    print(markdown(rows))
    print("\nNot compared:")
    for n in NOT_COMPARED:
        print(f"- {n['rows']}: {n['why']}")
    if args.json:
        out = {
            "source": SOURCE,
            "gpu": "h100",
            "prompt_tokens": args.prompt_tokens,
            "prompt_cap": args.prompt_cap,
            "rows": rows,
            "not_compared": list(NOT_COMPARED),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
