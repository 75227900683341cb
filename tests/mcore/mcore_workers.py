"""Code that runs inside the spawned gloo processes of the megatron tests.

`entry` sets up torch.distributed, runs one task and lets rank 0 write the task's
result dict as JSON; the test process makes the assertions.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import torch.distributed as dist


def entry(
    rank: int, world: int, port: int, task: str, payload: dict[str, Any], result_path: str
) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    from archer_mcore.parallel.distributed import destroy_distributed, init_process_group

    init_process_group()
    try:
        out = TASKS[task](payload)
        if rank == 0:
            with open(result_path, "w") as f:
                json.dump(out, f)
    finally:
        destroy_distributed()


def _gather_tp_vocab(shard: torch.Tensor) -> torch.Tensor:
    from megatron.core import parallel_state as ps

    tp = ps.get_tensor_model_parallel_world_size()
    if tp == 1:
        return shard
    parts = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(parts, shard.contiguous(), group=ps.get_tensor_model_parallel_group())
    return torch.cat(parts, dim=-1)


def _max_over_world(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _sum_over_world(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item())


def parity(payload: dict[str, Any]) -> dict[str, Any]:
    """For each (tp, pp) layout and model: max |megatron logits - transformers logits|
    on the last-stage ranks, how many ranks reported, and the number of HF tensors the
    streaming export got bitwise wrong."""
    from megatron.core import parallel_state as ps

    from archer_mcore.model.build import build_gpt_model
    from archer_mcore.model.hf_config import shape_from_hf_config
    from archer_mcore.model.hf_io import HFCheckpointReader
    from archer_mcore.model.pipeline import MicroBatch, causal_positions, run_microbatches
    from archer_mcore.model.weights import iter_hf_buckets, load_hf_weights
    from archer_mcore.parallel.distributed import init_model_parallel

    ids = torch.tensor(payload["input_ids"])
    out: dict[str, Any] = {}
    for tp, pp in payload["layouts"]:
        init_model_parallel(tp, pp)
        for name, d in payload["models"].items():
            shape = shape_from_hf_config(d["dir"])
            reader = HFCheckpointReader(d["dir"])
            model, _, _ = build_gpt_model(shape)
            load_hf_weights(model, reader, shape)
            model.eval()
            ref = torch.tensor(d["logits"])

            def collect(
                logits: torch.Tensor, mb: MicroBatch
            ) -> tuple[torch.Tensor, dict[str, Any]]:
                return logits.sum() * 0.0, {"logits": logits.detach()}

            mbs = [
                MicroBatch(ids[i : i + 1], causal_positions(ids[i : i + 1]))
                for i in range(ids.shape[0])
            ]
            with torch.no_grad():
                res = run_microbatches(model, mbs, collect, forward_only=True)
            diff, reported = -1.0, 0.0
            if ps.is_pipeline_last_stage():
                full = torch.cat([_gather_tp_vocab(r["logits"]) for r in res], dim=0)
                pad_ok = full.shape[-1] == shape.padded_vocab_size(tp)
                diff = (
                    (full[..., : shape.vocab_size] - ref).abs().max().item()
                    if pad_ok
                    else float("inf")
                )
                reported = 1.0
            wrong = 0
            n = 0
            for bucket in iter_hf_buckets(model, shape, bucket_bytes=4096):
                for hf_name, t in bucket:
                    n += 1
                    wrong += int(not torch.equal(t, reader.get(hf_name)))
            key = f"tp{tp}pp{pp}/{name}"
            out[key] = {
                "max_abs_diff": _max_over_world(diff),
                "reporting_ranks": _sum_over_world(reported),
                "export_wrong": _sum_over_world(wrong),
                "export_count": n,
                "hf_count": len(reader.keys()),
            }
    return out


TASKS = {"parity": parity}


def vocab_parallel(payload: dict[str, Any]) -> dict[str, Any]:
    """Entropy/log-prob and their gradients over a vocab split across the world (TP)."""
    from archer_mcore.algo.entropy import vocab_parallel_entropy_and_logprob

    rank, world = dist.get_rank(), dist.get_world_size()
    logits = torch.tensor(payload["logits"], dtype=torch.float32)  # [N, V_pad]
    tokens = torch.tensor(payload["tokens"])
    g_ent = torch.tensor(payload["g_ent"], dtype=torch.float32)
    g_lp = torch.tensor(payload["g_lp"], dtype=torch.float32)
    v_local = logits.shape[1] // world
    shard = logits[:, rank * v_local : (rank + 1) * v_local].clone().requires_grad_(True)
    ent, lp = vocab_parallel_entropy_and_logprob(
        shard,
        tokens,
        rank * v_local,
        dist.group.WORLD,
        temperature=payload["temperature"],
        vocab_size=payload["vocab_size"],
        chunk_rows=3,
    )
    ((ent * g_ent).sum() + (lp * g_lp).sum()).backward()
    grads = [torch.empty_like(shard.grad) for _ in range(world)]
    dist.all_gather(grads, shard.grad)
    ents = [torch.empty_like(ent) for _ in range(world)]
    dist.all_gather(ents, ent.detach())
    return {
        "entropy": ent.tolist(),
        "logprob": lp.tolist(),
        "grad": torch.cat(grads, dim=1).tolist(),
        "entropy_same_on_all_ranks": all(torch.equal(e, ents[0]) for e in ents),
    }


TASKS["vocab_parallel"] = vocab_parallel


def _policy_batch(d: dict[str, Any]):
    from archer_mcore.actor.policy_batch import PolicyBatch

    return PolicyBatch(
        input_ids=torch.tensor(d["input_ids"]),
        prompt_lengths=torch.tensor(d["prompt_lengths"]),
        response_mask=torch.tensor(d["response_mask"]),
        old_logp=torch.tensor(d["old_logp"]),
        advantages=torch.tensor(d["advantages"]),
    )


def _policy_cfg(
    payload: dict[str, Any], tp: int, pp: int, recompute: str | None = None, sp: bool = False
):
    from archer_mcore.actor.policy_config import PolicyConfig
    from archer_mcore.config import ModelConfig, OptimizerConfig, ParallelConfig

    return PolicyConfig(
        model=ModelConfig(recompute=recompute or "none"),
        parallel=ParallelConfig(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            sequence_parallel=sp,
            micro_batch_tokens=payload["micro_batch_tokens"],
        ),
        optimizer=OptimizerConfig(**payload["optim"]),
        temperature=payload["temperature"],
        with_reference=True,
    )


def _dp_share(batch, dp_rank: int, dp_size: int):
    b = batch.size
    per = b // dp_size
    return batch.rows(slice(dp_rank * per, (dp_rank + 1) * per))


def train_step(payload: dict[str, Any]) -> dict[str, Any]:
    """One optimizer step per layout; the updated weights under HF names compared with
    the transformers reference step the test computed (saved as safetensors)."""
    from dataclasses import replace

    from safetensors.torch import load_file

    from archer_mcore.actor.policy import MegatronPolicy
    from archer_mcore.config import config_from_dict
    from archer_mcore.model.weights import iter_hf_tensors

    expected = load_file(payload["expected"])
    loss_cfg = config_from_dict({"algorithm": payload["loss"]}).algorithm
    out: dict[str, Any] = {}
    for tp, pp, recompute in payload["layouts"]:
        policy = MegatronPolicy.from_hf(payload["hf_dir"], _policy_cfg(payload, tp, pp, recompute))
        full = _policy_batch(payload["batch"])
        full = replace(full, ref_logp=policy.compute_ref_logprobs(full))  # sharded over DP
        batch = _dp_share(full, policy.dp_rank, policy.dp_size)
        metrics = policy.train_step(batch, loss_cfg)
        worst, worst_name = 0.0, ""
        names = 0
        for name, t in iter_hf_tensors(policy.model, policy.shape):
            names += 1
            d = (t - expected[name]).abs().max().item()
            if d > worst:
                worst, worst_name = d, name
        out[f"tp{tp}pp{pp}" + (f"-{recompute}" if recompute else "")] = {
            "max_abs_diff": _max_over_world(worst),
            "worst": worst_name,
            "names": names,
            "metrics": metrics,
            "dp": policy.dp_size,
        }
    # Random initialisation from a config dict: DP replicas hold identical weights.
    policy = MegatronPolicy.from_hf(payload["hf_config"], _policy_cfg(payload, 1, 1))
    spread = 0.0
    for p in policy.unwrapped().parameters():
        lo, hi = p.detach().clone(), p.detach().clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        spread = max(spread, (hi - lo).abs().max().item())
    out["random_init"] = {"dp": policy.dp_size, "replica_spread": spread}
    return out


TASKS["train_step"] = train_step


def _step_batch(step: int, vocab: int):
    """A deterministic batch for training step `step` (the 'data position')."""
    from archer_mcore.actor.policy_batch import PolicyBatch

    g = torch.Generator().manual_seed(100 + step)
    prompt = torch.randint(1, 4, (4,), generator=g)
    resp = torch.randint(1, 6, (4,), generator=g)
    ids = torch.randint(1, vocab, (4, 10), generator=g)
    mask = torch.arange(5).unsqueeze(0) < resp.unsqueeze(1)
    adv = torch.randn(4, generator=g)
    return PolicyBatch(ids, prompt, mask, advantages=adv)


def resume(payload: dict[str, Any]) -> dict[str, Any]:
    """mode full: 4 steps, checkpoint after each. mode crash: same, but SIGKILL the
    processes while step 3's checkpoint is being published. mode resume: load the
    latest checkpoint and train on to step 4. Returns the final weights' path."""
    import signal
    from dataclasses import replace

    from safetensors.torch import save_file

    import archer_mcore.actor.checkpoint as ckpt
    from archer_mcore.actor.policy import MegatronPolicy
    from archer_mcore.actor.policy_config import PolicyConfig
    from archer_mcore.algo.losses import LossConfig
    from archer_mcore.config import ArcherRuleConfig, OptimizerConfig, ParallelConfig
    from archer_mcore.model.weights import iter_hf_tensors

    cfg = PolicyConfig(
        parallel=ParallelConfig(
            tensor_model_parallel_size=payload["tp"],
            pipeline_model_parallel_size=payload["pp"],
            micro_batch_tokens=20,
        ),
        optimizer=OptimizerConfig(
            lr=1e-2, lr_warmup_steps=2, lr_schedule="cosine", clip_grad=1.0, weight_decay=0.0
        ),
        lr_decay_steps=6,
    )
    policy = MegatronPolicy.from_hf(payload["hf_dir"], cfg)
    loss_cfg = LossConfig(token_rule=ArcherRuleConfig(), agg_mode="token-mean", kl_coef=0.01)
    root = payload["ckpt_root"]
    mode = payload["mode"]
    start = 0
    if mode == "resume":
        extra = policy.load_checkpoint(root)
        start = extra["next_batch"]
    crash_at = payload.get("crash_during_save_of")
    for step in range(start, 4):
        batch = _step_batch(step, 100)
        old, _ = policy.compute_logprobs(batch)  # the whole batch: sharded over DP inside
        batch = replace(batch, old_logp=old, ref_logp=policy.compute_ref_logprobs(batch))
        per = batch.size // policy.dp_size
        batch = batch.rows(slice(policy.dp_rank * per, (policy.dp_rank + 1) * per))
        # Perturb the old log-probs (as a stale rollout policy would) so ratios clip.
        batch = replace(
            batch,
            old_logp=batch.old_logp
            + 0.1
            * torch.sin(
                torch.arange(batch.old_logp.numel()).reshape(batch.old_logp.shape).float() + step
            ),
        )
        policy.train_step(batch, loss_cfg)
        if mode == "crash" and policy.step == crash_at:

            def die(tmp, final):
                dist.barrier()
                os.kill(os.getpid(), signal.SIGKILL)

            ckpt._publish = die
        policy.save_checkpoint(root, {"next_batch": step + 1, "note": "data position"}, keep_last=2)
    weights = {n: t.clone() for n, t in iter_hf_tensors(policy.model, policy.shape)}
    out_path = payload["weights_out"]
    if dist.get_rank() == 0:
        save_file(weights, out_path)
    return {"step": policy.step, "weights": out_path, "started_at": start}


