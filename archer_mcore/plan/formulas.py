"""Per-GPU memory formulas, each one short function of the model shape and layout:
parameter counts, activation bytes per token (Korthikanti et al., arXiv 2205.05198,
table 2, generalised), logits/entropy buffers by kernel path, the parameters of a
pipeline stage, context-parallel ring buffers and the KV cache. Sizes in bytes. The MLP
figures are the model family's (`ModelFamily.counts`, `model/families/`).
"""

from __future__ import annotations

import math
from typing import Literal

from archer_mcore.model.families import family_of
from archer_mcore.model.hf_config import ModelShape
from archer_mcore.plan.specs import Assumptions, LogitsPath, RecomputeMode, TrainLayout


def attention_params(m: ModelShape) -> int:
    """q, k, v, o projections (+ q/k/v biases for Qwen2, + q/k norms for Qwen3)."""
    a, g, d, h = m.num_heads, m.num_kv_heads, m.head_dim, m.hidden_size
    n = h * d * (a + 2 * g) + a * d * h
    if m.qkv_bias:
        n += d * (a + 2 * g)
    if m.qk_norm:
        n += 2 * d
    return n


def mlp_params(m: ModelShape, gated: bool = True) -> int:
    """One layer's MLP block, as its family counts it (`PlannerCounts.mlp_params`)."""
    return family_of(m.model_type).counts.mlp_params(m, gated)


def expert_layer_params(m: ModelShape, gated: bool = True) -> int:
    """One layer's routed-expert parameters (0 for a dense family), part of `mlp_params`."""
    return family_of(m.model_type).counts.expert_params(m, gated)


def layer_params(m: ModelShape, gated: bool = True) -> int:
    """One decoder layer: attention, MLP and its two RMSNorm weights."""
    return attention_params(m) + mlp_params(m, gated) + 2 * m.hidden_size


def total_params(m: ModelShape, vocab: int | None = None, gated: bool = True) -> int:
    v = m.vocab_size if vocab is None else vocab
    embed = v * m.hidden_size * (1 if m.tie_embeddings else 2)
    return m.num_layers * layer_params(m, gated) + embed + m.hidden_size


def active_params(m: ModelShape) -> int:
    """Parameters one token goes through: `total_params` less, in every layer, the
    routed experts it is not sent to ((E - k) / E of them; all of them count for a
    dense model)."""
    if not m.is_moe:
        return total_params(m)
    idle = expert_layer_params(m) * (m.num_experts - m.moe_top_k) // m.num_experts
    return total_params(m) - m.num_layers * idle


def matmul_params_per_token(m: ModelShape) -> int:
    """Weights one token multiplies through: all layer matmuls and the LM head."""
    a, g, d, h = m.num_heads, m.num_kv_heads, m.head_dim, m.hidden_size
    mlp = family_of(m.model_type).counts.mlp_active_matmul_params(m)
    per_layer = h * d * (a + 2 * g) + a * d * h + mlp
    return m.num_layers * per_layer + m.vocab_size * h


def layer_activation_bytes_per_token(
    m: ModelShape,
    tp: int,
    *,
    sequence_parallel: bool,
    recompute: RecomputeMode,
    seq_len: int,
    assume: Assumptions,
) -> float:
    """Bytes one token leaves saved for backward in one decoder layer, per TP rank.

    Korthikanti et al.'s inventory, 16-bit activations, 1-byte dropout masks:
    replicated over TP unless sequence parallel (norm inputs, the inputs of the QKV
    and first MLP matmuls: 2h each; dropout masks: h each), and split over TP (q, k,
    v; q/k-norm inputs; attention output = o_proj input; the MLP's gate/up output and
    down-proj input). Without flash attention the softmax output (2 a s, and with
    dropout its mask and output: 5 a s) is kept unless selective recompute drops it;
    flash attention keeps a fp32 log-sum-exp per head instead. Full recompute keeps
    only each layer's input (2h).
    """
    a, g, d, h = m.num_heads, m.num_kv_heads, m.head_dim, m.hidden_size
    sp_div = tp if sequence_parallel else 1
    if recompute == "full":
        return 2 * h / sp_div
    replicated = 8 * h + (2 * h if assume.dropout else 0)
    split = 2 * (a + 2 * g) * d + 2 * a * d  # q, k, v and the attention output
    if m.qk_norm:
        split += 2 * (a + g) * d
    split += family_of(m.model_type).counts.mlp_activation_bytes(m, assume.gated_mlp)
    if assume.flash_attention:
        split += 0 if recompute == "selective" else 4 * a
    elif recompute != "selective":
        split += a * seq_len * (5 if assume.dropout else 2)
    return replicated / sp_div + split / tp


