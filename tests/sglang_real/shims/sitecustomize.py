"""Loaded at start-up by every Python process of the real-SGLang tests (this folder is
on their PYTHONPATH): makes `import triton` work on a machine without triton.

SGLang 0.5.23 imports triton at module load in many places (`@triton.jit` kernels that
the CPU path never runs). It ships its own triton mock for Apple machines,
`install_platform_stubs()` in `sglang/_platform_stubs.py`, which returns early unless
sys.platform is "darwin", platform.machine() is "arm64" and torch.backends.mps is
available. Those three checks are made to pass only while it runs and are restored
after; its MPS-only side effects (torch.mps attributes, the `Tensor.to`/`copy_`
non_blocking patch) are undone, so only the triton mock stays. The module file is
loaded on its own, without importing the `sglang` package (whose imports need triton).
"""

from __future__ import annotations

import importlib.util
import os
import sys


def _install_triton_mock() -> None:
    if importlib.util.find_spec("triton") is not None:
        return
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        return
    path = os.path.join(next(iter(spec.submodule_search_locations)), "_platform_stubs.py")
    if not os.path.exists(path):
        return
    import platform

    import torch

    stub_spec = importlib.util.spec_from_file_location("sglang_platform_stubs_archer", path)
    assert stub_spec is not None and stub_spec.loader is not None
    stubs = importlib.util.module_from_spec(stub_spec)
    sys.modules[stub_spec.name] = stubs  # its dataclasses look their module up there
    stub_spec.loader.exec_module(stubs)

    saved_platform, saved_machine = sys.platform, platform.machine
    saved_mps = torch.backends.mps.is_available
    saved_to, saved_copy = torch.Tensor.to, torch.Tensor.copy_
    mps_before = set(dir(torch.mps))
    try:
        sys.platform = "darwin"
        platform.machine = lambda: "arm64"
        torch.backends.mps.is_available = lambda: True
        stubs.install_platform_stubs()
    finally:
        sys.platform = saved_platform
        platform.machine = saved_machine
        torch.backends.mps.is_available = saved_mps
        torch.Tensor.to, torch.Tensor.copy_ = saved_to, saved_copy
        for name in set(dir(torch.mps)) - mps_before:
            delattr(torch.mps, name)


if os.environ.get("SGLANG_USE_CPU_ENGINE") == "1":
    _install_triton_mock()
