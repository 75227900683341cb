"""Shared helpers for the megatron tests: tiny Qwen checkpoints and spawned gloo workers."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import mcore_workers
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_hf_config(model_type: str, **overrides: Any) -> dict[str, Any]:
    """2 layers (divisible by pp=2), 2 KV groups (divisible by tp=2), vocab 100 (padded
    to 128 at every TP, so vocab padding is exercised). Qwen2 is tied, Qwen3
    untied with head_dim 16 != hidden/heads, non-default RoPE theta and eps."""
    cfg: dict[str, Any] = dict(
        model_type=model_type,
        vocab_size=100,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        rope_theta=50000.0,
        initializer_range=0.2,
        tie_word_embeddings=model_type == "qwen2",
    )
    if model_type == "qwen3":
        cfg["head_dim"] = 16
    cfg.update(overrides)
    return cfg


def save_tiny_hf(model_type: str, out_dir: Path, seed: int = 0, **overrides: Any) -> Path:
    """A random tiny transformers model saved with save_pretrained (float32).
    Norm weights are randomised too, so that a swapped norm would show."""
    from transformers import AutoConfig, AutoModelForCausalLM

    d = tiny_hf_config(model_type, **overrides)
    cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.copy_(
                    1.0 + 0.3 * torch.randn_like(p) if "norm" in name else 0.3 * torch.randn_like(p)
                )
    model.save_pretrained(out_dir)
    return out_dir


def hf_logits(model_dir: Path, input_ids: torch.Tensor) -> torch.Tensor:
    """transformers' own float32 forward: [b, s, vocab]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.no_grad():
        return model.eval()(input_ids).logits


def spawn(
    task: str, world: int, payload: dict[str, Any], tmp: Path, timeout_s: float = 120.0
) -> dict[str, Any]:
    """Run `mcore_workers.<task>` on `world` gloo processes; returns rank 0's result dict."""
    result = tmp / f"{task}_result.json"
    mp.start_processes(
        mcore_workers.entry,
        args=(world, free_port(), task, payload, str(result)),
        nprocs=world,
        join=True,
        start_method="spawn",
    )
    return json.loads(result.read_text())


def four_row_batch(vocab: int, seed: int, width: int) -> dict[str, Any]:
    """A hand-made 4-row policy batch (as JSON-ready lists for a spawned worker):
    prompts of 2, 3, 1, 4 tokens, responses of 5, 2, 6, 3 (6 response positions), random
    token ids in [1, vocab) over `width` positions, old log-probs around -2 and fixed
    advantages; `seed` makes the ids and log-probs."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.tensor([2, 3, 1, 4])
    resp = torch.tensor([5, 2, 6, 3])
    ids = torch.randint(1, vocab, (4, width), generator=g)
    mask = torch.arange(6).unsqueeze(0) < resp.unsqueeze(1)
    return {
        "input_ids": ids.tolist(),
        "prompt_lengths": prompt.tolist(),
        "response_mask": mask.tolist(),
        "old_logp": (-2.0 + 0.3 * torch.randn(4, 6, generator=g)).tolist(),
        "advantages": [1.0, -0.5, 0.8, -1.2],
    }