def full_then_crash(payload: dict[str, Any]) -> dict[str, Any]:
    """The uninterrupted run, then (same processes, fresh policy) the run that is killed
    while publishing step 3's checkpoint: one process start-up instead of two."""
    out = resume(
        {
            **payload,
            "mode": "full",
            "ckpt_root": payload["full_root"],
            "weights_out": payload["full_weights"],
        }
    )
    if dist.get_rank() == 0:
        with open(payload["full_result"], "w") as f:
            json.dump(out, f)
    resume(
        {
            **payload,
            "mode": "crash",
            "ckpt_root": payload["crash_root"],
            "weights_out": payload["full_weights"] + ".unused",
        }
    )
    raise AssertionError("the crash run was expected to kill this process")


TASKS["resume"] = resume
TASKS["full_then_crash"] = full_then_crash


def dp_scoring(payload: dict[str, Any]) -> dict[str, Any]:
    """compute_logprobs / compute_ref_logprobs of the whole batch at TP=PP=1 on every
    process of the world (so DP = world size): the gathered results and, per rank, how
    many rows (sequences) its model forwards saw (counted by a hook on the GPTModel
    itself)."""
    from archer_mcore.actor.policy import MegatronPolicy

    policy = MegatronPolicy.from_hf(payload["hf_dir"], _policy_cfg(payload, 1, 1))
    seen = {"policy": 0, "reference": 0}

    def counter(key: str):
        def hook(_module, args, kwargs):
            ids = args[0] if args else kwargs["input_ids"]
            packed = kwargs.get("packed_seq_params")
            # a packed row holds len(cu_seqlens) - 1 sequences (TP=1, no SP: no padding)
            seen[key] += int(ids.shape[0]) if packed is None else len(packed.cu_seqlens_q) - 1

        return hook

    policy.unwrapped().register_forward_pre_hook(counter("policy"), with_kwargs=True)
    policy.reference.register_forward_pre_hook(counter("reference"), with_kwargs=True)
    batch = _policy_batch(payload["batch"])
    logp, ent = policy.compute_logprobs(batch)
    ref = policy.compute_ref_logprobs(batch)
    rows = [None] * dist.get_world_size()
    dist.all_gather_object(rows, seen)
    same = [torch.empty_like(logp) for _ in range(dist.get_world_size())]
    dist.all_gather(same, logp)
    return {
        "dp": policy.dp_size,
        "logprob": logp.tolist(),
        "entropy": ent.tolist(),
        "ref_logprob": ref.tolist(),
        "rows_seen": rows,
        "same_on_all_ranks": all(torch.equal(s, same[0]) for s in same),
    }


