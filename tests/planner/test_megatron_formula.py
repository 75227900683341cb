"""The planner's training memory against megatron's theoretical-memory formula.

megatron/training/theoretical_memory_usage.py (Megatron-LM, not in the megatron-core
wheel) estimates, per GPU of the most loaded rank:

* weights + optimizer = P_shard x (18, or 6 + 12 / DP with the distributed optimizer),
  P_shard = (block / PP + embedding) / TP, plus the output layer / TP when untied and
  PP = 1; block = L x layer + final norm; layer = 2h(f x 3/2 + 1) + 2h^2 (1 + g/a)(a d/h).
* activations with sequence parallelism and selective recompute (Korthikanti et al.):
  s b h (18 + 4 f / h) per layer x L, + 8 s b PP (token ids) + s b h PP (embedding
  dropout mask), x min(1, m / PP) for 1F1B, + the output layer when PP = 1, all / TP.
* activations without sequence parallelism: s b h (10 + 24 / TP) per layer x L, the
  same embedding terms (not divided by TP), the same 1F1B discount, x 1.05.

`_megatron_*` below is an independent float re-implementation of those three formulas,
written from the description above; the planner computes memory tensor by tensor. They
agree where both apply: megatron's activation formula assumes GeLU (non-gated) MLPs,
dropout, multi-head attention with a d = h and no flash-attention state, and ignores
Qwen's q/k norms and biases; the tests state each remaining difference exactly.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest

from archer_mcore.model.hf_config import ModelShape
from archer_mcore.plan import Assumptions, TrainLayout, Workload, training_memory


def _shape(**kw) -> ModelShape:
    base = dict(
        model_type="qwen3",
        vocab_size=32000,
        hidden_size=1024,
        ffn_hidden_size=4096,
        num_layers=8,
        num_heads=16,
        num_kv_heads=16,
        head_dim=64,
        rope_theta=1e6,
        rms_eps=1e-6,
        tie_embeddings=False,
        qkv_bias=False,
        qk_norm=False,
        max_position_embeddings=32768,
    )
    base.update(kw)
    return ModelShape(**base)


def _args(m: ModelShape, tp: int, pp: int, dp: int, dist_opt: bool, seq: int, swiglu: bool):
    return SimpleNamespace(
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_layers=m.num_layers,
        num_attention_heads=m.num_heads,
        num_query_groups=m.num_kv_heads,
        kv_channels=m.head_dim,
        swiglu=swiglu,
        padded_vocab_size=m.padded_vocab_size(tp),
        untie_embeddings_and_output_weights=not m.tie_embeddings,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        data_parallel_size=dp,
        use_distributed_optimizer=dist_opt,
        seq_length=seq,
        micro_batch_size=1,
    )


def _megatron_weight_and_optimizer(a) -> float:
    q_ratio = a.kv_channels * a.num_attention_heads / a.hidden_size
    attn = (
        2.0
        * a.hidden_size
        * a.hidden_size
        * (1 + a.num_query_groups / a.num_attention_heads)
        * q_ratio
    )
    mlp_mult = 1.5 if a.swiglu else 1.0
    layer = 2.0 * a.hidden_size * (a.ffn_hidden_size * mlp_mult + 1) + attn  # RMSNorm: 1 x h
    block = layer * a.num_layers + a.hidden_size
    embedding = float(a.hidden_size * a.padded_vocab_size)
    shard = (block / a.pipeline_model_parallel_size + embedding) / a.tensor_model_parallel_size
    if a.untie_embeddings_and_output_weights and a.pipeline_model_parallel_size == 1:
        shard += embedding / a.tensor_model_parallel_size
    per_param = 6 + 12 / a.data_parallel_size if a.use_distributed_optimizer else 18
    return shard * per_param


def _megatron_activation_sp(a, num_microbatches: int) -> float:
    sbh = float(a.seq_length * a.micro_batch_size * a.hidden_size)
    mem = sbh * (18 + 4 * a.ffn_hidden_size / a.hidden_size) * a.num_layers
    mem += 8.0 * a.seq_length * a.micro_batch_size * a.pipeline_model_parallel_size
    mem += sbh * a.pipeline_model_parallel_size
    pp = a.pipeline_model_parallel_size
    if pp > 1:
        mem *= min(1.0, num_microbatches / pp)
    else:
        mem += sbh * 4 * (1 + a.padded_vocab_size / a.hidden_size)
    return mem / a.tensor_model_parallel_size


def _megatron_activation_no_sp(a, num_microbatches: int) -> float:
    sbh = float(a.seq_length * a.micro_batch_size * a.hidden_size)
    mem = sbh * (10 + 24 / a.tensor_model_parallel_size) * a.num_layers
    mem += 8.0 * a.seq_length * a.micro_batch_size * a.pipeline_model_parallel_size
    mem += sbh * a.pipeline_model_parallel_size
    pp = a.pipeline_model_parallel_size
    if pp > 1:
        mem *= min(1.0, num_microbatches / pp)
    else:
        logits = (
            a.seq_length * a.micro_batch_size * a.padded_vocab_size / a.tensor_model_parallel_size
        )
        mem += (logits + sbh) * 2
    return mem * 1.05


# Megatron's activation formulas assume this layer: GeLU MLP, dropout, no flash attention.
PAPER = Assumptions(gated_mlp=False, dropout=True, flash_attention=False)


def _work(tokens: int, mini_batch_prompts: int = 8) -> Workload:
    return Workload(
        prompts_per_step=mini_batch_prompts,
        samples_per_prompt=4,
        mini_batch_prompts=mini_batch_prompts,
        ppo_epochs=1,
        max_prompt_tokens=tokens // 2,
        max_new_tokens=tokens // 2,
        needs_reference=False,
    )


@pytest.mark.parametrize("tp,pp,dp", [(1, 1, 8), (2, 1, 4), (4, 2, 2), (8, 4, 1), (2, 2, 16)])
@pytest.mark.parametrize("dist_opt", [True, False])
@pytest.mark.parametrize("tied", [False, True])
def test_weights_and_optimizer_match_megatron(tp, pp, dp, dist_opt, tied):
    m = _shape(num_kv_heads=4, tie_embeddings=tied)  # GQA: megatron's formula covers it
    layout = TrainLayout(
        gpus=tp * pp * dp, tp=tp, pp=pp, distributed_optimizer=dist_opt, micro_batch_tokens=4096
    )
    mem = training_memory(m, layout, _work(4096))
    ours = mem.first.weights + mem.first.gradients + mem.first.optimizer
    ref = _megatron_weight_and_optimizer(_args(m, tp, pp, dp, dist_opt, 4096, swiglu=True))
    per_param = 6 + 12 / dp if dist_opt else 18
    # megatron spreads the final norm (h params) over every stage's block; the planner
    # puts it on the last stage only, so the first stage differs by h / (PP TP) when PP > 1.
    final_norm_share = m.hidden_size / (pp * tp) * per_param if pp > 1 else 0.0
    assert ours == pytest.approx(ref - final_norm_share, rel=1e-12)


def test_qwen3_extras_are_the_only_weight_difference():
    """Qwen3's q/k norms (2 d per layer) are what megatron's formula leaves out."""
    m = _shape(num_kv_heads=4, qk_norm=True)
    tp, pp, dp = 4, 1, 2
    layout = TrainLayout(gpus=tp * pp * dp, tp=tp, pp=pp, micro_batch_tokens=4096)
    mem = training_memory(m, layout, _work(4096))
    ours = mem.first.weights + mem.first.gradients + mem.first.optimizer
    ref = _megatron_weight_and_optimizer(_args(m, tp, pp, dp, True, 4096, swiglu=True))
    extra = m.num_layers * 2 * m.head_dim / tp * (6 + 12 / dp)
    assert ours == pytest.approx(ref + extra, rel=1e-12)


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2), (4, 4), (8, 2)])
@pytest.mark.parametrize("ffn", [4096, 2816])
def test_activations_sp_selective_match_megatron(tp, pp, ffn):
    m = _shape(ffn_hidden_size=ffn)
    tokens = 2048
    layout = TrainLayout(
        gpus=tp * pp * 2,
        tp=tp,
        pp=pp,
        sequence_parallel=True,
        recompute="selective",
        micro_batch_tokens=tokens,
    )
    mem = training_memory(m, layout, _work(tokens), PAPER)
    assert mem.microbatches >= pp  # a full pipeline: every stage's micro-batches in flight
    ref = _megatron_activation_sp(_args(m, tp, pp, 2, True, tokens, False), mem.microbatches)
    # megatron divides the int64 token ids by TP too; they are replicated over TP ranks.
    ids_not_split = 8.0 * tokens * mem.in_flight * (1 - 1 / tp)
    assert mem.first.activations == pytest.approx(ref + ids_not_split, rel=1e-12)


@pytest.mark.parametrize("tp,pp", [(1, 2), (2, 2), (4, 2), (8, 4)])
def test_activations_without_sp_match_megatron(tp, pp):
    m = _shape()  # f = 4h: megatron's "24 / TP" hard-codes it
    tokens = 1024
    layout = TrainLayout(
        gpus=tp * pp * 2,
        tp=tp,
        pp=pp,
        sequence_parallel=False,
        recompute="selective",
        micro_batch_tokens=tokens,
    )
    mem = training_memory(m, layout, _work(tokens), PAPER)
    ref = _megatron_activation_no_sp(_args(m, tp, pp, 2, True, tokens, False), mem.microbatches)
    assert mem.first.activations * 1.05 == pytest.approx(ref, rel=1e-12)


def test_short_pipeline_discount_matches_megatron():
    """Fewer micro-batches than stages: 1F1B holds only m of them (megatron: x m / PP)."""
    m = _shape()
    tp, pp, tokens = 2, 4, 8192
    work = dataclasses.replace(_work(tokens, mini_batch_prompts=1), samples_per_prompt=2)
    layout = TrainLayout(
        gpus=tp * pp,
        tp=tp,
        pp=pp,
        sequence_parallel=True,
        recompute="selective",
        micro_batch_tokens=tokens,
    )
    mem = training_memory(m, layout, work, PAPER)
    assert mem.microbatches < pp and mem.in_flight == mem.microbatches
    ref = _megatron_activation_sp(_args(m, tp, pp, 1, True, tokens, False), mem.microbatches)
    ids_not_split = 8.0 * tokens * mem.in_flight * (1 - 1 / tp)
    assert mem.first.activations == pytest.approx(ref + ids_not_split, rel=1e-12)