def embedding_activation_bytes_per_token(
    m: ModelShape, tp: int, sequence_parallel: bool, assume: Assumptions
) -> float:
    """Token ids (int64, replicated) and the embedding dropout mask (1 B x h)."""
    mask = m.hidden_size / (tp if sequence_parallel else 1) if assume.dropout else 0.0
    return 8 + mask


#: Peak fp32 scratch of the torch entropy/log-prob reference per element of one chunk
#: [chunk_rows, V_p] (`algo.entropy`: its backward holds the shifted logits, the
#: probabilities and the gradient, three fp32 tensors; its forward the shifted logits,
#: their exponential and a mask), as measured by tests/actor/test_logits_memory.py.
TORCH_SCRATCH_BYTES_PER_ELEMENT = 12


def logits_bytes(
    m: ModelShape,
    tokens: int,
    tp: int,
    *,
    path: LogitsPath,
    assume: Assumptions,
    element_bytes: int = 2,
) -> float:
    """What the log-prob/entropy computation of one micro-batch holds at its peak, from
    the final hidden states to the loss and back (bytes, one TP rank).

    n = `tokens` whose logits are taken: the policy runs the output layer on the valid
    response tokens only (`MegatronPolicy._token_stats`), at most the micro-batch's
    tokens, which is what the planner passes (so the figure is an upper bound; a
    micro-batch with prompts takes fewer rows). V_p = padded vocab / TP columns per
    rank, e = `element_bytes` of the parameter dtype (bf16: 2), H = hidden size.

    * unfused (plain torch ops, not this repository's code; the yardstick): bf16
      logits 2, their fp32 copy 4, the saved log-softmax 4 and probabilities 4, the
      fp32 gradient 4: 18 n V_p.
    * chunked (this repo's torch reference): the [n, V_p] logits e n V_p, whose memory
      also takes their gradient (`inplace_backward`), plus the larger of the
      reference's fp32 scratch over one [min(n, torch_chunk_rows), V_p] chunk
      (`TORCH_SCRATCH_BYTES_PER_ELEMENT` per element) and the output weight's gradient
      e H V_p (made by the matmul's backward while the logits' gradient is held).
    * fused (Triton, vocab-parallel): e n V_p (logits, gradient in place, per-token
      statistics only) + e H V_p (the output weight's gradient).
    * fused_lm_head (matmul + entropy in chunks): no logits tensor; a bf16 and a fp32
      [lm_head_chunk_rows, V_p] chunk.

    Not counted here (hidden-sized, in the activations): the [n, H] hidden rows taken
    and their gradient. Before issue 21 item 6 the unfused path also held the logits
    of every position, megatron's [s, b, V] -> [b, s, V] copy, the copy of the
    response rows, their gradient, the zero-filled [b s, V] gradient of that copy and
    megatron's contiguous copy of it: about two all-position logits buffers at once
    plus the response rows' copies.
    """
    vp = m.padded_vocab_size(tp) / tp
    weight_grad = element_bytes * m.hidden_size * vp
    if path == "unfused":
        return 18 * tokens * vp
    if path == "chunked":
        scratch = TORCH_SCRATCH_BYTES_PER_ELEMENT * min(tokens, assume.torch_chunk_rows) * vp
        return element_bytes * tokens * vp + max(scratch, weight_grad)
    if path == "fused":
        return element_bytes * tokens * vp + weight_grad
    if path == "fused_lm_head":
        return 6 * min(tokens, assume.lm_head_chunk_rows) * vp
    raise ValueError(f"unknown logits path {path!r}")


