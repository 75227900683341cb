"""Spawned-process tasks of tests/mcore/test_moe_train.py (registered into
`mcore_workers.TASKS`): one RL step of a tiny Qwen3-MoE at EP 1 and EP 2, and a
checkpoint saved at EP 2 resumed at EP 1, TP 2 and PP 2."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import mcore_workers
import reshard_workers
import torch


def _moe_policy(hf_dir: str, *, tp: int = 1, pp: int = 1, ep: int = 1, optim: dict[str, Any]):
    from archer_mcore.actor.policy import MegatronPolicy
    from archer_mcore.actor.policy_config import PolicyConfig
    from archer_mcore.config import OptimizerConfig, ParallelConfig

    cfg = PolicyConfig(
        parallel=ParallelConfig(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
            sequence_parallel=tp > 1,  # megatron's MoELayer trains at TP > 1 only with SP
            micro_batch_tokens=20,
        ),
        optimizer=OptimizerConfig(**optim),
        temperature=0.9,
        with_reference=True,
        lr_decay_steps=6,
    )
    return MegatronPolicy.from_hf(hf_dir, cfg)


def moe_step(payload: dict[str, Any]) -> dict[str, Any]:
    """One optimizer step at each EP of `eps`: loss, grad norm, the number of local
    experts, and the largest difference of the updated HF-named weights from the
    transformers reference step the test computed (and from the first layout's)."""
    from safetensors.torch import load_file

    from archer_mcore.config import config_from_dict

    expected = load_file(payload["expected"])
    loss_cfg = config_from_dict({"algorithm": payload["loss"]}).algorithm
    out: dict[str, Any] = {}
    first: dict[str, torch.Tensor] | None = None
    for ep in payload["eps"]:
        policy = _moe_policy(payload["hf_dir"], ep=ep, optim=payload["optim"])
        full = mcore_workers._policy_batch(payload["batch"])
        full = replace(full, ref_logp=policy.compute_ref_logprobs(full))
        batch = mcore_workers._dp_share(full, policy.dp_rank, policy.dp_size)
        metrics = policy.train_step(batch, loss_cfg)
        weights = reshard_workers._weights(policy)
        experts = policy.unwrapped().decoder.layers[0].mlp.experts.local_experts
        out[f"ep{ep}"] = {
            "metrics": metrics,
            "dp": policy.dp_size,
            "local_experts": len(experts),
            "names": len(weights),
            "vs_reference": mcore_workers._max_over_world(
                reshard_workers._max_diff(weights, expected)
            ),
            "vs_first": 0.0
            if first is None
            else mcore_workers._max_over_world(reshard_workers._max_diff(weights, first)),
        }
        first = first or weights
    return out


def moe_reshard(payload: dict[str, Any]) -> dict[str, Any]:
    """Train 2 steps at EP 2, checkpoint, train 2 more (the unchanged run); for each
    resume layout (tp, pp, ep): a fresh policy loads the checkpoint and trains the same
    2 steps. Reports each resumed run's weight difference from the unchanged run (and
    right after loading from the saved weights)."""
    optim = payload["optim"]
    root = payload["root"]
    tp, pp, ep = payload["save_layout"]
    policy = _moe_policy(payload["hf_dir"], tp=tp, pp=pp, ep=ep, optim=optim)
    reshard_workers._train(policy, range(2))
    policy.save_checkpoint(root, {"next_batch": 2})
    at_save = reshard_workers._weights(policy)
    reshard_workers._train(policy, range(2, 4))
    reference = reshard_workers._weights(policy)
    fresh = _moe_policy(payload["hf_dir"], tp=tp, pp=pp, ep=ep, optim=optim)
    out: dict[str, Any] = {
        "moved": reshard_workers._max_diff(reference, reshard_workers._weights(fresh)),
        "resumed": {},
    }
    for rtp, rpp, rep in payload["resume_layouts"]:
        policy = _moe_policy(payload["hf_dir"], tp=rtp, pp=rpp, ep=rep, optim=optim)
        extra = policy.load_checkpoint(root)
        loaded = mcore_workers._max_over_world(
            reshard_workers._max_diff(reshard_workers._weights(policy), at_save)
        )
        reshard_workers._train(policy, range(extra["next_batch"], 4))
        diff = mcore_workers._max_over_world(
            reshard_workers._max_diff(reshard_workers._weights(policy), reference)
        )
        out["resumed"][f"tp{rtp}pp{rpp}ep{rep}"] = {
            "loaded_diff": loaded,
            "max_abs_diff": diff,
            "step": policy.step,
        }
    return out


mcore_workers.TASKS["moe_step"] = moe_step
mcore_workers.TASKS["moe_reshard"] = moe_reshard


def entry(
    rank: int, world: int, port: int, task: str, payload: dict[str, Any], result_path: str
) -> None:
    """`mcore_workers.entry`, from this module so that the spawned process imports it
    (and so registers the tasks above)."""
    mcore_workers.entry(rank, world, port, task, payload, result_path)
