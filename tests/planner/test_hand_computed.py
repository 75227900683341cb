"""The planner's figures for a tiny model, computed by hand (and parameter counts
checked against transformers' own Qwen2/Qwen3 models)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from archer_mcore.model.hf_config import shape_from_hf_config
from archer_mcore.plan import (
    GPU_SPECS,
    Assumptions,
    RolloutLayout,
    TrainLayout,
    Workload,
    forward_flops_per_token,
    kv_bytes_per_token,
    layer_activation_bytes_per_token,
    logits_bytes,
    rollout_memory,
    rollout_weight_bytes,
    total_params,
    training_memory,
)

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


def _hf_param_count(cfg: dict) -> int:
    config = transformers.AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def test_tiny_qwen3_parameters_by_hand():
    m = shape_from_hf_config(TINY)
    # attention: q 64x64 + k 64x32 + v 64x32 + o 64x64 = 12288, q/k norms 2 x 16 -> 12320
    # MLP: 3 x 64 x 128 = 24576; two RMSNorms: 128 -> layer 37024, x 2 layers = 74048
    # embedding + untied LM head: 2 x 256 x 64 = 32768; final norm 64 -> 106880
    assert total_params(m) == 106880


@pytest.mark.parametrize(
    "cfg",
    [
        TINY,
        {**TINY, "tie_word_embeddings": True},
        {
            **TINY,
            "model_type": "qwen2",
            "hidden_size": 96,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "head_dim": 16,
        },
    ],
)
def test_parameter_count_matches_transformers(cfg):
    assert total_params(shape_from_hf_config(cfg)) == _hf_param_count(cfg)


def test_layer_activations_by_hand():
    m = shape_from_hf_config(TINY)
    a = Assumptions()  # SwiGLU, no dropout, flash attention
    # replicated: two norm inputs + QKV input + fc1 input = 4 x 2h = 512
    # split: q,k,v 2(4+2x2)16 = 256, attention out 2x4x16 = 128, q/k-norm inputs
    # 2(4+2)16 = 192, gate/up out 2x2x128 = 512, down input 2x128 = 256, lse 4x4 = 16
    # -> 512 + 1360 = 1872 bytes per token
    assert (
        layer_activation_bytes_per_token(
            m, 1, sequence_parallel=False, recompute="none", seq_len=512, assume=a
        )
        == 1872
    )
    # TP2 without SP: 512 + 1360 / 2 = 1192; with SP: (512 + 1360) / 2 = 936
    assert (
        layer_activation_bytes_per_token(
            m, 2, sequence_parallel=False, recompute="none", seq_len=512, assume=a
        )
        == 1192
    )
    assert (
        layer_activation_bytes_per_token(
            m, 2, sequence_parallel=True, recompute="none", seq_len=512, assume=a
        )
        == 936
    )
    # selective recompute drops the flash log-sum-exp (1872 - 16); full keeps the input 2h
    assert (
        layer_activation_bytes_per_token(
            m, 1, sequence_parallel=False, recompute="selective", seq_len=512, assume=a
        )
        == 1856
    )
    assert (
        layer_activation_bytes_per_token(
            m, 1, sequence_parallel=False, recompute="full", seq_len=512, assume=a
        )
        == 128
    )
    # unfused attention keeps the softmax, 2 a s = 2 x 4 x 512 bytes more (no lse)
    eager = Assumptions(flash_attention=False)
    assert (
        layer_activation_bytes_per_token(
            m, 1, sequence_parallel=False, recompute="none", seq_len=512, assume=eager
        )
        == 1856 + 4096
    )


def test_training_memory_by_hand():
    m = shape_from_hf_config(TINY)
    work = Workload(
        prompts_per_step=4,
        samples_per_prompt=2,
        mini_batch_prompts=4,
        ppo_epochs=1,
        max_prompt_tokens=128,
        max_new_tokens=384,
        needs_reference=False,
    )
    layout = TrainLayout(gpus=2, micro_batch_tokens=512, recompute="none", logits_path="fused")
    mem = training_memory(m, layout, work)
    s = mem.first
    assert s.params == 106880
    assert s.weights == 2 * 106880
    assert s.gradients == 4 * 106880
    assert s.optimizer == 12 / 2 * 106880  # distributed over DP = 2
    # 512 tokens x (2 layers x 1872 + 8 bytes of token id)
    assert s.activations == 512 * (2 * 1872 + 8)
    # fused logits: bf16 logits over 256 columns, their gradient written into them
    # (inplace_backward), + the output weight's bf16 gradient [256, H = 64]
    assert s.logits == 2 * 512 * 256 + 2 * 64 * 256
    # full recompute: 512 x (2 x 128 + 8) kept + one layer (512 x 1872) rebuilt
    assert mem.activations_by_recompute["full"] == 512 * (2 * 128 + 8) + 512 * 1872
    assert mem.logits_by_path["unfused"] == 18 * 512 * 256


def test_logits_paths_by_hand():
    m = shape_from_hf_config({**TINY, "vocab_size": 1024})
    a = Assumptions(torch_chunk_rows=100, lm_head_chunk_rows=300)
    # TP4: 256 columns per rank. fused: bf16 logits of the 1000 taken tokens (their
    # gradient in place) + the output weight's bf16 gradient [256, H = 64].
    assert logits_bytes(m, 1000, 4, path="fused", assume=a) == 2 * 1000 * 256 + 2 * 64 * 256
    # chunked: the same logits + the larger of the torch reference's fp32 scratch over
    # one 100-row chunk (12 B per element: three fp32 tensors, measured in
    # tests/actor/test_logits_memory.py) and the weight gradient (2 x 64 x 256 is less).
    assert logits_bytes(m, 1000, 4, path="chunked", assume=a) == 2 * 1000 * 256 + 12 * 100 * 256
    # fp32 parameters (the CPU default) double the logits and the weight gradient
    assert (
        logits_bytes(m, 1000, 4, path="fused", assume=a, element_bytes=4)
        == 4 * 1000 * 256 + 4 * 64 * 256
    )
    assert logits_bytes(m, 1000, 4, path="fused_lm_head", assume=a) == 6 * 300 * 256
    assert logits_bytes(m, 1000, 4, path="unfused", assume=a) == 18 * 1000 * 256


def test_rollout_side_by_hand():
    m = shape_from_hf_config(TINY)
    # K and V x 2 layers x 2 KV heads x 16 x 2 bytes = 256 B per token; TP2 splits the
    # heads (128); TP4 cannot split 2 heads 4 ways, so each rank keeps one (128).
    assert kv_bytes_per_token(m, 1) == 256
    assert kv_bytes_per_token(m, 2) == 128
    assert kv_bytes_per_token(m, 4) == 128
    assert rollout_weight_bytes(m, 1, fp8=False) == 2 * 106880
    # FP8: layer matmuls 2 x (64x16x8 + 64x64 + 3x64x128) = 73728 at 1 byte, the rest bf16
    assert rollout_weight_bytes(m, 1, fp8=True) == 73728 + 2 * (106880 - 73728)
    work = Workload(
        prompts_per_step=2,
        samples_per_prompt=4,
        mini_batch_prompts=2,
        ppo_epochs=1,
        max_prompt_tokens=100,
        max_new_tokens=412,
        needs_reference=False,
    )
    gpu = GPU_SPECS["h100"]
    r = rollout_memory(m, RolloutLayout(num_servers=1, tp=1, mem_fraction_static=0.5), work, gpu)
    assert r.static_budget == 0.5 * gpu.memory_bytes
    assert r.kv_pool == 0.5 * gpu.memory_bytes - 2 * 106880
    assert r.concurrent_full_sequences == int(r.kv_pool // (256 * 512))
    assert r.kv_for_batch == 256 * 8 * 512


def test_forward_flops_by_hand():
    m = shape_from_hf_config(TINY)
    # matmul weights per token: 73728 (layers) + 256 x 64 (LM head) = 90112 -> 2 x 90112
    # attention: 2 (QK, AV) x 2 FLOP x 2 layers x 4 heads x 16 x 100 / 2 = 25600 at context 100
    assert forward_flops_per_token(m, 100) == 2 * 90112 + 25600


def test_kl_term_adds_a_reference_copy_by_hand():
    m = shape_from_hf_config(TINY)
    work = Workload(
        prompts_per_step=4,
        samples_per_prompt=2,
        mini_batch_prompts=4,
        ppo_epochs=1,
        max_prompt_tokens=128,
        max_new_tokens=384,
        needs_reference=True,
    )
    layout = TrainLayout(gpus=2, micro_batch_tokens=512)
    mem = training_memory(m, layout, work)
    assert mem.first.reference == 2 * 106880  # bf16 copy of all 106880 parameters
    no_kl = training_memory(m, layout, dataclasses.replace(work, needs_reference=False))
    assert mem.first.total - no_kl.first.total == 2 * 106880


def test_colocated_rollout_pool_is_what_the_trainer_leaves_by_hand():
    from archer_mcore.plan import Cluster, make_plan

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
    gpu = GPU_SPECS["h800"]
    plan = make_plan(
        m,
        Cluster(nodes=1, gpus_per_node=8, gpu="h800", rollout_nodes=0),
        TrainLayout(gpus=8, micro_batch_tokens=512),
        RolloutLayout(num_servers=8, tp=1, mem_fraction_static=0.8, colocated=True),
        work,
    )
    assert plan.fits, plan.problems
    # trainer keeps weights 2 + grads 4 + optimizer 12/8 bytes per parameter resident
    resident = 106880 * (2 + 4 + 12 / 8)
    assert plan.rollout_mem.static_budget == pytest.approx(0.8 * (gpu.memory_bytes - resident))
