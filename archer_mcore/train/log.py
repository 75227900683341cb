"""The trainer's one rank-0 logger for the lines a user (and the tests) read: "step N/M
| ...", "resumed from ...", "received SIGUSR1: ...", the run directory's notes.

`log.info(msg)` writes `msg` and a newline to stdout and flushes, on global rank 0
only; `log.info(msg, stderr=True)` does the same on stderr. Nothing is added to the
message (no level, time or logger name), so the text and the stream are exactly what
the `print(..., flush=True)` it replaces wrote. The stream is looked up at each call,
so a redirected `sys.stdout` (pytest's capture, `contextlib.redirect_stdout`) gets it.

Rank 0 is torch.distributed's rank 0 once the process group exists (as
`parallel/ranks.py` `rank()`), and before that the launcher's: `launch_rank()` reads
torchrun's RANK or srun's SLURM_PROCID (0 when started alone), so a line written
before the process group is made (the run directory's lock, --overwrite) still comes
from one process only.

Diagnostics for developers stay on the `logging` module (`logging.getLogger(__name__)`).
"""

from __future__ import annotations

import os
import sys

import torch.distributed as dist


def launch_rank() -> int:
    """This process's global rank from the launcher's environment (torchrun: RANK,
    srun: SLURM_PROCID); 0 when started alone."""
    for var in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(var)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


def is_rank0() -> bool:
    """Whether this process is global rank 0 (the process group's rank once it exists,
    else the launcher's)."""
    return (dist.get_rank() if dist.is_initialized() else launch_rank()) == 0


class Rank0Log:
    """Writes whole lines on rank 0 and nothing elsewhere (see the module docstring)."""

    def info(self, msg: str, *, stderr: bool = False) -> None:
        """`msg` and a newline on stdout (stderr: on stderr), flushed; rank 0 only."""
        if is_rank0():
            print(msg, file=sys.stderr if stderr else sys.stdout, flush=True)


log = Rank0Log()