TASKS["dp_scoring"] = dp_scoring


def kernel_paths(payload: dict[str, Any]) -> dict[str, Any]:
    """For each TP size and kernel path (kernels.mode x kernels.fused_lm_head): the
    log-probs and entropies of compute_logprobs, then one optimizer step's loss and
    updated HF-named weights. Runs under TRITON_INTERPRET=1 (set by the test)."""
    from dataclasses import replace

    from archer_mcore.actor.policy import MegatronPolicy
    from archer_mcore.config import KernelsConfig, config_from_dict
    from archer_mcore.model.weights import iter_hf_tensors

    loss_cfg = config_from_dict({"algorithm": payload["loss"]}).algorithm
    full = _policy_batch(payload["batch"])
    out: dict[str, Any] = {}
    for tp in payload["tps"]:
        for mode, fused in payload["paths"]:
            cfg = replace(
                _policy_cfg(payload, tp, 1), kernels=KernelsConfig(mode=mode, fused_lm_head=fused)
            )
            policy = MegatronPolicy.from_hf(payload["hf_dir"], cfg)
            logp, ent = policy.compute_logprobs(full)
            batch = replace(full, ref_logp=policy.compute_ref_logprobs(full))
            per = batch.size // policy.dp_size
            share = batch.rows(slice(policy.dp_rank * per, (policy.dp_rank + 1) * per))
            metrics = policy.train_step(share, loss_cfg)
            weights = {n: t.tolist() for n, t in iter_hf_tensors(policy.model, policy.shape)}
            probe = torch.zeros(3, 1, policy.shape.hidden_size)  # [s, b, H] into the head
            width = policy.unwrapped().output_layer(probe)[0].shape[-1]
            out[f"tp{tp}/{policy.kernel_path.name}"] = {
                "head_output_width": width,
                "logprob": logp.tolist(),
                "entropy": ent.tolist(),
                "loss": metrics["loss"],
                "grad_norm": metrics["grad_norm"],
                "weights": weights,
            }
    return out


