"""KL-to-reference estimators per token (Schulman's k1, k2, k3)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

KLEstimator = Literal["k1", "k2", "k3"]
KL_ESTIMATORS: tuple[str, ...] = ("k1", "k2", "k3")


def kl_estimate(logp: Tensor, ref_logp: Tensor, estimator: str = "k3") -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from sampled-token log-probs.

    With d = logp - ref_logp and x = clamp(ref_logp - logp, -20, 20):
    k1 = d, k2 = d^2 / 2, k3 ("low_var_kl") = clamp(e^x - x - 1, -10, 10).
    Gradients flow through `logp`; pass a detached `ref_logp`.
    """
    if estimator == "k1":
        return logp - ref_logp
    if estimator == "k2":
        return 0.5 * (logp - ref_logp).square()
    if estimator == "k3":
        x = torch.clamp(ref_logp - logp, -20.0, 20.0)
        return torch.clamp(torch.exp(x) - x - 1.0, -10.0, 10.0)
    raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")
