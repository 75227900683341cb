"""What the RL loop (train/) calls on the actor: the `Policy` protocol.

`actor.policy.MegatronPolicy` is the implementation; the loop and its components are
typed with this protocol (as they are with the rollout engine's), so that train/
depends on these few methods and not on megatron. Every method is collective (SPMD:
every rank calls it); shapes are those of `actor.policy_batch.PolicyBatch` (B rows,
L response positions).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from archer_mcore.actor.policy_batch import PolicyBatch
from archer_mcore.algo.losses import LossConfig
from archer_mcore.model.weights import NamedTensors


@runtime_checkable
class Policy(Protocol):
    """The trained policy as the RL loop sees it."""

    #: The frozen reference model (KL), or None when built without one.
    reference: torch.nn.Module | None

    @property
    def dp_rank(self) -> int:
        """This rank's data-parallel rank: `train_step` takes its share of the rows."""
        ...

    @property
    def dp_size(self) -> int:
        """The data-parallel world size."""
        ...

    def compute_logprobs(self, batch: PolicyBatch) -> tuple[Tensor, Tensor]:
        """(log-prob, entropy) [B, L] fp32 of the response tokens under the current
        policy, forward only; `batch` is the whole batch, the same on every rank."""
        ...

    def compute_ref_logprobs(self, batch: PolicyBatch) -> Tensor:
        """The reference policy's log-probs [B, L] fp32 (whole batch on every rank)."""
        ...

    def train_step(self, batch: PolicyBatch, loss_cfg: LossConfig) -> dict[str, float]:
        """One optimizer step on this data-parallel rank's share of a mini-batch (needs
        old_logp and advantages); metrics averaged over the mini-batch, on every rank."""
        ...

    def export_hf_buckets(
        self, bucket_bytes: int = ..., dtype: torch.dtype | None = None
    ) -> Iterator[NamedTensors]:
        """The weights under HF names, in buckets of about `bucket_bytes` bytes."""
        ...

    def save_checkpoint(
        self,
        ckpt_dir: str | Path,
        extra_state: Mapping[str, Any] | None = None,
        keep_last: int | None = 3,
        step: int | None = None,
    ) -> Path:
        """Save as `ckpt_dir/step_<step>`; returns the step directory."""
        ...

    def load_checkpoint(self, ckpt_dir: str | Path) -> dict[str, Any]:
        """Restore from a step directory (or a root's latest); returns the extra state."""
        ...

    def unwrapped(self) -> torch.nn.Module:
        """The bare model (no DDP wrapper), e.g. to check its parameters are finite."""
        ...
