"""Build a megatron-core GPTModel for a `ModelShape` (any registered family,
`model/families/`) from the config's
`model` and `parallel` sections (read directly; no copy of them).

Every choice the builder makes is taken once, by `resolve_build_choices`, a pure
function of those sections and the machine (Transformer Engine version, GPU compute
capability, CUDA or not), so that `archer plan` sizes exactly what gets built:

- precision: `model/fp8.py`'s `choose_precision` (the layer spec, the FP8 recipe and
  FP8 parameter all-gather, with its fallbacks);
- sequence parallelism: `parallel.sequence_parallel` at TP > 1 (an error at TP = 1);
- the multiple micro-batch lengths are padded to: TP under sequence parallelism (the
  sequence is split across TP ranks) times 16 under FP8 (TE's FP8 GEMMs need token
  counts that are multiples of 16);
- the parameter dtype (`model.params_dtype`, auto: bf16 on GPU, fp32 on CPU).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from archer_mcore.config import ModelConfig, ParallelConfig
from archer_mcore.model.families import family_of
from archer_mcore.model.fp8 import PrecisionChoices, choose_precision, detect_environment, warn_once
from archer_mcore.model.hf_config import ModelShape

FP8_TOKEN_MULTIPLE = 16  # TE FP8 GEMMs: the token dimension must be a multiple of 16


@dataclass(frozen=True, kw_only=True)
class BuildChoices:
    """What the builder does for a config on a machine (see the module docstring)."""

    precision: PrecisionChoices
    sequence_parallel: bool
    seq_multiple: int
    params_dtype: torch.dtype


def resolve_build_choices(
    model: ModelConfig,
    parallel: ParallelConfig,
    te_version: str | None,
    device_capability: tuple[int, int] | None,
    cuda: bool,
) -> BuildChoices:
    """Pure: the builder's choices for these sections on a machine described by the TE
    version (None: not installed), the GPU capability (None: no GPU) and `cuda`."""
    tp = parallel.tensor_model_parallel_size
    if parallel.sequence_parallel and tp == 1:
        raise ValueError(
            "parallel.sequence_parallel needs parallel.tensor_model_parallel_size > 1 "
            "(it splits the sequence across tensor-parallel ranks)"
        )
    precision = choose_precision(
        model.fp8,
        model.transformer_impl,
        parallel.use_distributed_optimizer,
        te_version,
        device_capability,
    )
    sp = parallel.sequence_parallel
    multiple = (tp if sp else 1) * (FP8_TOKEN_MULTIPLE if precision.fp8_enabled else 1)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    dtype = dtypes.get(model.params_dtype, torch.bfloat16 if cuda else torch.float32)
    return BuildChoices(
        precision=precision, sequence_parallel=sp, seq_multiple=multiple, params_dtype=dtype
    )


def choices_on_this_machine(model: ModelConfig, parallel: ParallelConfig) -> BuildChoices:
    """`resolve_build_choices` with this machine's TE, GPU and CUDA."""
    te_version, capability = detect_environment()
    return resolve_build_choices(model, parallel, te_version, capability, torch.cuda.is_available())


def transformer_config(
    shape: ModelShape,
    model: ModelConfig,
    choices: BuildChoices,
    *,
    tp: int,
    pp: int,
    parallel: ParallelConfig | None = None,
) -> Any:
    """megatron's TransformerConfig for the shape (TP/PP sizes as given): the fields
    every family shares here, the family's own (`ModelFamily.transformer_config`:
    attention bias and norms, MoE) on top. `parallel` default: TP/PP as given."""
    from megatron.core.transformer import TransformerConfig

    dtype = choices.params_dtype
    if shape.num_kv_heads % tp != 0:
        raise ValueError(f"num_key_value_heads {shape.num_kv_heads} is not divisible by tp={tp}")
    if shape.num_layers % pp != 0:
        raise ValueError(f"num_hidden_layers {shape.num_layers} is not divisible by pp={pp}")
    on_gpu = torch.cuda.is_available()
    kw: dict[str, Any] = {}
    if model.recompute == "full":
        kw.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif model.recompute == "selective":
        kw.update(recompute_granularity="selective")
    elif model.recompute != "none":
        raise ValueError(f"model.recompute {model.recompute!r}: use none, selective or full")
    kw.update(choices.precision.transformer_config_kwargs())
    if parallel is None:
        parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    fields: dict[str, Any] = dict(
        moe_token_dispatcher_type="alltoall",  # the default one rejects variable lengths
    )
    fields.update(family_of(shape.model_type).transformer_config(shape, model, parallel))
    return TransformerConfig(
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_heads,
        num_query_groups=shape.num_kv_heads,
        kv_channels=shape.head_dim,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        sequence_parallel=choices.sequence_parallel,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        normalization="RMSNorm",
        layernorm_epsilon=shape.rms_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
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
        **fields,
        **kw,
    )


