"""A short supervised phase that warm-starts a tiny policy before RL (the CPU demo).

It trains a transformers causal LM on (prompt ids, response ids) pairs with the loss on
response tokens only, then saves it with `save_pretrained` (safetensors), so the RL run
loads it through the same HF -> Megatron conversion as a real checkpoint. The result is
cached under a key of everything that determines it: a second run reuses it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("archer.warmstart")

Example = tuple[Sequence[int], Sequence[int]]  # (prompt ids, response ids)


def cache_key(hf_config: Mapping[str, Any], examples: Sequence[Example], **settings: Any) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(dict(hf_config), sort_keys=True, default=str).encode())
    h.update(json.dumps(settings, sort_keys=True).encode())
    for p, r in examples:
        h.update(bytes(str((list(p), list(r))), "utf8"))
    return h.hexdigest()[:16]


def _pad_batch(
    batch: Sequence[Example], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input ids, attention mask, labels with -100 off the response)."""
    width = max(len(p) + len(r) for p, r in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, (p, r) in enumerate(batch):
        seq = list(p) + list(r)
        ids[i, : len(seq)] = torch.tensor(seq)
        attn[i, : len(seq)] = 1
        labels[i, len(p) : len(seq)] = torch.tensor(list(r))
    return ids, attn, labels


def supervised_warmstart(
    hf_config: Mapping[str, Any],
    examples: Sequence[Example],
    out_dir: str | Path,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    pad_id: int = 0,
    on_progress: Callable[[int, float], None] | None = None,
) -> Path:
    """Train (or reuse a cached) HF model; returns the directory holding it.

    Args:
        hf_config: a transformers config dict with `model_type` (qwen2 / qwen3).
        examples: (prompt ids, response ids); the loss covers response tokens only.
        out_dir: cache root; the model goes to out_dir/<key>/.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    key = cache_key(hf_config, examples, steps=steps, batch_size=batch_size, lr=lr, seed=seed)
    target = Path(out_dir) / key
    if (target / "model.safetensors").exists() and (target / "DONE").exists():
        log.info("warm start: reusing %s", target)
        return target

    torch.manual_seed(seed)
    rng = random.Random(seed)
    cfg_dict = dict(hf_config)
    config = AutoConfig.for_model(cfg_dict.pop("model_type"), **cfg_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - 0.9 * s / max(1, steps))
    start = time.perf_counter()
    loss_value = float("nan")
    for step in range(1, steps + 1):
        picked = rng.sample(range(len(examples)), min(batch_size, len(examples)))
        ids, attn, labels = _pad_batch([examples[i] for i in picked], pad_id)
        loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loss_value = loss.item()
        if on_progress is not None:
            on_progress(step, loss_value)
    log.info(
        "warm start: %d steps, final loss %.4f, %.1fs",
        steps,
        loss_value,
        time.perf_counter() - start,
    )

    # Ranks of one job may all run this: each writes a private temp dir, the first to
    # finish publishes it with a rename, later ones discard theirs.
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "DONE").write_text(json.dumps({"steps": steps, "final_loss": loss_value}) + "\n")
    try:
        tmp.rename(target)
    except OSError:
        if not (target / "DONE").exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target
