#!/usr/bin/env python
"""The checks of issue 21 ("ready for the first GPU job") that only a GPU can make.

1. Default-group device rule: the default group is NCCL (`parallel.distributed.
   default_backend()`), which refuses a CPU tensor; the trainer's host-side
   collectives go to `parallel.ranks.control_group()`, a gloo group, and succeed.
   (One GPU holds one NCCL rank: two ranks on one GPU is what NCCL refuses, so the
   check runs at world size 1, where the dispatch by device still happens.)
2. Autotune count of the fused LM head: forward + backward over 20 micro-batches of
   varying token counts at the 1.5B preset's shape (H 1536, vocab 151,936, bf16);
   reported: how many configurations the stats and grad kernels tuned (one per key),
   the first and the median call's time. Before issue 21 the grad kernel re-tuned for
   most micro-batches (tests/kernels/test_autotune_keys.py counts the keys on CPU).

Prints a markdown table; `--json PATH` writes the figures. Stops by itself: the
micro-batches are few and small, and gpu_check.sh caps it with `timeout`.

    python benchmarks/gpu_first_run.py [--json PATH]   # one GPU
    python benchmarks/gpu_first_run.py --smoke         # CPU: the same code, tiny shapes
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist


def device_rule(smoke: bool) -> dict[str, Any]:
    """Figures of check 1 (world size 1 on this process)."""
    from archer_mcore.parallel import distributed, ranks

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # on the CPU smoke run a default group that serves only CUDA stands in for NCCL
    backend = "cuda:gloo" if smoke else distributed.default_backend()
    dist.init_process_group(backend=backend, rank=0, world_size=1)
    try:
        out: dict[str, Any] = {"backend": str(dist.get_backend_config())}
        config = str(dist.get_backend_config())  # e.g. "cuda:nccl", "cpu:gloo,cuda:gloo"
        out["default_serves_cpu"] = any(p.split(":", 1)[0] == "cpu" for p in config.split(","))
        try:
            dist.all_reduce(torch.zeros(1))
            out["cpu_tensor_on_default"] = "accepted"
        except RuntimeError as e:
            out["cpu_tensor_on_default"] = f"refused: {str(e).splitlines()[0][:80]}"
        group = ranks.control_group()
        t = torch.ones(1)
        dist.all_reduce(t, group=group)
        box: list[Any] = [{"step": 1}]
        dist.broadcast_object_list(box, src=0, group=group)
        out["control_group"] = str(dist.get_backend_config(group))
        out["control_collectives"] = "ok" if t.item() == 1.0 and box[0] == {"step": 1} else "wrong"
        return out
    finally:
        dist.destroy_process_group()


def autotune_count(smoke: bool, n_batches: int = 20) -> dict[str, Any]:
    """Figures of check 2."""
    from archer_mcore.kernels import fused_lm_head as fh

    device = torch.device("cpu" if smoke else "cuda")
    h, v = (32, 300) if smoke else (1536, 151_936)
    lo, hi = (40, 70) if smoke else (28_000, 34_816)
    dtype = torch.float32 if smoke else torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(v, h, generator=gen) * 0.02).to(device=device, dtype=dtype)
    weight.requires_grad_(True)
    counts = torch.randint(lo, hi + 1, (n_batches,), generator=gen).tolist()
    times = []
    for n in counts:
        hidden = torch.randn(n, h, generator=gen).to(device=device, dtype=dtype)
        hidden.requires_grad_(True)
        tokens = torch.randint(0, v, (n,), generator=gen).to(device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        ent, logp = fh.fused_lm_head_entropy_logprob(hidden, weight, tokens)
        (ent.sum() * 1e-3 - logp.sum()).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return {
        "micro_batches": n_batches,
        "tokens": f"{min(counts)}..{max(counts)}",
        "stats_tunings": len(fh._stats_tuned.cache),
        "grad_tunings": len(fh._grad_tuned.cache),
        "first_s": times[0],
        "median_s": statistics.median(times),
        "note": "no autotuning on the CPU interpreter" if smoke else "",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (interpreter)")
    p.add_argument("--json", default="", help="also write the figures here")
    args = p.parse_args(argv)
    if args.smoke and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--smoke runs the Triton kernels interpreted: set TRITON_INTERPRET=1")
    if not args.smoke and not torch.cuda.is_available():
        p.error("no GPU: run with --smoke for the CPU check")
    res = {
        "device_rule": device_rule(args.smoke),
        "autotune": autotune_count(args.smoke, n_batches=4 if args.smoke else 20),
    }
    print("| check | figure | value |\n|---|---|---|")
    for check, figures in res.items():
        for k, val in figures.items():
            shown = f"{val:.3f}" if isinstance(val, float) else val
            print(f"| {check} | {k} | {shown} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    ok = (res["device_rule"]["control_collectives"] == "ok"
          and str(res["device_rule"]["cpu_tensor_on_default"]).startswith("refused"))  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
