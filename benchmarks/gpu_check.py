#!/usr/bin/env python
"""Policy train step on a Qwen3-0.6B-shaped model with each kernel path, side by side.

For every path (kernels.mode x kernels.fused_lm_head: torch, triton, torch+lm_head,
triton+lm_head) one MegatronPolicy (TP=PP=DP=1, bf16, random weights of Qwen3-0.6B's
shape, no reference copy) runs, on the same batch of `--rows` sequences of `--seq`
tokens (prompt `--prompt` + response): a warm-up, then `--repeat` x (the old-log-prob
scoring pass + one optimizer step). Reported per path: scoring and train-step
tokens/s, train-step MFU (model FLOPs / time / the GPU's dense BF16 peak), peak
memory, and the largest log-prob difference from the torch path (same weights: every
path must compute the same numbers).

Model FLOPs per token (forward): 2 x matmul parameters (layers + LM head) plus causal
attention 2 x 2 x layers x (heads x head_dim) x seq / 2; a train step is 3 forwards.

Usage (one GPU):  python benchmarks/gpu_check.py [--out DIR]
Smoke (CPU):      TRITON_INTERPRET=1 python benchmarks/gpu_check.py --smoke
benchmarks/gpu_check.sh runs this and benchmarks/kernel_bench.py together.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import socket
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

# Qwen3-0.6B's config.json (Qwen/Qwen3-0.6B): the shape only, weights are random.
QWEN3_06B = dict(
    model_type="qwen3",
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1000000.0,
    tie_word_embeddings=True,
    initializer_range=0.02,
)
TINY = dict(
    QWEN3_06B,
    vocab_size=300,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)
PATHS = [("torch", False), ("triton", False), ("torch", True), ("triton", True)]
# Dense BF16 tensor-core peaks (datasheets; the same table as archer_mcore.plan.specs).
BF16_PEAK = {"H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12}


@dataclass
class PathResult:
    path: str
    score_tokens_per_s: float
    train_tokens_per_s: float
    train_mfu: float | None
    peak_memory_gib: float | None
    max_abs_logprob_diff_vs_torch: float
    loss: float


def flops_per_token(cfg: dict, seq: int) -> float:
    """Forward FLOPs per token (see the module docstring)."""
    h, layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    q = cfg["num_attention_heads"] * cfg["head_dim"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * cfg["intermediate_size"]
    matmul = layers * per_layer + h * cfg["vocab_size"]
    attention = 2 * 2 * layers * q * seq / 2
    return 2 * matmul + attention


def make_batch(rows: int, seq: int, prompt: int, vocab: int, seed: int = 0):
    from archer_mcore.actor.policy_batch import PolicyBatch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    resp = seq - prompt
    return PolicyBatch(
        input_ids=ids,
        prompt_lengths=torch.full((rows,), prompt),
        response_mask=torch.ones(rows, resp, dtype=torch.bool),
        advantages=torch.randn(rows, generator=g),
    )


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_path(mode: str, fused: bool, args: argparse.Namespace, hf: dict, batch, peak: float | None):
    from archer_mcore.actor.policy import MegatronPolicy
    from archer_mcore.actor.policy_config import PolicyConfig
    from archer_mcore.algo.losses import LossConfig
    from archer_mcore.config import (
        ArcherRuleConfig,
        KernelsConfig,
        ModelConfig,
        OptimizerConfig,
        ParallelConfig,
    )
    from archer_mcore.parallel.distributed import init_model_parallel

    cfg = PolicyConfig(
        model=ModelConfig(params_dtype="bfloat16" if not args.smoke else "float32"),
        parallel=ParallelConfig(micro_batch_tokens=args.seq),
        optimizer=OptimizerConfig(lr=1e-6, weight_decay=0.0),
        kernels=KernelsConfig(mode=mode, fused_lm_head=fused),
        with_reference=False,
        seed=1234,
    )
    init_model_parallel(1, 1, cfg.seed)  # re-seeded: every path starts from the same weights
    policy = MegatronPolicy.from_hf(hf, cfg, init_dist=False)
    loss_cfg = LossConfig(token_rule=ArcherRuleConfig(), agg_mode="token-mean")
    tokens = batch.size * args.seq
    first_logp = None
    score_s = train_s = 0.0
    loss = float("nan")
    for it in range(1 + args.repeat):  # iteration 0 warms up (compiles, allocates)
        if it == 1 and torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        _sync()
        t0 = time.perf_counter()
        logp, _ = policy.compute_logprobs(batch)
        _sync()
        t1 = time.perf_counter()
        metrics = policy.train_step(replace(batch, old_logp=logp), loss_cfg)
        _sync()
        t2 = time.perf_counter()
        if it == 0:
            first_logp = logp.float().cpu()
            loss = metrics["loss"]
        else:
            score_s += t1 - t0
            train_s += t2 - t1
    n = max(args.repeat, 1)
    train_tps = tokens * n / train_s
    mfu = 3 * flops_per_token(hf, args.seq) * train_tps / peak if peak else None
    mem = torch.cuda.max_memory_allocated() / 1024**3 if torch.cuda.is_available() else None
    del policy
    gc.collect()  # the next path's peak memory must not include this one's model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return (
        PathResult(
            path=mode + ("+lm_head" if fused else ""),
            score_tokens_per_s=tokens * n / score_s,
            train_tokens_per_s=train_tps,
            train_mfu=mfu,
            peak_memory_gib=mem,
            max_abs_logprob_diff_vs_torch=0.0,
            loss=loss,
        ),
        first_logp,
    )


def markdown(results: list[PathResult], base: PathResult) -> str:
    lines = [
        "| path | score tok/s | train tok/s | train vs torch | train MFU | peak GiB | max abs dlogp |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        mfu = f"{100 * r.train_mfu:.1f}%" if r.train_mfu is not None else "-"
        mem = f"{r.peak_memory_gib:.2f}" if r.peak_memory_gib is not None else "-"
        lines.append(
            f"| {r.path} | {r.score_tokens_per_s:,.0f} | {r.train_tokens_per_s:,.0f} | "
            f"{r.train_tokens_per_s / base.train_tokens_per_s:.2f}x | {mfu} | {mem} | "
            f"{r.max_abs_logprob_diff_vs_torch:.2e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU (interpreter)")
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write gpu_check.json here")
    parser.add_argument("--peak-tflops", type=float, default=None, help="override BF16 peak")
    args = parser.parse_args(argv)
    if args.smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            parser.error("--smoke runs the Triton kernels interpreted: set TRITON_INTERPRET=1")
        args.seq, args.prompt, args.rows, args.repeat = 32, 8, 2, 1
        hf = TINY
    elif not torch.cuda.is_available():
        parser.error("no GPU: run with --smoke for the CPU check")
    else:
        hf = QWEN3_06B
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    from archer_mcore.parallel.distributed import destroy_distributed, init_distributed

    init_distributed(1, 1, 1234)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (interpreter)"
    peak = args.peak_tflops * 1e12 if args.peak_tflops else None
    if peak is None:
        peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
    batch = make_batch(args.rows, args.seq, args.prompt, hf["vocab_size"])
    results: list[PathResult] = []
    base_logp = None
    try:
        for mode, fused in PATHS:
            res, logp = run_path(mode, fused, args, hf, batch, peak)
            if base_logp is None:
                base_logp = logp
            res.max_abs_logprob_diff_vs_torch = float((logp - base_logp).abs().max())
            results.append(res)
            print(f"{res.path}: {res.train_tokens_per_s:,.0f} train tok/s", flush=True)
    finally:
        destroy_distributed()
    shape = "Qwen3-0.6B shape" if not args.smoke else "tiny smoke shape"
    print(
        f"\n# Policy train step, {shape}, {args.rows} x {args.seq} tokens, on {name}, "
        f"torch {torch.__version__}\n"
    )
    print(markdown(results, results[0]))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_check.json").write_text(
            json.dumps(
                {
                    "device": name,
                    "torch": torch.__version__,
                    "model": hf,
                    "rows": args.rows,
                    "seq": args.seq,
                    "results": [asdict(r) for r in results],
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
