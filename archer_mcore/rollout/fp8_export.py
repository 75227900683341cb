"""FP8 rollout weights: quantise HF-named weights to the checkpoint format SGLang's
`fp8` loader reads, for the initial checkpoint and for every weight sync.

SGLang (`Fp8Config` / `Fp8LinearMethod`, the format of Qwen3-*-FP8 and DeepSeek-V3) reads:

* config.json `quantization_config`: `{"quant_method": "fp8", "activation_scheme":
  "dynamic", "fmt": "e4m3"}`, plus `"weight_block_size": [128, 128]` when block-wise.
* for each linear layer's `<prefix>.weight`: the weight as float8_e4m3fn, and
  - block-wise: `<prefix>.weight_scale_inv`, float32 [ceil(out/128), ceil(in/128)];
  - per-tensor: `<prefix>.weight_scale`, a float32 scalar;
  where the dequantised weight is `weight.float() * scale` (block-wise: the block's
  scale). Activations are quantised on the fly ("dynamic"), so no input scales.
* Embeddings, the LM head, norms and biases stay in bf16.

Scales are amax / 448 (448 = the largest e4m3 value), so each tensor (block) uses the
whole e4m3 range; an all-zero block gets scale 1. Rounding is torch's
round-to-nearest-even cast to float8_e4m3fn, on fp32 values.

Backends: "torch" (the default: plain torch, fast, no extra import) and "modelopt"
(nvidia-modelopt's `FP8QTensor.quantize`, fed fp32 so that it rounds once; its
import takes seconds). Both give the same bytes; the tests check that.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from archer_mcore.model import families
from archer_mcore.model.hf_config import read_hf_config
from archer_mcore.model.hf_io import write_hf_checkpoint
from archer_mcore.rollout.types import NamedTensorBucket

Scheme = Literal["block", "tensor"]
Backend = Literal["torch", "modelopt"]

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)  # 448
DEFAULT_BLOCK = (128, 128)


def is_fp8_linear(name: str) -> bool:
    """Whether SGLang runs this HF weight in FP8: the decoder layers' linear weights, as
    each model family names them (`ModelFamily.fp8_linear`, `model/families/`)."""
    return families.is_fp8_linear(name)


def scale_name(weight_name: str, scheme: Scheme) -> str:
    """`<prefix>.weight` -> `<prefix>.weight_scale_inv` (block) / `.weight_scale` (tensor)."""
    return weight_name + ("_scale_inv" if scheme == "block" else "_scale")


def quantization_config(scheme: Scheme, block: tuple[int, int] = DEFAULT_BLOCK) -> dict[str, Any]:
    """The `quantization_config` entry of config.json for SGLang's fp8 loader."""
    cfg: dict[str, Any] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3"}
    if scheme == "block":
        cfg["weight_block_size"] = list(block)
    return cfg


def _safe_scale(amax: Tensor) -> Tensor:
    return torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))


