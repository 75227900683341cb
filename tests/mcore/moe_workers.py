"""Code that runs inside the spawned gloo processes of the Qwen3-MoE tests
(tests/mcore/test_moe.py, a task of `mcore_workers.TASKS`): build megatron's MoE
GPTModel for each layout, load the HF checkpoint, compare logits and log-probs with
transformers' and export the weights back."""

from __future__ import annotations

from typing import Any

import mcore_workers
import torch
import torch.distributed as dist


def _max_over_world(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def moe_parity(payload: dict[str, Any]) -> dict[str, Any]:
    """For each layout {tp, pp, ep, dispatcher}: max |logits - HF logits|, max |log-prob
    - HF log-prob| of the next tokens (over every reporting rank), the number of
    exported HF tensors that differ bitwise from the checkpoint's, and the counts."""
    from megatron.core import parallel_state as ps

    from archer_mcore.config import ModelConfig, ParallelConfig
    from archer_mcore.model.build import build_gpt_model
    from archer_mcore.model.hf_config import shape_from_hf_config
    from archer_mcore.model.hf_io import HFCheckpointReader
    from archer_mcore.model.pipeline import MicroBatch, causal_positions, run_microbatches
    from archer_mcore.model.weights import iter_hf_tensors, load_hf_weights
    from archer_mcore.parallel.distributed import init_model_parallel

    ids = torch.tensor(payload["input_ids"])
    ref = torch.tensor(payload["logits"], dtype=torch.float32)
    ref_lp = torch.log_softmax(ref.double(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    shape = shape_from_hf_config(payload["dir"])
    reader = HFCheckpointReader(payload["dir"])
    out: dict[str, Any] = {}
    for lay in payload["layouts"]:
        tp, pp, ep = lay["tp"], lay["pp"], lay["ep"]
        init_model_parallel(tp, pp, ep=ep)
        model_cfg = ModelConfig(moe_token_dispatcher=lay["dispatcher"])
        parallel = ParallelConfig(
            tensor_model_parallel_size=tp,
            pipeline_model_parallel_size=pp,
            expert_model_parallel_size=ep,
        )
        model, config, _ = build_gpt_model(shape, model_cfg, parallel)
        load_hf_weights(model, reader, shape)
        model.eval()

        def collect(logits: torch.Tensor, mb: MicroBatch) -> tuple[torch.Tensor, dict[str, Any]]:
            return logits.sum() * 0.0, {"logits": logits.detach()}

        mbs = [
            MicroBatch(ids[i : i + 1], causal_positions(ids[i : i + 1]))
            for i in range(ids.shape[0])
        ]
        with torch.no_grad():
            res = run_microbatches(model, mbs, collect, forward_only=True)
        diff = lp_diff = -1.0
        if ps.is_pipeline_last_stage():
            parts = []
            for r in res:
                shard = r["logits"]
                if tp > 1:
                    pieces = [torch.empty_like(shard) for _ in range(tp)]
                    dist.all_gather(pieces, shard.contiguous(), group=ps.get_tensor_model_parallel_group())
                    shard = torch.cat(pieces, dim=-1)
                parts.append(shard)
            full = torch.cat(parts, dim=0)[..., : shape.vocab_size]
            diff = (full - ref).abs().max().item()
            lp = torch.log_softmax(full.double(), -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
            lp_diff = (lp - ref_lp).abs().max().item()
        wrong = n = 0
        for name, t in iter_hf_tensors(model, shape):
            n += 1
            wrong += int(not torch.equal(t, reader.get(name)))
        key = f"tp{tp}pp{pp}ep{ep}/{lay['dispatcher']}"
        out[key] = {
            "max_abs_diff": _max_over_world(diff),
            "logprob_abs_diff": _max_over_world(lp_diff),
            "export_wrong": _max_over_world(float(wrong)),
            "export_count": n,
            "hf_count": len(reader.keys()),
            "dispatcher": config.moe_token_dispatcher_type,
            "local_experts": len(model.decoder.layers[0].mlp.experts.local_experts),
        }
    return out


mcore_workers.TASKS["moe_parity"] = moe_parity


def entry(
    rank: int, world: int, port: int, task: str, payload: dict[str, Any], result_path: str
) -> None:
    """`mcore_workers.entry`, from this module so that the spawned process imports it
    (and so registers the task above)."""
    mcore_workers.entry(rank, world, port, task, payload, result_path)