def stage_params(m: ModelShape, tp: int, pp: int, stage: Literal["first", "last"]) -> int:
    """Parameters one TP rank of a pipeline stage holds outside the routed experts
    (first: + embedding; last: + final norm and output layer; PP=1: all). Vocab padded
    as megatron does. A dense model has no routed experts: this is all of it."""
    vocab = m.padded_vocab_size(tp)
    embed = vocab * m.hidden_size
    layers = (m.num_layers // pp) * (layer_params(m) - expert_layer_params(m))
    if pp == 1:
        n = layers + embed + (0 if m.tie_embeddings else embed) + m.hidden_size
    elif stage == "first":
        n = layers + embed
    else:  # the last stage holds an output layer even when tied (a copy kept in sync)
        n = layers + embed + m.hidden_size
    return math.ceil(n / tp)


def stage_expert_params(m: ModelShape, tp: int, pp: int, ep: int) -> int:
    """Routed-expert parameters on one GPU of a pipeline stage: the stage's layers'
    experts split over EP (E / EP experts each) and each expert over expert-TP (= TP,
    megatron's default). 0 for a dense model."""
    return math.ceil((m.num_layers // pp) * expert_layer_params(m) / (tp * ep))


def cp_tokens_per_gpu(layout: TrainLayout) -> int:
    """Tokens of one micro-batch on one GPU: CP splits each micro-batch's sequence
    dimension over `cp` ranks (megatron cuts it into 2 x cp chunks, rank r taking
    chunks r and 2cp - 1 - r so that causal attention work is balanced)."""
    return math.ceil(layout.micro_batch_tokens / layout.cp)


def cp_kv_bytes_per_token(m: ModelShape, tp: int) -> float:
    """bf16 K and V of one token in one layer on one TP rank: 2 x 2 B x (g / TP) x d."""
    return 4 * m.num_kv_heads * m.head_dim / tp


def cp_ring_buffer_bytes(m: ModelShape, layout: TrainLayout) -> float:
    """What ring attention holds beyond the layer inventory (CP > 1): one K/V chunk
    of another rank arriving while the local one is used (forward), and in backward
    that chunk plus the dK/dV chunk travelling the other way: two chunks of t / CP
    tokens of one layer's K and V. 0 at CP 1."""
    if layout.cp <= 1:
        return 0.0
    return 2 * cp_tokens_per_gpu(layout) * cp_kv_bytes_per_token(m, layout.tp)


def kv_bytes_per_token(m: ModelShape, tp: int, kv_dtype_bytes: int = 2) -> float:
    """K and V of every layer for one token on one TP rank. KV heads split over TP
    (replicated when TP exceeds the number of KV heads, as SGLang does)."""
    heads = math.ceil(m.num_kv_heads / tp)
    return 2 * m.num_layers * heads * m.head_dim * kv_dtype_bytes


def rollout_weight_bytes(m: ModelShape, tp: int, fp8: bool) -> float:
    """Weights on one rollout GPU: layer matmuls 2 B (1 B + scales with FP8),
    embedding / LM head / norms in bf16."""
    matmuls = m.num_layers * (
        m.hidden_size * m.head_dim * (m.num_heads + 2 * m.num_kv_heads)
        + m.num_heads * m.head_dim * m.hidden_size
        + family_of(m.model_type).counts.mlp_matmul_params(m)
    )
    rest = total_params(m) - matmuls
    return (matmuls * (1 if fp8 else 2) + rest * 2) / tp