def quantize_per_tensor(w: Tensor) -> tuple[Tensor, Tensor]:
    """w [out, in] (any float dtype) -> (e4m3 weight [out, in], fp32 scalar scale)."""
    x = w.detach().float()
    scale = _safe_scale(x.abs().amax())
    q = torch.clamp(x / scale, -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q, scale


def _blocks(x: Tensor, block: tuple[int, int]) -> tuple[Tensor, int, int]:
    """Zero-pad x [out, in] to whole blocks; view as [bo, bh, bi, bw]."""
    bh, bw = block
    out, inn = x.shape
    po, pi = -(-out // bh) * bh, -(-inn // bw) * bw
    if (po, pi) != (out, inn):
        x = torch.nn.functional.pad(x, (0, pi - inn, 0, po - out))
    return x.view(po // bh, bh, pi // bw, bw), out, inn


def quantize_blockwise(w: Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[Tensor, Tensor]:
    """w [out, in] -> (e4m3 weight [out, in], fp32 scale_inv [ceil(out/bh), ceil(in/bw)])."""
    if w.dim() != 2:
        raise ValueError(f"block-wise FP8 needs a 2-D weight, got shape {tuple(w.shape)}")
    xb, out, inn = _blocks(w.detach().float(), block)
    scale = _safe_scale(xb.abs().amax(dim=(1, 3)))  # [bo, bi]
    q = torch.clamp(xb / scale[:, None, :, None], -E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    q = q.view(xb.shape[0] * block[0], xb.shape[2] * block[1])[:out, :inn].contiguous()
    return q, scale


def _quantize_modelopt(w: Tensor, scheme: Scheme, block: tuple[int, int]) -> tuple[Tensor, Tensor]:
    from modelopt.torch.quantization.qtensor import FP8QTensor

    x = w.detach().float()
    block_sizes = {-2: block[0], -1: block[1]} if scheme == "block" else None
    qt, scale = FP8QTensor.quantize(x, block_sizes=block_sizes)
    if bool((scale == 0).any()):  # all-zero tensor/blocks: modelopt divides 0 by 0
        return quantize_blockwise(w, block) if scheme == "block" else quantize_per_tensor(w)
    q = qt._quantized_data
    return q.contiguous(), scale.float().reshape(() if scheme == "tensor" else scale.shape)


def quantize_weight(
    w: Tensor, scheme: Scheme, block: tuple[int, int] = DEFAULT_BLOCK, backend: Backend = "torch"
) -> tuple[Tensor, Tensor]:
    if scheme not in ("block", "tensor"):
        raise ValueError(f"FP8 scheme must be 'block' or 'tensor', got {scheme!r}")
    if backend == "modelopt":
        return _quantize_modelopt(w, scheme, block)
    if backend != "torch":
        raise ValueError(f"FP8 backend must be 'torch' or 'modelopt', got {backend!r}")
    return quantize_blockwise(w, block) if scheme == "block" else quantize_per_tensor(w)


def dequantize_weight(q: Tensor, scale: Tensor, block: tuple[int, int] | None) -> Tensor:
    """fp32 weight = q x scale (block-wise: each block's scale). Inverse of the above."""
    x = q.float()
    if block is None or scale.dim() == 0:
        return x * scale.float()
    s = scale.float().repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return x * s[: x.shape[0], : x.shape[1]]


def quantize_named_tensors(
    tensors: Iterable[tuple[str, Tensor]],
    scheme: Scheme = "block",
    block: tuple[int, int] = DEFAULT_BLOCK,
    backend: Backend = "torch",
    dtype: torch.dtype = torch.bfloat16,
) -> Iterator[tuple[str, Tensor]]:
    """HF-named tensors -> SGLang FP8 tensors: each FP8 linear weight becomes the e4m3
    weight followed by its scale; every other tensor is passed on in `dtype`."""
    for name, t in tensors:
        if is_fp8_linear(name):
            q, s = quantize_weight(t, scheme, block, backend)
            yield name, q
            yield scale_name(name, scheme), s
        else:
            yield name, t.detach().to(dtype)


def quantize_buckets(
    buckets: Iterable[NamedTensorBucket],
    scheme: Scheme = "block",
    block: tuple[int, int] = DEFAULT_BLOCK,
    backend: Backend = "torch",
) -> Iterator[NamedTensorBucket]:
    """The weight-sync buckets with their linear weights in FP8 (same bucket order;
    each scale travels in the bucket of its weight)."""
    for bucket in buckets:
        yield list(quantize_named_tensors(bucket, scheme, block, backend))


def fp8_config_json(hf_config: Mapping[str, Any], scheme: Scheme, block: tuple[int, int]) -> dict:
    cfg = dict(hf_config)
    cfg["quantization_config"] = quantization_config(scheme, block)
    return cfg


def export_fp8_checkpoint(
    buckets: Iterable[NamedTensorBucket],
    out_dir: str | Path,
    *,
    base_model_dir: str | Path | None = None,
    hf_config: Mapping[str, Any] | None = None,
    scheme: Scheme = "block",
    block: tuple[int, int] = DEFAULT_BLOCK,
    backend: Backend = "torch",
) -> list[str]:
    """Write an FP8 HF checkpoint SGLang loads (`--quantization fp8` is then implied by
    config.json). Copies the base model's non-weight files; config.json is the base's
    (or `hf_config`) with `quantization_config` added. Returns the tensor names."""
    if base_model_dir is None and hf_config is None:
        raise ValueError("export_fp8_checkpoint needs base_model_dir or hf_config for config.json")
    out_dir = Path(out_dir)
    names = write_hf_checkpoint(
        quantize_buckets(buckets, scheme, block, backend),
        out_dir,
        Path(base_model_dir) if base_model_dir is not None else None,
        replace=True,
    )
    if hf_config is None:
        hf_config = read_hf_config(base_model_dir)  # type: ignore[arg-type]
    tmp = out_dir / "config.json.partial"
    tmp.write_text(json.dumps(fp8_config_json(hf_config, scheme, block), indent=2) + "\n")
    os.replace(tmp, out_dir / "config.json")
    return names
