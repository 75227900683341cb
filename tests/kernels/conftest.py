"""Run the Triton kernels under the Triton interpreter on CPU tensors.

`triton.jit` (including triton.language's own helpers) picks interpreted or compiled
code when `triton` is imported, from TRITON_INTERPRET. CI has no GPU, so the variable
is set here for the whole process. If some earlier test module already imported triton
in compiled mode (megatron-core imports it), triton and our kernel modules are dropped
from sys.modules so that the next import rebuilds them interpreted.
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "1"


def _interpreted_triton_loaded() -> bool:
    if "triton" not in sys.modules:
        return True  # the first import will read the variable set above
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.max, InterpretedFunction)


if not _interpreted_triton_loaded():
    for name in list(sys.modules):
        if name.startswith("triton._C"):
            continue  # the compiled extension cannot be loaded twice; it does not decide
        if name == "triton" or name.startswith(("triton.", "archer_mcore.kernels")):
            del sys.modules[name]
