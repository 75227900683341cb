"""Router load balance of a MoE policy's training forwards (issue 23 item 7).

Forward hooks on megatron-core's `TopKRouter` modules count, per MoE layer, how many
tokens each expert was assigned (the router's ``routing_map`` [tokens, E], after any
capacity-factor dropping) and how many of the tokens' k choices were dropped. The
policy resets the counts before a training step and reads them after it (every
micro-batch, recompute forwards included: they repeat the same choices, so the ratios
below are unchanged). The counts are summed over all ranks: the data-parallel ranks
route different rows, the sequence-parallel TP ranks different tokens of a row, the
pipeline stages different layers; expert parallelism dispatches tokens only after the
router, so each token is counted once, on the rank that routed it.

Metrics (metrics/keys.py): ``moe/layer/<n>/load_max_over_mean`` for megatron's layer
number n (1-based): the most loaded expert's tokens / the mean over the layer's experts
(1 = balanced, E / k at worst); ``moe/load_max_over_mean``, the largest of those; and
``moe/tokens_dropped_fraction``, dropped / (tokens x k) (0 with megatron's default
dropless routing, `moe_expert_capacity_factor` None, which the trainer uses).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


class RouterLoad:
    """Per-layer expert load of one model chunk's routers (see module doc).

    num_layers, num_experts, top_k: the model's (global layer count)."""

    def __init__(self, model: nn.Module, *, num_layers: int, num_experts: int, top_k: int) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        self.num_experts, self.top_k = num_experts, top_k
        # [layer, expert] assigned tokens; last column: dropped choices; one more column: tokens
        self.counts = torch.zeros(num_layers, num_experts + 2, dtype=torch.float64)
        self.hooks = [
            m.register_forward_hook(self._record)
            for m in model.modules()
            if isinstance(m, TopKRouter)
        ]

    def _record(self, module: nn.Module, _inputs: Any, output: tuple[Tensor, Tensor]) -> None:
        _, routing_map = output
        row = int(module.layer_number) - 1
        per_expert = routing_map.detach().sum(dim=0).to("cpu", torch.float64)
        tokens = float(routing_map.shape[0])
        self.counts[row, : self.num_experts] += per_expert
        self.counts[row, self.num_experts] += tokens * self.top_k - float(per_expert.sum())
        self.counts[row, self.num_experts + 1] += tokens

    def reset(self) -> None:
        self.counts.zero_()

    def metrics(self, device: torch.device) -> dict[str, float]:
        """Collective over the default group when initialised: the step's metrics, the
        same on every rank (empty when no layer routed a token)."""
        total = self.counts.to(device)
        if dist.is_initialized():
            dist.all_reduce(total)
        total = total.cpu()
        out: dict[str, float] = {}
        worst = 0.0
        for row in range(total.shape[0]):
            load = total[row, : self.num_experts]
            if float(load.sum()) <= 0:
                continue
            ratio = float(load.max() / load.mean())
            out[f"moe/layer/{row + 1}/load_max_over_mean"] = ratio
            worst = max(worst, ratio)
        if not out:
            return {}
        choices = float(total[:, self.num_experts + 1].sum()) * self.top_k
        out["moe/load_max_over_mean"] = worst
        out["moe/tokens_dropped_fraction"] = float(total[:, self.num_experts].sum()) / choices
        return out
