"""The planner behind `archer plan`: will a config fit its cluster, and how long will a
step take?

Per-GPU memory of the training side (weights, gradients, optimizer states, activations
with and without recompute, logits/entropy buffers with and without the fused
kernels) and of the rollout side (SGLang weights and KV cache), and an estimated
step time split into rollout, weight sync and training, from FLOPs, memory bandwidth
and the config (generation overlapping training under `rollout.async_steps` on
disaggregated servers). When a layout does not fit, the planner says which side and which
term overflow, and suggests the nearest layout that fits.

Conventions (all sizes in bytes, per GPU, for the most loaded rank):

* Mixed precision as megatron-core trains it: bf16 weights (2 B/param), fp32 main
  gradients (4 B/param, megatron's `accumulate_allreduce_grads_in_fp32` default for
  bf16), and fp32 master weights plus Adam's two moments (12 B/param), the latter
  sharded over data-parallel ranks by the distributed optimizer. This is the 18 (or
  6 + 12 / DP) bytes per parameter of megatron's theoretical-memory formula. A KL
  term adds a frozen bf16 reference copy (2 B/param). FP8 training is counted with
  bf16 weight copies (conservative: FP8 parameter gather keeps them in 1 byte).
* Activations follow Korthikanti et al. (arXiv 2205.05198, table 2) tensor by tensor,
  generalised to SwiGLU, grouped-query attention, Qwen3's q/k norms and flash
  attention (no s x s score tensors; a fp32 log-sum-exp per head and token instead).
  A micro-batch holds at most `parallel.micro_batch_tokens` tokens, padding included.
  How many micro-batches a rank runs, and what share of their tokens is padding, come
  from the trainer's own batching code (`archer_mcore.actor.policy_batch`, packed
  sequences or padded rows as `parallel.pack_sequences` says) applied to an assumed
  length mix: prompts of `mean_prompt_tokens`, responses lognormal with mean
  `mean_response_fraction` x `rollout.max_new_tokens` and log-sd
  `response_length_sigma`, capped at `rollout.max_new_tokens` (deterministic
  quantiles, no sampling). Padding costs compute (training FLOPs scale with it).
  The first pipeline stage holds min(PP, micro-batches) micro-batches in flight (1F1B).
* The last stage also holds the logits of one micro-batch (vocab-parallel, V / TP
  columns per rank) and what the entropy / log-prob computation keeps for backward.
* MoE models (`model/families/qwen3_moe.py`): FLOPs count the active parameters (the
  router and each token's top-k experts), memory all of them; the routed experts are
  divided by EP x expert-TP and their optimizer states sharded over the expert
  data-parallel group; the step adds the EP all-to-alls (`steptime.ep_comm_bytes`).
* Time estimates are roofline-style: matmul FLOPs at an assumed model-FLOPs
  utilisation, decode steps bounded by HBM bandwidth. They are for sizing a run, not
  a benchmark.

Modules, each importing only those before it: `specs` (GPUs, assumptions, layouts,
workload), `formulas` (per-GPU byte counts), `memory` (training and rollout memory),
`steptime`, `stop` (checkpoint save time and the signal lead), `search` (layouts from
a config, checks, the nearest fitting layout) and `report` (text and JSON). The `archer
plan` command line is archer_mcore/cli/plan.py.
"""

from __future__ import annotations

from archer_mcore.plan.formulas import (
    active_params,
    attention_params,
    cp_kv_bytes_per_token,
    cp_ring_buffer_bytes,
    cp_tokens_per_gpu,
    embedding_activation_bytes_per_token,
    expert_layer_params,
    kv_bytes_per_token,
    layer_activation_bytes_per_token,
    layer_params,
    logits_bytes,
    matmul_params_per_token,
    mlp_params,
    rollout_weight_bytes,
    stage_expert_params,
    stage_params,
    total_params,
)
from archer_mcore.plan.memory import (
    MicroBatchEstimate,
    RolloutMemory,
    StageMemory,
    TrainingMemory,
    assumed_sequence_lengths,
    microbatch_estimate,
    microbatches_per_rank,
    rollout_memory,
    training_memory,
)
from archer_mcore.plan.report import format_plan, plan_to_dict
from archer_mcore.plan.search import (
    Cluster,
    Plan,
    candidate_layouts,
    check_layout,
    cluster_from_config,
    layouts_from_config,
    logits_path_of,
    make_plan,
    memory_problems,
    nearest_fitting,
    plan_config,
    replace_sp_for_tp1,
    resolved_choices,
    shape_from_config,
    workload_from_config,
)
from archer_mcore.plan.specs import (
    DEFAULT_ASSUMPTIONS,
    GIB,
    GPU_SPECS,
    KIB,
    MIB,
    Assumptions,
    GpuSpec,
    LogitsPath,
    RecomputeMode,
    RolloutLayout,
    TrainLayout,
    Workload,
)
from archer_mcore.plan.steptime import (
    StepTime,
    cp_comm_bytes,
    ep_comm_bytes,
    forward_flops_per_token,
    step_time,
)
from archer_mcore.plan.stop import (
    CHECKPOINT_BYTES_PER_PARAM,
    SignalLead,
    checkpoint_bytes,
    checkpoint_save_s,
    signal_lead,
)

__all__ = [
    "CHECKPOINT_BYTES_PER_PARAM",
    "DEFAULT_ASSUMPTIONS",
    "GIB",
    "GPU_SPECS",
    "KIB",
    "MIB",
    "Assumptions",
    "Cluster",
    "GpuSpec",
    "LogitsPath",
    "MicroBatchEstimate",
    "Plan",
    "RecomputeMode",
    "RolloutLayout",
    "RolloutMemory",
    "SignalLead",
    "StageMemory",
    "StepTime",
    "TrainLayout",
    "TrainingMemory",
    "Workload",
    "active_params",
    "assumed_sequence_lengths",
    "attention_params",
    "candidate_layouts",
    "check_layout",
    "checkpoint_bytes",
    "checkpoint_save_s",
    "cluster_from_config",
    "cp_comm_bytes",
    "cp_kv_bytes_per_token",
    "cp_ring_buffer_bytes",
    "cp_tokens_per_gpu",
    "embedding_activation_bytes_per_token",
    "ep_comm_bytes",
    "expert_layer_params",
    "format_plan",
    "forward_flops_per_token",
    "kv_bytes_per_token",
    "layer_activation_bytes_per_token",
    "layer_params",
    "layouts_from_config",
    "logits_bytes",
    "logits_path_of",
    "make_plan",
    "matmul_params_per_token",
    "memory_problems",
    "microbatch_estimate",
    "microbatches_per_rank",
    "mlp_params",
    "nearest_fitting",
    "plan_config",
    "plan_to_dict",
    "replace_sp_for_tp1",
    "resolved_choices",
    "rollout_memory",
    "rollout_weight_bytes",
    "shape_from_config",
    "signal_lead",
    "stage_expert_params",
    "stage_params",
    "step_time",
    "total_params",
    "training_memory",
    "workload_from_config",
]