def ddp_config(choices: BuildChoices, parallel: ParallelConfig) -> Any:
    """megatron's DistributedDataParallelConfig (FP8 parameter gather from the same
    precision choice as the TransformerConfig)."""
    from megatron.core.distributed import DistributedDataParallelConfig

    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=parallel.use_distributed_optimizer,
        **choices.precision.ddp_config_kwargs(),
    )


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm for megatron's local layer spec under sequence parallelism.

    megatron-core 0.16.1's local spec builds RMSNorm as `WrappedTorchNorm`
    (megatron/core/models/backends.py, `LocalSpecProvider.layer_norm`), which refuses
    `config.sequence_parallel` (megatron/core/transformer/torch_norm.py). This is the
    same computation; its weight is marked `sequence_parallel`, so that megatron's
    `finalize_model_grads` (`_allreduce_non_tensor_model_parallel_grads`) sums its
    gradient over the TP group: under SP each rank normalises only its slice of the
    sequence. Constructor arguments as `WrappedTorchNorm`'s."""

    def __init__(
        self,
        config: Any,
        hidden_size: int,
        eps: float = 1e-5,
        *,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
    ) -> None:
        if config.normalization != "RMSNorm":
            raise ValueError(f"only RMSNorm is handled here, got {config.normalization}")
        super().__init__(normalized_shape=hidden_size, eps=eps)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


@functools.cache
def _packed_local_attention() -> type:
    """megatron's local `DotProductAttention` taking packed (THD) input.

    megatron-core 0.16.1's DotProductAttention (megatron/core/transformer/
    dot_product_attention.py) asserts `packed_seq_params is None`; only TE's attention
    reads `cu_seqlens`. Everything before the core attention (RoPE restarting at each
    `cu_seqlens` boundary in `rope_utils._apply_rotary_pos_emb_thd`, the [t, heads, d]
    squeeze in `Attention.forward`) is shared by both specs. This subclass computes the
    block-diagonal causal attention of the packed row: each segment
    [cu_seqlens[k], cu_seqlens[k + 1]) runs megatron's own causal [s, b=1] attention on
    its own, which is the full-row attention under a block-diagonal causal mask with the
    masked blocks skipped (their softmax weights are exactly zero), so it costs
    sum(len_k^2) like TE's THD kernel, not len(row)^2. CPU tests thus run the same
    packed micro-batches as the GPU. Without packed input it is megatron's class."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class PackedDotProductAttention(DotProductAttention):
        def forward(
            self,
            query,
            key,
            value,
            attention_mask,
            *,
            attn_mask_type=None,
            attention_bias=None,
            packed_seq_params=None,
        ):
            if packed_seq_params is None or packed_seq_params.qkv_format != "thd":
                return super().forward(
                    query,
                    key,
                    value,
                    attention_mask,
                    attn_mask_type=attn_mask_type,
                    attention_bias=attention_bias,
                    packed_seq_params=packed_seq_params,
                )
            # THD: [t, heads, d]; each segment as a [len, 1, heads, d] causal batch
            outs = []
            for start, end in itertools.pairwise(packed_seq_params.cu_seqlens_q.tolist()):
                if end > start:
                    q, k, v = (x[start:end].unsqueeze(1) for x in (query, key, value))
                    outs.append(
                        super().forward(
                            q,
                            k,
                            v,
                            None,
                            attn_mask_type=attn_mask_type,
                            attention_bias=attention_bias,
                        )
                    )
            return torch.cat(outs, dim=0)  # [t, 1, heads * d]; megatron reshapes it

    return PackedDotProductAttention


def _replace_module(spec: Any, old: type, new: type) -> Any:
    """A copy of a megatron ModuleSpec / submodules dataclass tree with `old` -> `new`."""
    import dataclasses

    if spec is old:
        return new
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        changes = {
            f.name: _replace_module(getattr(spec, f.name), old, new)
            for f in dataclasses.fields(spec)
        }
        return dataclasses.replace(spec, **changes)
    return spec


def layer_spec_for(choices: BuildChoices, shape: ModelShape, config: Any) -> Any:
    """The decoder's spec: the family's (`ModelFamily.layer_spec`, built by
    `PrecisionChoices.build_layer_spec`); for the local spec, core
    attention that takes packed sequences (`_packed_local_attention`), and under
    sequence parallelism a whole-block spec whose torch RMSNorms (layers, q/k norms,
    the final norm) are `SequenceParallelRMSNorm`."""
    spec = family_of(shape.model_type).layer_spec(choices.precision, shape)
    if choices.precision.spec != "local":
        return spec
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    spec = _replace_module(spec, DotProductAttention, _packed_local_attention())
    if not choices.sequence_parallel:
        return spec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm
    from megatron.core.transformer.transformer_block import (
        TransformerBlockSubmodules,
        get_num_layers_to_build,
    )

    layer = _replace_module(spec, WrappedTorchNorm, SequenceParallelRMSNorm)
    return TransformerBlockSubmodules(
        layer_specs=[layer] * get_num_layers_to_build(config),
        layer_norm=SequenceParallelRMSNorm,
    )


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


def allow_moe_router_without_te() -> None:
    """megatron-core 0.16.1's router matmul (`moe_utils.RouterGatingLinearFunction`)
    tests ``te_general_gemm is not None``, a name its module imports only with
    Transformer Engine: without TE every MoE forward raises NameError. Define it as
    None there (then the router runs its torch.mm branch); no-op when TE defined it."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def experts_outside_data_parallel_allreduce(gpt: torch.nn.Module) -> int:
    """Mark the routed experts' weights ``allreduce = False`` at every EP, as megatron
    marks them only at EP > 1 (`tensor_parallel/layers.py`: ``not (is_expert and
    expert_parallel)``). Their gradients then always go through the expert
    data-parallel buffers (at EP 1 the expert DP group is the DP group: the same sums)
    and `get_megatron_optimizer` always builds the two-optimizer `ChainedOptimizer`
    (dense, experts), so a checkpoint's optimizer state has the same keys
    (``chained_0.`` / ``chained_1.``) at every EP and reshards between EP 1 and EP 2.
    Returns the number of parameters marked."""
    marked = 0
    for name, param in gpt.named_parameters():
        if ".mlp.experts." in name:
            param.allreduce = False
            marked += 1
    return marked


