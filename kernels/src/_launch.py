"""Where a Triton kernel can run, and with which tile sizes.

`triton.jit` decides at decoration time, from TRITON_INTERPRET, whether a kernel (and
triton.language's own helpers such as `tl.max`) is compiled or interpreted, so the
variable must be set before `triton` is first imported. CUDA tensors need compiled
kernels; CPU tensors need interpreted ones (TRITON_INTERPRET=1), which is how CI tests
the kernels.
"""

from __future__ import annotations

from typing import Any

import torch
from triton.runtime.interpreter import InterpretedFunction


def can_launch(kernel: Any, device: torch.device) -> bool:
    """True if `kernel` (a @triton.jit object) can run on tensors on `device`."""
    interpreted = isinstance(kernel, InterpretedFunction)
    return (device.type == "cuda" and not interpreted) or (device.type == "cpu" and interpreted)


def require_launchable(kernel: Any, device: torch.device) -> None:
    """Raise a clear error when `kernel` cannot run on `device`."""
    if can_launch(kernel, device):
        return
    if device.type == "cpu":
        raise RuntimeError(
            "Triton kernels on CPU tensors need the Triton interpreter: set TRITON_INTERPRET=1 "
            "before triton is first imported (or use mode='torch')"
        )
    raise RuntimeError(
        f"Triton kernels cannot run on {device} in this process (TRITON_INTERPRET is set?)"
    )


def tile_meta(device: torch.device, gpu: dict[str, Any], cpu: dict[str, Any]) -> dict[str, Any]:
    """Launch kwargs: GPU tile sizes / warps on CUDA; small tiles under the interpreter."""
    return dict(gpu) if device.type == "cuda" else dict(cpu)
