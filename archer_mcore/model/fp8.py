"""Which layer spec and FP8 settings a config gets, given what the machine has.

`choose_precision` is a pure function from the config's `model.fp8`,
`model.transformer_impl` and `parallel.use_distributed_optimizer`, the installed
Transformer Engine version and the GPU's compute capability to a `PrecisionChoices`:
the megatron-core layer spec, the `TransformerConfig` FP8 keyword arguments, whether
parameters are all-gathered in FP8 by the distributed optimizer, and, when something
asked for is not available, one warning saying what was used instead (emit it with
`warn_once`). `detect_environment` reads the TE version and device capability.

Rules (megatron-core 0.16 `fp8_utils.get_fp8_recipe`, TE's recipe requirements):

* FP8 needs Transformer Engine layers (the TE spec) and an FP8 tensor-core GPU
  (compute capability >= 8.9: Ada, Hopper, Blackwell). Without TE: megatron-core's
  local layers in BF16. Without an FP8 GPU: TE layers in BF16.
* delayed scaling: any TE; format "hybrid" (E4M3 forward, E5M2 gradients), amax
  history 1024 with the max over the window.
* per-tensor current scaling ("tensorwise"): TE >= 2.2.0.dev0; format "hybrid".
* blockwise (1x128 activations, 128x128 weights): TE >= 2.3.0.dev0 on Hopper
  (capability 9.x); E4M3 only.
  An FP8 recipe the TE/GPU cannot run falls back to delayed scaling, with a warning.
* FP8 parameter all-gather (`fp8_param_gather` in megatron's DDP config,
  `fp8_param` in TransformerConfig) keeps the bf16 weight copies in FP8 and halves the
  distributed optimizer's all-gather; megatron allows it only with the distributed
  optimizer, so it is on exactly when FP8 is active and the distributed optimizer is.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from packaging.version import InvalidVersion, Version

logger = logging.getLogger(__name__)

Fp8Setting = Literal["none", "delayed", "tensorwise", "blockwise"]
SpecName = Literal["local", "transformer_engine"]

#: megatron-core functions that build each spec (megatron.core.models.gpt.gpt_layer_specs).
SPEC_FUNCTIONS: dict[str, str] = {
    "local": "get_gpt_layer_local_spec",
    "transformer_engine": "get_gpt_layer_with_transformer_engine_spec",
}
MIN_FP8_CAPABILITY = (8, 9)
MIN_TE_FOR_RECIPE: dict[str, str] = {
    "delayed": "0",
    "tensorwise": "2.2.0.dev0",
    "blockwise": "2.3.0.dev0",
}
DELAYED_AMAX_HISTORY_LEN = 1024


@dataclass(frozen=True, kw_only=True)
class PrecisionChoices:
    """What the model builder should do. `fp8_format` / `fp8_recipe` are None in BF16."""

    spec: SpecName
    fp8_format: Literal["hybrid", "e4m3"] | None = None
    fp8_recipe: Literal["delayed", "tensorwise", "blockwise"] | None = None
    fp8_param_gather: bool = False
    warning: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def fp8_enabled(self) -> bool:
        return self.fp8_recipe is not None

    @property
    def spec_function(self) -> str:
        return SPEC_FUNCTIONS[self.spec]

    def transformer_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for megatron's `TransformerConfig` (empty in BF16)."""
        if not self.fp8_enabled:
            return {}
        kw: dict[str, Any] = {
            "fp8": self.fp8_format,
            "fp8_recipe": self.fp8_recipe,
            "fp8_param": self.fp8_param_gather,
        }
        if self.fp8_recipe == "delayed":
            kw.update(
                fp8_margin=0,
                fp8_amax_history_len=DELAYED_AMAX_HISTORY_LEN,
                fp8_amax_compute_algo="max",
            )
        return kw

    def ddp_config_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for megatron's `DistributedDataParallelConfig`."""
        return {"fp8_param_gather": self.fp8_param_gather}

    def build_layer_spec(self, qk_layernorm: bool, num_experts: int | None = None) -> Any:
        """The megatron-core `ModuleSpec` of one decoder layer (RMSNorm, SwiGLU).

        The TE spec takes its norm type from `TransformerConfig.normalization`; the
        local spec is told RMSNorm here. `num_experts`: an MoE layer (megatron's
        `MoELayer`) with that many routed experts, each its own SwiGLU MLP
        (`SequentialMLP`; grouped GEMM is not used), else the dense MLP."""
        specs = importlib.import_module("megatron.core.models.gpt.gpt_layer_specs")
        fn = getattr(specs, self.spec_function)
        moe: dict[str, Any] = {}
        if num_experts:
            moe = {"num_experts": num_experts, "moe_grouped_gemm": False}
        if self.spec == "local":
            return fn(qk_layernorm=qk_layernorm, normalization="RMSNorm", **moe)
        return fn(qk_layernorm=qk_layernorm, **moe)


