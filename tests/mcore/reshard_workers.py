"""Spawned-process tasks of tests/mcore/test_reshard.py: save a checkpoint at one
TP/PP/DP layout and resume it at others (registered into `mcore_workers.TASKS`)."""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

import mcore_workers
import torch
import torch.distributed as dist


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _policy(hf_dir: str, tp: int, pp: int, dist_opt: bool = True):
    from archer_mcore.actor.policy import MegatronPolicy
    from archer_mcore.actor.policy_config import PolicyConfig
    from archer_mcore.config import OptimizerConfig, ParallelConfig

    cfg = PolicyConfig(
        parallel=ParallelConfig(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            micro_batch_tokens=20,
            use_distributed_optimizer=dist_opt,
        ),
        optimizer=OptimizerConfig(
            lr=1e-2, lr_warmup_steps=1, lr_schedule="cosine", clip_grad=1.0, weight_decay=0.01
        ),
        lr_decay_steps=6,
    )
    return MegatronPolicy.from_hf(hf_dir, cfg)


def _train(policy, steps: range) -> None:
    """The resume test's data and loss: a deterministic batch per step, split over DP."""
    from archer_mcore.algo.losses import LossConfig
    from archer_mcore.config import ArcherRuleConfig

    loss_cfg = LossConfig(token_rule=ArcherRuleConfig(), agg_mode="token-mean", kl_coef=0.0)
    for step in steps:
        batch = mcore_workers._step_batch(step, 100)
        old, _ = policy.compute_logprobs(batch)  # the whole batch (sharded over DP inside)
        # Perturbed (as a stale rollout policy's would be) so that ratios clip; before
        # the DP split, so every layout trains on the same numbers.
        wobble = torch.sin(torch.arange(old.numel()).reshape(old.shape) + step)
        batch = replace(batch, old_logp=old + 0.1 * wobble)
        per = batch.size // policy.dp_size
        batch = batch.rows(slice(policy.dp_rank * per, (policy.dp_rank + 1) * per))
        policy.train_step(batch, loss_cfg)


def _weights(policy) -> dict[str, torch.Tensor]:
    """Full HF-named weights (every rank takes part; the same on every rank)."""
    from archer_mcore.model.weights import iter_hf_tensors

    return {n: t.clone() for n, t in iter_hf_tensors(policy.model, policy.shape)}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def reshard(payload: dict[str, Any]) -> dict[str, Any]:
    """Train 2 steps at `save_layout`, checkpoint, train 2 more (the run that never
    changes layout); then, for each of `resume_layouts`, load that checkpoint in a fresh
    policy and train the same 2 steps. Reports each resumed run's largest weight
    difference from the unchanged run, and whether its RNG states were restored."""
    import archer_mcore.actor.checkpoint as ckpt

    capture = _Capture()
    logging.getLogger(ckpt.__name__).addHandler(capture)
    root = payload["root"]
    tp, pp = payload["save_layout"]
    dist_opt = payload.get("distributed_optimizer", True)
    policy = _policy(payload["hf_dir"], tp, pp, dist_opt)
    _train(policy, range(2))
    policy.save_checkpoint(root, {"next_batch": 2})
    saved_rng = torch.get_rng_state().clone()
    at_save = _weights(policy)
    _train(policy, range(2, 4))
    reference = _weights(policy)
    moved = _max_diff(reference, _weights(_policy(payload["hf_dir"], tp, pp, dist_opt)))
    out: dict[str, Any] = {"moved": moved, "resumed": {}}
    for rtp, rpp in payload["resume_layouts"]:
        policy = _policy(payload["hf_dir"], rtp, rpp, dist_opt)
        torch.manual_seed(777)  # a state the checkpoint's differs from
        capture.lines.clear()
        extra = policy.load_checkpoint(root)
        rng_restored = torch.equal(torch.get_rng_state(), saved_rng)
        lr = policy.optimizer.param_groups[0]["lr"]
        loaded = mcore_workers._max_over_world(_max_diff(_weights(policy), at_save))
        _train(policy, range(extra["next_batch"], 4))
        diff = mcore_workers._max_over_world(_max_diff(_weights(policy), reference))
        out["resumed"][f"tp{rtp}pp{rpp}"] = {
            "max_abs_diff": diff,
            "step": policy.step,
            "dp": policy.dp_size,
            "rng_restored": rng_restored,
            "lr_after_load": lr,
            "loaded_diff": loaded,
            "log": list(capture.lines),
        }
    return out


def legacy(payload: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint in the format written before resharding (dp_reshardable optimizer
    state, no resharding fields in the manifest: the old save path, reproduced by
    setting those two back) saved at TP=1 DP=2: it resumes at its own layout to the same
    weights as the run that wrote it; at TP=2 the load fails with the message."""
    import archer_mcore.actor.checkpoint as ckpt

    root = payload["root"]
    policy = _policy(payload["hf_dir"], 1, 1)
    _train(policy, range(2))
    new_sharding, new_fields = ckpt.OPTIM_SHARDING, ckpt._reshard_fields
    ckpt.OPTIM_SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}
    ckpt._reshard_fields = lambda policy: {}
    try:
        policy.save_checkpoint(root, {"next_batch": 2})
    finally:
        ckpt.OPTIM_SHARDING, ckpt._reshard_fields = new_sharding, new_fields
    _train(policy, range(2, 4))
    reference = _weights(policy)
    policy = _policy(payload["hf_dir"], 1, 1)
    extra = policy.load_checkpoint(root)
    _train(policy, range(extra["next_batch"], 4))
    out: dict[str, Any] = {
        "same_layout_diff": mcore_workers._max_over_world(_max_diff(_weights(policy), reference))
    }
    policy = _policy(payload["hf_dir"], 2, 1)
    try:
        policy.load_checkpoint(root)
        out["other_layout_error"] = None
    except ckpt.CheckpointError as e:
        out["other_layout_error"] = str(e)
    dist.barrier()
    return out


mcore_workers.TASKS["reshard"] = reshard
mcore_workers.TASKS["reshard_legacy"] = legacy


def entry(
    rank: int, world: int, port: int, task: str, payload: dict[str, Any], result_path: str
) -> None:
    """`mcore_workers.entry`, from this module so that the spawned process imports it
    (and so registers the tasks above)."""
    mcore_workers.entry(rank, world, port, task, payload, result_path)