TASKS["kernel_paths"] = kernel_paths


def sequence_parallel(payload: dict[str, Any]) -> dict[str, Any]:
    """TP = world: with parallel.sequence_parallel off and on (and on with the fused LM
    head's torch path): megatron's TransformerConfig flag, full logits of a batch of odd
    length, compute_logprobs, and one optimizer step's loss and weights."""
    from dataclasses import replace

    from megatron.core import parallel_state as ps

    from archer_mcore.actor.policy import MegatronPolicy
    from archer_mcore.config import KernelsConfig, config_from_dict
    from archer_mcore.model.pipeline import causal_positions
    from archer_mcore.model.weights import iter_hf_tensors

    tp = dist.get_world_size()
    loss_cfg = config_from_dict({"algorithm": payload["loss"]}).algorithm
    full = _policy_batch(payload["batch"])
    out: dict[str, Any] = {}
    for sp, fused in ((False, False), (True, False), (True, True)):
        cfg = replace(
            _policy_cfg(payload, tp, 1, sp=sp),
            kernels=KernelsConfig(mode="torch", fused_lm_head=fused),
        )
        policy = MegatronPolicy.from_hf(payload["hf_dir"], cfg)
        ids = torch.tensor(payload["logits_ids"])  # [b, s], s a multiple of tp
        with torch.no_grad():
            logits = policy.reference(ids, causal_positions(ids), None) if not fused else None
        logits = _gather_tp_vocab(logits) if logits is not None else None
        logp, ent = policy.compute_logprobs(full)
        batch = replace(full, ref_logp=policy.compute_ref_logprobs(full))
        metrics = policy.train_step(batch, loss_cfg)
        weights = {n: t.tolist() for n, t in iter_hf_tensors(policy.model, policy.shape)}
        out[f"sp{int(sp)}" + ("_lm_head" if fused else "")] = {
            "config_sequence_parallel": policy.config.sequence_parallel,
            "seq_multiple": policy.choices.build.seq_multiple,
            "logits": None if logits is None else logits.tolist(),
            "logprob": logp.tolist(),
            "entropy": ent.tolist(),
            "loss": metrics["loss"],
            "grad_norm": metrics["grad_norm"],
            "weights": weights,
            "tp": ps.get_tensor_model_parallel_world_size(),
        }
    return out


