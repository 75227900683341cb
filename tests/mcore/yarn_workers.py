"""The spawned side of tests/mcore/test_yarn.py: a megatron GPTModel with YaRN
positions, built from an HF directory, run on gloo processes (see mcore_workers.entry)."""

from __future__ import annotations

from typing import Any

import mcore_workers
import torch


def yarn_parity(payload: dict[str, Any]) -> dict[str, Any]:
    """For each tp in payload["tps"] and each model: max |megatron logits - transformers
    logits| over the last-stage ranks, and the rotary embedding class megatron built."""
    from megatron.core import parallel_state as ps

    from archer_mcore.model.build import build_gpt_model
    from archer_mcore.model.hf_config import shape_from_hf_config
    from archer_mcore.model.hf_io import HFCheckpointReader
    from archer_mcore.model.pipeline import MicroBatch, causal_positions, run_microbatches
    from archer_mcore.model.weights import load_hf_weights
    from archer_mcore.parallel.distributed import init_model_parallel

    ids = torch.tensor(payload["input_ids"])
    out: dict[str, Any] = {}
    for tp in payload["tps"]:
        init_model_parallel(tp, 1)
        for name, d in payload["models"].items():
            shape = shape_from_hf_config(d["dir"])
            model, _, _ = build_gpt_model(shape)
            load_hf_weights(model, HFCheckpointReader(d["dir"]).get, shape)
            model.eval()

            def keep(logits: torch.Tensor, mb: MicroBatch) -> tuple[torch.Tensor, dict]:
                return logits.sum() * 0.0, {"logits": logits.detach()}

            mbs = [
                MicroBatch(ids[i : i + 1], causal_positions(ids[i : i + 1]))
                for i in range(len(ids))
            ]
            with torch.no_grad():
                res = run_microbatches(model, mbs, keep, forward_only=True)
            full = torch.cat([mcore_workers._gather_tp_vocab(r["logits"]) for r in res], dim=0)
            ref = torch.tensor(d["logits"])
            diff = (full[..., : shape.vocab_size] - ref).abs().max().item()
            rope_cls = type(model.rotary_pos_emb).__name__
            out[f"tp{tp}/{name}"] = {
                "max_abs_diff": mcore_workers._max_over_world(diff),
                "rotary": rope_cls,
                "ranks": ps.get_tensor_model_parallel_world_size(),
            }
    return out


def entry(
    rank: int, world: int, port: int, task: str, payload: dict[str, Any], result_path: str
) -> None:
    mcore_workers.TASKS["yarn_parity"] = yarn_parity
    mcore_workers.entry(rank, world, port, task, payload, result_path)
