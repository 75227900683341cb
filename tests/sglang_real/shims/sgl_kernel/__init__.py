"""Import placeholder for `sgl_kernel` in the CPU-only real-SGLang tests.

SGLang 0.5.23's CPU path imports names from `sgl_kernel` at module load (e.g.
`sglang/srt/mem_cache/memory_pool.py`, `sglang/srt/model_executor/cpu_graph_runner.py`,
speculative decoding modules), but no wheel of sgl-kernel on PyPI has CPU ops. Every
attribute of this package, and of any `sgl_kernel.<sub>` module, resolves to a
placeholder. Imports succeed; a call appends one line to the file named by
ARCHER_SGL_KERNEL_CALLS (the test fixture fails the test if that file is not empty)
and raises NotImplementedError.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import types
from typing import Any

_LOG = os.environ.get("ARCHER_SGL_KERNEL_CALLS")


class _Placeholder:
    """Stands for any sgl_kernel object: attribute access gives another placeholder
    (so `scalar_types.float8_e4m3fn` imports), calling it is recorded and fails."""

    def __init__(self, qualname: str) -> None:
        self._qualname = qualname

    def __getattr__(self, name: str) -> _Placeholder:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{self._qualname}.{name}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if _LOG:
            with open(_LOG, "a") as f:
                f.write(f"{self._qualname} called (pid {os.getpid()})\n")
        raise NotImplementedError(f"{self._qualname}: sgl_kernel has no CPU build (test shim)")

    def __repr__(self) -> str:
        return f"<sgl_kernel placeholder {self._qualname}>"


def _module_getattr(modname: str):
    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _Placeholder(f"{modname}.{name}")

    return __getattr__


class _SubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes every `sgl_kernel.x.y` importable as a placeholder module."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname.startswith("sgl_kernel."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        mod = types.ModuleType(spec.name)
        mod.__path__ = []  # type: ignore[attr-defined]
        mod.__getattr__ = _module_getattr(spec.name)  # type: ignore[method-assign]
        return mod

    def exec_module(self, module: types.ModuleType) -> None:
        return None


__getattr__ = _module_getattr("sgl_kernel")
__version__ = "0.0.0+archer-cpu-placeholder"
sys.meta_path.insert(0, _SubmoduleFinder())