def _version(text: str) -> Version:
    try:
        return Version(text)
    except InvalidVersion:  # e.g. "2.3.0+git1234": keep the release part
        return Version(text.split("+")[0].split("-")[0])


def choose_precision(
    fp8: Fp8Setting,
    transformer_impl: SpecName,
    use_distributed_optimizer: bool,
    te_version: str | None,
    device_capability: tuple[int, int] | None,
) -> PrecisionChoices:
    """Decide spec, FP8 recipe and FP8 parameter gather (see the module docstring).

    te_version: the installed Transformer Engine's version, None when it is missing.
    device_capability: (major, minor) of the GPU, None without a GPU.
    Raises ValueError for `model.fp8` with `model.transformer_impl: local`: FP8 runs
    only in TE's layers, so the config contradicts itself.
    """
    if fp8 not in ("none", *MIN_TE_FOR_RECIPE):
        raise ValueError(
            f"model.fp8 must be one of none, delayed, tensorwise, blockwise; got {fp8!r}"
        )
    if transformer_impl not in SPEC_FUNCTIONS:
        raise ValueError(
            f"model.transformer_impl must be local or transformer_engine; got {transformer_impl!r}"
        )
    if fp8 != "none" and transformer_impl == "local":
        raise ValueError(
            f"model.fp8 = {fp8!r} needs model.transformer_impl = transformer_engine "
            "(FP8 runs only in Transformer Engine layers)"
        )
    if transformer_impl == "local":
        return PrecisionChoices(spec="local")
    if te_version is None:
        what = f"FP8 ({fp8}) and " if fp8 != "none" else ""
        return PrecisionChoices(
            spec="local",
            warning=(
                f"Transformer Engine is not installed: model.transformer_impl = "
                f"transformer_engine falls back to megatron-core's local layers; {what}"
                "training runs in BF16."
            ),
        )
    if fp8 == "none":
        return PrecisionChoices(spec="transformer_engine")
    if device_capability is None or tuple(device_capability) < MIN_FP8_CAPABILITY:
        where = (
            "no GPU"
            if device_capability is None
            else (f"compute capability {device_capability[0]}.{device_capability[1]}")
        )
        return PrecisionChoices(
            spec="transformer_engine",
            warning=(
                f"model.fp8 = {fp8!r} needs an FP8 GPU (compute capability >= 8.9); found "
                f"{where}: Transformer Engine layers run in BF16."
            ),
        )
    te = _version(te_version)
    recipe: str = fp8
    warning = None
    reasons = []
    if te < _version(MIN_TE_FOR_RECIPE[fp8]):
        reasons.append(f"Transformer Engine >= {MIN_TE_FOR_RECIPE[fp8]} (found {te_version})")
    if fp8 == "blockwise" and device_capability[0] != 9:
        reasons.append(
            f"a Hopper GPU (compute capability 9.x, found {device_capability[0]}."
            f"{device_capability[1]})"
        )
    if reasons:
        recipe = "delayed"
        warning = (
            f"model.fp8 = {fp8!r} needs {' and '.join(reasons)}: using delayed scaling instead."
        )
    return PrecisionChoices(
        spec="transformer_engine",
        fp8_format="e4m3" if recipe == "blockwise" else "hybrid",
        fp8_recipe=recipe,  # type: ignore[arg-type]
        fp8_param_gather=use_distributed_optimizer,
        warning=warning,
        notes=()
        if use_distributed_optimizer
        else ("FP8 parameter all-gather is off: it needs parallel.use_distributed_optimizer",),
    )


