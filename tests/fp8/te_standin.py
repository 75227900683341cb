"""A CPU stand-in for Transformer Engine's FP8 parameter tensor (TE is not installed
here and needs a GPU).

It carries the interface of TE 2.x `QuantizedTensor` / `Float8Tensor` that the export
and import touch (read in NVIDIA/TransformerEngine
`transformer_engine/pytorch/tensor/quantized_tensor.py`): a wrapper subclass of
torch.Tensor made with `_make_wrapper_subclass` (nominal high-precision dtype, no storage
of its own: the e4m3 bytes and the scale inverse are attributes), `dequantize(*,
dtype=None)`, `quantize_(tensor)` (in place, new per-tensor scale from the amax, as
delayed/current scaling's Float8Tensor), `detach()` sharing the data, and the
`__torch_dispatch__` rules of TE 2.x `transformer_engine/pytorch/tensor/float8_tensor.py`
(read at NVIDIA/TransformerEngine 7515c0e): view, slice, select, split (so chunk),
new_zeros, as_strided and clone return FP8 tensors of the same scale; `copy_` into one
quantizes; any other op (cat, to(other dtype), empty_like, a collective) runs on
dequantized copies, and ops that write into one re-quantize it. So `t.to(t.dtype)` is
the FP8 tensor itself (torch returns self without dispatch). What it does not mimic:
TE's kernels, rowwise/columnwise copies, amax history and the quantizer object. Registered as the quantized type through
`archer_mcore.model.fp8._quantized_types` (where TE's class is found when installed).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch.utils._pytree import tree_map

E4M3_MAX = float(torch.finfo(torch.float8_e4m3fn).max)


class StandInFloat8Tensor(torch.Tensor):
    #: ids of the tensors quantize_ ran on, in order
    quantize_calls: ClassVar[list[int]] = []
    _data: torch.Tensor
    _scale_inv: torch.Tensor

    @staticmethod
    def __new__(cls, data: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype,
                requires_grad: bool = False) -> StandInFloat8Tensor:  # fmt: skip
        t = torch.Tensor._make_wrapper_subclass(cls, data.shape, dtype=dtype, device=data.device,
                                                requires_grad=requires_grad)  # fmt: skip
        t._data = data
        t._scale_inv = scale_inv
        return t

    @staticmethod
    def _cast(hp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amax = hp.detach().float().abs().max()
        scale = E4M3_MAX / amax if amax > 0 else torch.tensor(1.0)
        return (hp.detach().float() * scale).to(torch.float8_e4m3fn), (1.0 / scale).reshape(())

    @classmethod
    def quantize(cls, hp: torch.Tensor) -> StandInFloat8Tensor:
        data, scale_inv = cls._cast(hp)
        return cls(data, scale_inv.float(), hp.dtype)

    def dequantize(self, *, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self._data.float() * self._scale_inv).to(dtype or self.dtype)

    def quantize_(self, tensor: torch.Tensor) -> StandInFloat8Tensor:
        StandInFloat8Tensor.quantize_calls.append(id(self))
        data, scale_inv = self._cast(tensor)
        self._data.copy_(data)
        self._scale_inv.copy_(scale_inv)
        return self

    def detach(self) -> StandInFloat8Tensor:  # type: ignore[override]
        return StandInFloat8Tensor(self._data, self._scale_inv, self.dtype)

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func == torch.ops.aten.detach.default:
            return args[0].detach()
        if func == torch.ops.aten.copy_.default:
            dst, src = args[0], args[1]
            if isinstance(dst, StandInFloat8Tensor):
                dst.quantize_(src.dequantize() if isinstance(src, StandInFloat8Tensor) else src)
            else:
                dst.copy_(src.dequantize() if isinstance(src, StandInFloat8Tensor) else src)
            return dst
        aten = torch.ops.aten
        if func in (aten.view.default, aten.slice.Tensor, aten.select.int, aten.new_zeros.default,
                    aten.as_strided.default):  # fmt: skip
            t = args[0]
            return StandInFloat8Tensor(func(t._data, *args[1:], **kwargs), t._scale_inv, t.dtype)
        if func == aten.split.Tensor:
            t = args[0]
            return [StandInFloat8Tensor(d, t._scale_inv, t.dtype)
                    for d in func(t._data, *args[1:], **kwargs)]  # fmt: skip
        if func == aten.clone.default:
            t = args[0]
            return StandInFloat8Tensor(t._data.clone(), t._scale_inv.clone(), t.dtype)

        def unwrap(a: Any) -> Any:
            return a.dequantize(dtype=a.dtype) if isinstance(a, StandInFloat8Tensor) else a

        new_args, new_kwargs = tree_map(unwrap, args), tree_map(unwrap, kwargs)
        out = func(*new_args, **new_kwargs)
        if func._schema.is_mutable:
            for a, na, sa in zip(args, new_args, func._schema.arguments):
                if (isinstance(a, StandInFloat8Tensor) and sa.alias_info is not None
                        and sa.alias_info.is_write):  # fmt: skip
                    a.quantize_(na)
        return out
