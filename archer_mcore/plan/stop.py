"""How long a pre-empted run needs from Slurm's signal to its exit: the signal lead
that `archer submit` derives (`sbatch --signal=B:USR1@LEAD`).

The trainer checks the stop flag at every phase boundary of a step and then saves at
once (train/loop.py): before a step's update it drops the step and saves the previous
one; once the update has begun it finishes the update and saves the step without the
weight sync. The longest wait for a boundary is therefore one generation batch (each
batch generates the step's `train.prompts_per_step` prompts, so `StepTime.rollout_s`;
with async rollout the save after an update also waits for the next step's first
batch, already running) or one step's training (old log-probs and every mini-batch
update, `StepTime.training_s`), whichever is longer. Then the checkpoint is written:
bf16 weights plus fp32 master weights and Adam's two moments, 14 bytes per parameter
(`CHECKPOINT_BYTES_PER_PARAM`; the frozen reference copy is not saved), at
`checkpoint.write_gb_per_s`, the file system's write bandwidth for the job (all
writing ranks together). The lead is

    lead = MARGIN_FACTOR x (longest wait + save) + MARGIN_S

rounded up to whole seconds; MARGIN_S covers the process exit, the job script's
teardown of the SGLang servers and router, and the requeue. Seconds throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from archer_mcore.model.hf_config import ModelShape
from archer_mcore.plan.formulas import total_params
from archer_mcore.plan.steptime import StepTime

#: Checkpoint bytes per parameter: bf16 weights (2) + fp32 master weights (4) + Adam's
#: two fp32 moments (8), the last two sharded over data-parallel ranks in the file.
CHECKPOINT_BYTES_PER_PARAM = 14
MARGIN_FACTOR = 1.25  # the step-time model is roofline-style: allow 25 % more
MARGIN_S = 120.0  # exit, server teardown and requeue after the checkpoint is written
SLURM_MAX_SIGNAL_LEAD_S = 65535  # sbatch --signal's largest lead (a 16-bit field)


def checkpoint_bytes(m: ModelShape) -> float:
    """Bytes one checkpoint writes (all ranks together): 14 per parameter."""
    return float(CHECKPOINT_BYTES_PER_PARAM * total_params(m))


def checkpoint_save_s(m: ModelShape, write_gb_per_s: float) -> float:
    """Seconds to write one checkpoint at `write_gb_per_s` GB/s (1e9 bytes/s)."""
    if write_gb_per_s <= 0:
        raise ValueError(f"checkpoint.write_gb_per_s = {write_gb_per_s}: must be > 0")
    return checkpoint_bytes(m) / (write_gb_per_s * 1e9)


@dataclass(frozen=True, kw_only=True)
class SignalLead:
    """The derived lead and its parts (seconds)."""

    boundary_s: float  # the longest wait for the next phase boundary
    boundary_phase: str  # "generation batch" or "update"
    save_s: float  # one checkpoint write
    lead_s: int  # MARGIN_FACTOR x (boundary_s + save_s) + MARGIN_S, rounded up

    def describe(self) -> str:
        return (
            f"{self.lead_s} s = {MARGIN_FACTOR:g} x ({self.boundary_s:.0f} s for the longest "
            f"phase before a stop, one {self.boundary_phase}, + {self.save_s:.0f} s to write "
            f"the checkpoint) + {MARGIN_S:.0f} s"
        )


def signal_lead(time: StepTime, save_s: float) -> SignalLead:
    """The signal lead for a step with phases `time` and a checkpoint write of
    `save_s` seconds (module docstring)."""
    if time.rollout_s >= time.training_s:
        boundary, phase = time.rollout_s, "generation batch"
    else:
        boundary, phase = time.training_s, "update"
    lead = math.ceil(MARGIN_FACTOR * (boundary + save_s) + MARGIN_S)
    return SignalLead(boundary_s=boundary, boundary_phase=phase, save_s=save_s, lead_s=lead)
