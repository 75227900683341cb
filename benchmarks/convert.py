#!/usr/bin/env python
"""Throughput of the streaming megatron -> HF weight export (what rollout weight sync
runs every step): a randomly initialised Qwen2-0.5B-shaped GPTModel (vocab 151,936,
hidden 896, 24 layers, 14 heads / 2 KV groups, FFN 4,864, tied embeddings) is exported
with `iter_hf_buckets`; GB/s = bytes of HF tensors yielded / wall time of the loop
(TP all-gathers, QKV / gate-up unfusing, vocab un-padding, copies into buckets).

Usage (CPU):  python benchmarks/convert.py [--tp 1] [--dtype bf16] [--bucket-mb 512] [--repeats 3]
              python benchmarks/convert.py --layers 2        (quick smoke run)
--tp N spawns N gloo processes on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.multiprocessing as mp

QWEN2_05B = {
    "model_type": "qwen2",
    "vocab_size": 151936,
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": True,
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MODEL_DTYPES = {"bf16": "bfloat16", "fp32": "float32"}  # model.params_dtype values


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, out_path: str) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(max(1, args.threads // world))
    from archer_mcore.config import ModelConfig
    from archer_mcore.model.build import build_gpt_model
    from archer_mcore.model.hf_config import shape_from_hf_config
    from archer_mcore.model.weights import iter_hf_buckets
    from archer_mcore.parallel.distributed import destroy_distributed, init_distributed

    init_distributed(tp=world, pp=1)
    try:
        cfg = dict(QWEN2_05B, num_hidden_layers=args.layers)
        shape = shape_from_hf_config(cfg)
        model, _, _ = build_gpt_model(shape, ModelConfig(params_dtype=MODEL_DTYPES[args.dtype]))
        n_params = sum(p.numel() for p in model.parameters())
        times, nbytes = [], 0
        for _ in range(args.repeats):
            torch.distributed.barrier()
            t0 = time.perf_counter()
            nbytes = 0
            for bucket in iter_hf_buckets(model, shape, bucket_bytes=args.bucket_mb * 1024**2):
                nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
            times.append(time.perf_counter() - t0)
        if rank == 0:
            best = min(times)
            res = {
                "tp": world,
                "dtype": args.dtype,
                "layers": args.layers,
                "params_per_rank": n_params,
                "hf_bytes": nbytes,
                "seconds": times,
                "best_gb_per_s": nbytes / best / 1e9,
                "median_gb_per_s": nbytes / statistics.median(times) / 1e9,
            }
            with open(out_path, "w") as f:
                json.dump(res, f)
    finally:
        destroy_distributed()


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--bucket-mb", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, default=QWEN2_05B["num_hidden_layers"])
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = f"/tmp/archer_convert_bench_{os.getpid()}.json"
    mp.start_processes(
        _worker, args=(args.tp, port, args, out), nprocs=args.tp, start_method="spawn"
    )
    with open(out) as f:
        res = json.load(f)
    os.unlink(out)
    print(json.dumps(res, indent=1))
    print(
        f"streaming HF export, Qwen2-0.5B shape ({args.layers} layers), {args.dtype}, TP={args.tp}: "
        f"{res['hf_bytes'] / 1e9:.3f} GB in {min(res['seconds']):.3f} s best -> "
        f"{res['best_gb_per_s']:.2f} GB/s (median {res['median_gb_per_s']:.2f} GB/s)"
    )


if __name__ == "__main__":
    main()
