"""Build a megatron-core GPTModel for a Qwen2/Qwen3 `ModelShape`.

Layer spec: megatron's local spec by default; the Transformer Engine spec when TE is
importable and `ModelOptions.transformer_impl == "transformer_engine"` (required for
FP8). `choose_layer_spec` holds the selection logic as a pure function so that it can
be tested where TE is not installed.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from archer_mcore.model.hf_config import ModelShape

TransformerImpl = Literal["local", "transformer_engine"]
FP8_RECIPES = ("delayed", "tensorwise", "mxfp8", "blockwise")


@dataclass(frozen=True)
class ModelOptions:
    """How to instantiate the model (not what the model is).

    params_dtype: parameter dtype (bf16 on GPU, fp32 on CPU by default).
    recompute: None, "full" (every layer, uniform) or "selective" (core attention).
    fp8: None, "e4m3" or "hybrid"; needs the TE spec. fp8_recipe: None = pick by GPU.
    """

    transformer_impl: TransformerImpl = "local"
    params_dtype: torch.dtype | None = None
    recompute: Literal["full", "selective"] | None = None
    fp8: Literal["e4m3", "hybrid"] | None = None
    fp8_recipe: str | None = None
    make_vocab_size_divisible_by: int = 128
    seq_length: int | None = None


@dataclass(frozen=True)
class SpecChoice:
    """Which layer spec, and with which FP8 recipe (None = no FP8)."""

    spec: Literal["local", "transformer_engine"]
    fp8: str | None
    fp8_recipe: str | None


def te_available() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def choose_layer_spec(
    opts: ModelOptions, te_importable: bool, gpu_capability: tuple[int, int] | None
) -> SpecChoice:
    """Pure selection logic.

    - TE requested and importable -> TE spec; requested but missing -> local spec with a
      warning (bf16 training still works), unless FP8 was asked for: that is an error.
    - FP8 recipe: the explicit one if given; else "mxfp8" on Blackwell (sm 10.x, where
      TE's MXFP8 is native), "delayed" on Hopper/Ada, and an error on older GPUs or CPU.
    """
    if opts.fp8 is not None and opts.transformer_impl != "transformer_engine":
        raise ValueError("fp8 needs transformer_impl='transformer_engine'")
    if opts.transformer_impl == "local":
        return SpecChoice("local", None, None)
    if opts.transformer_impl != "transformer_engine":
        raise ValueError(
            f"transformer_impl {opts.transformer_impl!r}: use 'local' or 'transformer_engine'"
        )
    if not te_importable:
        if opts.fp8 is not None:
            raise RuntimeError("fp8 was requested but transformer_engine is not importable")
        warnings.warn(
            "transformer_impl='transformer_engine' but transformer_engine is not importable; "
            "using the local spec",
            stacklevel=2,
        )
        return SpecChoice("local", None, None)
    if opts.fp8 is None:
        return SpecChoice("transformer_engine", None, None)
    if opts.fp8_recipe is not None:
        if opts.fp8_recipe not in FP8_RECIPES:
            raise ValueError(f"fp8_recipe {opts.fp8_recipe!r}: choose one of {FP8_RECIPES}")
        return SpecChoice("transformer_engine", opts.fp8, opts.fp8_recipe)
    if gpu_capability is None or gpu_capability < (8, 9):
        raise RuntimeError(f"fp8 needs a GPU with compute capability >= 8.9, got {gpu_capability}")
    recipe = "mxfp8" if gpu_capability[0] >= 10 else "delayed"
    return SpecChoice("transformer_engine", opts.fp8, recipe)


def _gpu_capability() -> tuple[int, int] | None:
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def transformer_config(shape: ModelShape, opts: ModelOptions, choice: SpecChoice, pp: int = 1):
    """megatron TransformerConfig for the shape; TP/PP sizes come from parallel_state."""
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    dtype = opts.params_dtype or (torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if shape.num_kv_heads % tp != 0:
        raise ValueError(f"num_key_value_heads {shape.num_kv_heads} is not divisible by tp={tp}")
    if shape.num_layers % pp != 0:
        raise ValueError(f"num_hidden_layers {shape.num_layers} is not divisible by pp={pp}")
    on_gpu = torch.cuda.is_available()
    kw: dict = {}
    if opts.recompute == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif opts.recompute == "selective":
        kw.update(recompute_granularity="selective")
    elif opts.recompute is not None:
        raise ValueError(f"recompute {opts.recompute!r}: use None, 'full' or 'selective'")
    if choice.fp8 is not None:
        kw.update(fp8=choice.fp8, fp8_recipe=choice.fp8_recipe)
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_kv_heads,
        kv_channels=shape.head_dim,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        normalization="RMSNorm",
        layernorm_epsilon=shape.rms_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=shape.qkv_bias,
        qk_layernorm=shape.qk_norm,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=shape.initializer_range,
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        deallocate_pipeline_outputs=False,
        variable_seq_lengths=True,  # micro-batches differ in length (token budget)
        moe_token_dispatcher_type="alltoall",  # the default one rejects variable lengths
        **kw,
    )


def layer_spec(shape: ModelShape, choice: SpecChoice):
    from megatron.core.models.gpt import gpt_layer_specs as specs

    if choice.spec == "transformer_engine":
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=shape.qk_norm)
    return specs.get_gpt_layer_local_spec(qk_layernorm=shape.qk_norm, normalization="RMSNorm")


def rope_arguments(config, shape: ModelShape) -> dict:
    """GPTModel's position arguments for the shape, plain RoPE or YaRN.

    For YaRN, megatron-core 0.16.1's GPTModel reads ``yarn_*`` attributes off the
    TransformerConfig with getattr (they are fields of its MLA config only), so they
    are set on `config` here; see `archer_mcore.model.convert.mcore_rope`. Without CUDA
    the model is built with plain RoPE and `install_cpu_yarn` swaps the embedding in
    afterwards (YarnRotaryEmbedding.__init__ enters ``torch.device(cuda index)`` unless
    use_cpu_initialization, which would also change how the weights are initialised)."""
    from archer_mcore.model.convert import mcore_rope

    rope = mcore_rope(shape)
    for key, value in rope.config_attrs.items():
        setattr(config, key, value)
    if rope.position_embedding_type == "rope":
        return {"position_embedding_type": "rope", "rotary_base": int(rope.rotary_base)}
    kind = "yarn" if torch.cuda.is_available() else "rope"
    return {"position_embedding_type": kind, "rotary_base": rope.rotary_base}


def install_cpu_yarn(model, config, shape: ModelShape) -> None:
    """On CPU, replace the plain rotary embedding of a YaRN model with megatron's
    YarnRotaryEmbedding (built with CPU initialisation) and switch GPTModel's forward
    to its "yarn" branch. The embedding holds no parameters or persistent buffers, so
    state dicts are unchanged. No-op with CUDA or without YaRN."""
    if (
        shape.rope_scaling is None
        or torch.cuda.is_available()
        or not hasattr(model, "rotary_pos_emb")
    ):
        return
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import (
        YarnRotaryEmbedding,
    )

    model.rotary_pos_emb = YarnRotaryEmbedding(
        kv_channels=config.kv_channels,
        rotary_percent=1.0,
        rotary_interleaved=config.rotary_interleaved,
        rotary_base=shape.rope_theta,
        scaling_factor=config.yarn_rotary_scaling_factor,
        original_max_position_embeddings=config.yarn_original_max_position_embeddings,
        beta_fast=config.yarn_beta_fast,
        beta_slow=config.yarn_beta_slow,
        mscale=config.yarn_mscale,
        mscale_all_dim=config.yarn_mscale_all_dim,
        correction_range_round_to_int=config.yarn_correction_range_round_to_int,
        use_cpu_initialization=True,
    )
    model.position_embedding_type = "yarn"


def build_gpt_model(shape: ModelShape, opts: ModelOptions | None = None):
    """One GPTModel chunk for this process's pipeline stage (model-parallel state must be
    initialised). Returns (model, TransformerConfig, SpecChoice)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    opts = opts or ModelOptions()
    choice = choose_layer_spec(opts, te_available(), _gpu_capability())
    config = transformer_config(shape, opts, choice)
    tp = parallel_state.get_tensor_model_parallel_world_size()
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(shape, choice),
        vocab_size=shape.padded_vocab_size(tp, opts.make_vocab_size_divisible_by),
        max_sequence_length=opts.seq_length or shape.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=shape.tie_embeddings,
        rotary_percent=1.0,
        **rope_arguments(config, shape),
    )
    install_cpu_yarn(model, config, shape)
    if torch.cuda.is_available():
        model = model.cuda(torch.cuda.current_device())
    return model, config, choice
