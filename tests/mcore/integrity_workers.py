"""The spawned side of tests/mcore/test_checkpoint_integrity.py (gloo, TP=2): which
files each rank checksums on save and verifies on load, and how corrupt files fail."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import mcore_workers
import torch.distributed as dist


def _all(obj: Any) -> list[Any]:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def integrity(payload: dict[str, Any]) -> dict[str, Any]:
    import archer_mcore.actor.checkpoint as ckpt
    import archer_mcore.actor.checkpoint_store as store
    from archer_mcore.actor.policy import MegatronPolicy
    from archer_mcore.actor.policy_config import PolicyConfig
    from archer_mcore.algo.losses import LossConfig
    from archer_mcore.config import OptimizerConfig, ParallelConfig

    rank = dist.get_rank()
    # TP=2: each rank writes its own weight shards (at DP=2 the DP-replicated weights and
    # the fully reshardable optimizer state are all written by rank 0)
    cfg = PolicyConfig(
        parallel=ParallelConfig(tensor_model_parallel_size=2, micro_batch_tokens=20),
        optimizer=OptimizerConfig(lr=1e-2),
    )
    policy = MegatronPolicy.from_hf(payload["hf_dir"], cfg)
    batch = mcore_workers._step_batch(0, 100)
    per = batch.size // policy.dp_size
    batch = batch.rows(slice(policy.dp_rank * per, (policy.dp_rank + 1) * per))
    from dataclasses import replace

    old, _ = policy.compute_logprobs(batch)
    policy.train_step(replace(batch, old_logp=old), LossConfig(agg_mode="token-mean"))

    hashed: list[str] = []
    real_crc = store._crc32_range
    root = Path(payload["root"])

    def recording_crc(path: Path, start: int, length: int, chunk: int = 1 << 22) -> int:
        hashed.append(str(Path(path).relative_to(root / ".tmp-step_00000001")))
        return real_crc(path, start, length, chunk)

    store._crc32_range = recording_crc
    good = ckpt.save_checkpoint(policy, root, {"next": 1})
    store._crc32_range = real_crc
    out: dict[str, Any] = {"hashed_on_save": _all(sorted(set(hashed)))}

    policy.load_checkpoint(good)
    out["verified_on_load"] = _all(ckpt.last_load_verification.files)

    # Corruptions: rank 0 damages a copy, every rank loads it and reports.
    results = {}
    for name, rel, how in payload["corruptions"]:
        d = root.parent / f"bad_{name}" / good.name
        if rank == 0:
            shutil.copytree(good, d)
            p = d / rel
            if how == "missing":
                p.unlink()
            elif how == "truncate":
                with open(p, "r+b") as f:
                    f.truncate(p.stat().st_size // 2)
            else:  # flip one byte in the middle
                with open(p, "r+b") as f:
                    f.seek(p.stat().st_size // 2)
                    b = f.read(1)
                    f.seek(-1, 1)
                    f.write(bytes([b[0] ^ 0xFF]))
        dist.barrier()
        try:
            policy.load_checkpoint(d)
            res = {"raised": None}
        except Exception as e:
            res = {"raised": type(e).__name__, "message": str(e)}
        res["verified"] = ckpt.last_load_verification.files
        results[name] = _all(res)
        dist.barrier()
    out["corruptions"] = results
    return out


def entry(
    rank: int, world: int, port: int, task: str, payload: dict[str, Any], result_path: str
) -> None:
    mcore_workers.TASKS["integrity"] = integrity
    mcore_workers.entry(rank, world, port, task, payload, result_path)