def build_gpt_model(
    shape: ModelShape,
    model: ModelConfig | None = None,
    parallel: ParallelConfig | None = None,
    *,
    choices: BuildChoices | None = None,
    make_vocab_size_divisible_by: int = 128,
    seq_length: int | None = None,
) -> tuple[Any, Any, BuildChoices]:
    """One GPTModel chunk for this process's pipeline stage (model-parallel state must be
    initialised, with TP/PP as `parallel` says). Returns (model, TransformerConfig,
    BuildChoices); `choices` default: `choices_on_this_machine`."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    model = model or ModelConfig()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    ep = parallel_state.get_expert_model_parallel_world_size()
    if parallel is None:
        parallel = ParallelConfig(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
        )
    said = (
        parallel.tensor_model_parallel_size,
        parallel.pipeline_model_parallel_size,
        parallel.expert_model_parallel_size,
    )
    if said != (tp, pp, ep):
        raise ValueError(
            f"parallel says TP{said[0]} PP{said[1]} EP{said[2]}; megatron's groups are "
            f"TP{tp} PP{pp} EP{ep}"
        )
    if ep > 1 and not shape.is_moe:
        raise ValueError(
            f"parallel.expert_model_parallel_size {ep} needs an MoE model; "
            f"{shape.model_type} has no experts"
        )
    if choices is None:
        choices = choices_on_this_machine(model, parallel)
    warn_once(choices.precision)
    if shape.is_moe:
        allow_moe_router_without_te()
    config = transformer_config(shape, model, choices, tp=tp, pp=pp, parallel=parallel)
    gpt = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec_for(choices, shape, config),
        vocab_size=shape.padded_vocab_size(tp, make_vocab_size_divisible_by),
        max_sequence_length=seq_length or shape.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True,
        share_embeddings_and_output_weights=shape.tie_embeddings,
        rotary_percent=1.0,
        **rope_arguments(config, shape),
    )
    install_cpu_yarn(gpt, config, shape)
    if shape.is_moe:
        experts_outside_data_parallel_allreduce(gpt)
    if torch.cuda.is_available():
        gpt = gpt.cuda(torch.cuda.current_device())
    return gpt, config, choices


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """The last stage's output weight [V_pad / tp, H]: the shared embedding when the
    embeddings are tied, else the output layer's."""
    if getattr(model, "share_embeddings_and_output_weights", False):
        return model.shared_embedding_or_output_weight()
    return model.output_layer.weight


def return_hidden_states(model: torch.nn.Module) -> None:
    """Make a last-stage GPTModel return its final hidden states [b, s, H] (after the
    final norm) where it returned logits: the output layer's forward becomes "hand the
    input over", so no logits are computed (its weight stays a parameter of the model,
    for the caller to use with `output_weight`). Under sequence parallelism the
    hidden states are all-gathered along the sequence (backward: each rank keeps its
    own slice; the caller all-reduces the gradient over TP, which together make the
    reduce-scatter megatron's output layer would do)."""
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    layer = model.output_layer
    sequence_parallel = bool(getattr(layer, "sequence_parallel", False))

    def hand_over(input_, weight=None, runtime_gather_output=None):
        if sequence_parallel:
            input_ = gather_from_sequence_parallel_region(input_, tensor_parallel_output_grad=False)
        return input_, None

    layer.forward = hand_over