TASKS["sequence_parallel"] = sequence_parallel


def plan_agrees(payload: dict[str, Any]) -> dict[str, Any]:
    """For each override set on the demo config: build the policy the way `archer train`
    does (components._policy_config) and ask the planner for the same config on this
    machine; report both sides' choices."""
    import dataclasses

    from archer_mcore import plan as planner
    from archer_mcore.actor.policy import MegatronPolicy
    from archer_mcore.config import load_config
    from archer_mcore.model.fp8 import detect_environment
    from archer_mcore.train.components import _policy_config

    out: dict[str, Any] = {}
    for name, overrides in payload["cases"].items():
        cfg = load_config(payload["config"], overrides)
        policy = MegatronPolicy.from_hf(payload["hf_config"], _policy_config(cfg))
        planned = planner.resolved_choices(
            cfg, *detect_environment(), cuda=torch.cuda.is_available(), triton_compiles=None
        )
        cluster = planner.Cluster(
            nodes=1, gpus_per_node=dist.get_world_size(), gpu="h100", rollout_nodes=0
        )
        layout, _ = planner.layouts_from_config(cfg, cluster, choices=planned)
        built = policy.choices
        out[name] = {
            "same_choices": planned == built,
            "built": {
                "sequence_parallel": policy.config.sequence_parallel,
                "fp8": policy.config.fp8,
                "fp8_param_gather": policy.ddp_config.fp8_param_gather,
                "spec": built.build.precision.spec,
                "kernel_path": built.kernel_path.name,
                "seq_multiple": built.build.seq_multiple,
                "logits_width": policy.unwrapped()
                .output_layer(torch.zeros(2, 1, policy.shape.hidden_size))[0]
                .shape[-1],
            },
            "planned": {
                "sequence_parallel": layout.sequence_parallel,
                "fp8": layout.fp8,
                "logits_path": layout.logits_path,
                "choices": repr(dataclasses.asdict(planned.build)),
            },
        }
    return out


TASKS["plan_agrees"] = plan_agrees