def detect_environment() -> tuple[str | None, tuple[int, int] | None]:
    """(Transformer Engine version or None, CUDA compute capability or None)."""
    te_version: str | None
    try:
        te = importlib.import_module("transformer_engine")
        importlib.import_module("transformer_engine.pytorch")
        te_version = str(getattr(te, "__version__", "0"))
    except Exception:  # ImportError, or TE's own errors when its CUDA libraries are missing
        te_version = None
    capability = None
    try:
        import torch

        if torch.cuda.is_available():
            capability = tuple(torch.cuda.get_device_capability())  # type: ignore[assignment]
    except Exception:
        capability = None
    return te_version, capability


def choices_for_config(cfg: Any) -> PrecisionChoices:
    """`choose_precision` for an `archer_mcore.config.Config` on this machine."""
    te_version, capability = detect_environment()
    return choose_precision(
        cfg.model.fp8,
        cfg.model.transformer_impl,
        cfg.parallel.use_distributed_optimizer,
        te_version,
        capability,
    )


_WARNED: set[str] = set()


def warn_once(choices: PrecisionChoices, log: logging.Logger = logger) -> bool:
    """Log the choices' fallback warning once per process; True if it was logged now."""
    if choices.warning is None or choices.warning in _WARNED:
        return False
    _WARNED.add(choices.warning)
    log.warning(choices.warning)
    return True


# ----------------------------------------------------------- FP8 parameters (TE tensors)
# With FP8 and the distributed optimizer (`fp8_param_gather`), megatron keeps the linear
# weights as Transformer Engine quantized tensors. Read in TE 2.x
# `transformer_engine/pytorch/tensor/quantized_tensor.py` (NVIDIA/TransformerEngine at
# c48b9ac): `QuantizedTensor` is a wrapper subclass of torch.Tensor (no storage of its
# own: the FP8 bytes and scales are attributes) whose nominal dtype is the high-precision
# one; `dequantize(*, dtype=None)` returns a plain tensor, `quantize_(tensor)` re-quantizes
# in place (with the tensor's own quantizer: scaling recipe, amax), other ops run on a
# dequantized copy and views raise. Float8Tensor (per-tensor scaling), Float8BlockwiseQTensor
# and MXFP8Tensor all derive from it; TE 1.x had Float8Tensor alone, with `from_float8`
# (megatron-core 0.16.1 `fp8_utils.is_float8tensor` / `dequantize_fp8_tensor` key on the
# same types). A collective on such a tensor sends no FP8 data (there is no storage), so
# the HF export dequantizes first and the HF import quantizes through `quantize_`.

_quantized_types: tuple[type, ...] | None = None


def te_quantized_types() -> tuple[type, ...]:
    """The classes of TE's quantized parameters in the installed TE: QuantizedTensor
    (TE >= 2.0) or Float8Tensor (TE 1.x); () without TE. Cached."""
    global _quantized_types
    if _quantized_types is None:
        found: tuple[type, ...] = ()
        for module, name in (("transformer_engine.pytorch.tensor", "QuantizedTensor"),
                             ("transformer_engine.pytorch.float8_tensor", "Float8Tensor")):  # fmt: skip
            try:
                found = (getattr(importlib.import_module(module), name),)
                break
            except (ImportError, AttributeError):
                continue
        _quantized_types = found
    return _quantized_types


def is_quantized_param(t: Any) -> bool:
    """Whether `t` is a TE quantized (FP8) tensor."""
    types = te_quantized_types()
    return bool(types) and isinstance(t, types)


def dequantized(t: Any, dtype: Any) -> Any:
    """A TE quantized tensor as a plain tensor of `dtype` (TE 2.x `dequantize(dtype=)`,
    TE 1.x `from_float8(dtype)`); any other tensor as is (its dtype unchanged)."""
    if not is_quantized_param(t):
        return t
    if hasattr(t, "dequantize"):
        return t.dequantize(dtype=dtype)
    return t.from_float8(dtype)


def load_param_(param: Any, value: Any) -> None:
    """Copy `value` into a model parameter: a TE quantized one is re-quantized in place by
    TE (`quantize_`, its own quantizer and scales; TE 1.x: `copy_`, which TE casts), any
    other gets `.data.copy_` in its own dtype."""
    if is_quantized_param(param):
        src = value.to(device=param.device, dtype=param.dtype)
        if hasattr(param, "quantize_"):
            param.quantize_(src)
        else:
            param.copy_(src)
        return
    param.data.copy_(value.to(param.dtype))
