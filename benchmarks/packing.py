#!/usr/bin/env python
"""Packed micro-batches against padded rows: padding share and forward time.

For two length mixes:
- "demo": the CPU demo's sequences (configs/demo_cpu.yaml's synthetic arithmetic task:
  prompt text + worked solution, tokenized by the demo tokenizer, no chat template,
  responses capped at its rollout.max_new_tokens), its 16384-token budget;
- "lognormal": responses lognormal with mean 4096 tokens (log-sd 0.8) capped at 20480,
  256-token prompts; padding at full scale for the 32B presets' budgets (24576, 49152;
  lengths rounded to x8 as under TP8 sequence parallelism) and, for timing, the same
  draw and budget scaled down by --scale (default 32) so that it runs on a CPU.

it reports, side by side in one run, the fraction of padded tokens of the micro-batches
the trainer's batching code forms (`archer_mcore.actor.policy_batch`) with
parallel.pack_sequences on and off, and the forward time of `MegatronPolicy.
compute_logprobs` (the policy's own scoring pass, forward only) over the batch with
each, on one process (gloo, TP=1, megatron's local spec: a packed row's attention runs
one causal attention call per sequence and layer, the block-diagonal mask with the
masked blocks skipped, as TE's THD kernel does on GPU). The model is tiny (the
demo's shape, random weights, fp32), so the times are for comparing the two batchings
on this machine, not a GPU figure. The two runs' log-probs are compared too.

Usage:
    python benchmarks/packing.py                       # prints a markdown section
    python benchmarks/packing.py --repeats 5 --scale 16 --json out.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import replace
from typing import Any

import torch

DEMO_SHAPE = dict(  # configs/demo_cpu.yaml's model.arch
    model_type="qwen3",
    vocab_size=106,
    hidden_size=64,
    intermediate_size=192,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=32768,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)


def demo_lengths(n: int) -> tuple[list[int], list[int], int]:
    """(prompt lengths, response lengths, budget) of `n` demo sequences."""
    from archer_mcore.config import load_config
    from archer_mcore.data.arithmetic_tokenizer import build_tokenizer_object
    from archer_mcore.data.synthetic import ArithmeticTaskConfig, generate_arithmetic_rows

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "demo_cpu.yaml"))
    s = cfg.data.synthetic
    task = ArithmeticTaskConfig(
        min_operands=s.min_operands, max_operands=s.max_operands, max_value=s.max_value
    )
    tok = build_tokenizer_object()
    prompts, responses = [], []
    for row in generate_arithmetic_rows(n, task, seed=cfg.train.seed):
        prompts.append(len(tok.encode(row["prompt"][0]["content"]).ids))
        sol = len(tok.encode(row["extra_info"]["solution"]).ids)
        responses.append(max(1, min(sol, cfg.rollout.max_new_tokens)))
    return prompts, responses, cfg.parallel.micro_batch_tokens


def lognormal_lengths(n: int, seed: int) -> tuple[list[int], list[int]]:
    """256-token prompts; responses lognormal, mean 4096, log-sd 0.8, in [1, 20480]."""
    g = torch.Generator().manual_seed(seed)
    sigma = 0.8
    mu = math.log(4096) - sigma * sigma / 2
    r = torch.exp(mu + sigma * torch.randn(n, generator=g, dtype=torch.float64))
    return [256] * n, r.round().clamp(1, 20480).long().tolist()


def padding(seq: list[int], budget: int, multiple: int, pack: bool) -> dict[str, float]:
    from archer_mcore.actor.policy_batch import plan_microbatches

    plan = plan_microbatches(torch.tensor(seq), budget, seq_multiple=multiple, pack=pack)
    run = sum(plan.tokens())
    return {"microbatches": len(plan.rows), "tokens_run": run, "padded": 1 - sum(seq) / run}


def make_batch(prompts: list[int], responses: list[int], vocab: int, seed: int) -> Any:
    from archer_mcore.actor.policy_batch import PolicyBatch

    g = torch.Generator().manual_seed(seed)
    n, width, lr = len(prompts), max(p + r for p, r in zip(prompts, responses)), max(responses)
    ids = torch.randint(1, vocab, (n, width), generator=g)
    mask = torch.arange(lr).unsqueeze(0) < torch.tensor(responses).unsqueeze(1)
    return PolicyBatch(ids, torch.tensor(prompts), mask)


def time_forward(policy: Any, batch: Any, budget: int, repeats: int) -> dict[str, Any]:
    """Median seconds of compute_logprobs with packing on and off (alternating)."""
    cfgs = {
        pack: replace(
            policy.cfg,
            parallel=replace(policy.cfg.parallel, micro_batch_tokens=budget, pack_sequences=pack),
        )
        for pack in (True, False)
    }
    times: dict[bool, list[float]] = {True: [], False: []}
    out = {}
    for pack in (True, False):  # warm-up: allocator, first-call costs
        policy.cfg = cfgs[pack]
        policy.compute_logprobs(batch)
    for _ in range(repeats):
        for pack in (True, False):
            policy.cfg = cfgs[pack]
            t0 = time.perf_counter()
            logp, _ = policy.compute_logprobs(batch)
            times[pack].append(time.perf_counter() - t0)
            out[pack] = logp
    mbs = {pack: None for pack in (True, False)}
    for pack in (True, False):
        policy.cfg = cfgs[pack]
        mbs[pack] = policy._microbatches(batch)
    tokens = int(batch.seq_lengths().sum())
    seq = batch.seq_lengths()
    return {
        pack: {
            "forward_s": statistics.median(times[pack]),
            "microbatches": len(mbs[pack]),
            "padded": 1 - tokens / sum(mb.input_ids.numel() for mb in mbs[pack]),
            # causal score entries a THD kernel (packed) / a padded [b, s] kernel computes
            "attn_entries": int((seq * (seq + 1) // 2).sum())
            if pack
            else sum(mb.shape[0] * mb.shape[1] * (mb.shape[1] + 1) // 2 for mb in mbs[pack]),
        }
        for pack in (True, False)
    } | {"max_logp_diff": (out[True] - out[False]).abs().max().item(), "tokens": tokens}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sequences", type=int, default=64, help="sequences per batch")
    ap.add_argument("--scale", type=int, default=32, help="lognormal timing: lengths / scale")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)

    os.environ.setdefault("MASTER_PORT", "29513")
    torch.set_num_threads(1)
    from archer_mcore.actor.policy import MegatronPolicy
    from archer_mcore.actor.policy_config import PolicyConfig
    from archer_mcore.config import ParallelConfig

    n = args.sequences
    res: dict[str, Any] = {"sequences": n, "scale": args.scale, "repeats": args.repeats}
    dp, dr, dbudget = demo_lengths(n)
    lp, lr = lognormal_lengths(n, args.seed)
    full = [p + r for p, r in zip(lp, lr)]
    res["lognormal_full_scale"] = {
        f"{budget} x{m}": {
            "packed": padding(full, budget, m, True),
            "padded": padding(full, budget, m, False),
        }
        for budget in (24576, 49152)
        for m in (1, 8)
    }
    cfg = PolicyConfig(
        parallel=ParallelConfig(micro_batch_tokens=dbudget), with_reference=False, seed=args.seed
    )
    policy = MegatronPolicy.from_hf(DEMO_SHAPE, cfg)
    vocab = DEMO_SHAPE["vocab_size"]
    res["demo"] = time_forward(policy, make_batch(dp, dr, vocab, 1), dbudget, args.repeats)
    sp = [max(1, p // args.scale) for p in lp]
    sr = [max(1, r // args.scale) for r in lr]
    sbudget = 24576 // args.scale
    res["lognormal_scaled"] = time_forward(
        policy, make_batch(sp, sr, vocab, 2), sbudget, args.repeats
    )
    res["lognormal_scaled"]["budget"] = sbudget
    res["demo"]["budget"] = dbudget
    res["demo"]["mean_len"] = sum(p + r for p, r in zip(dp, dr)) / n
    res["demo"]["max_len"] = max(p + r for p, r in zip(dp, dr))
    res["lognormal_full_mean_len"] = sum(full) / n
    res["machine"] = f"{platform.processor() or platform.machine()}, torch {torch.__version__}"
    print(markdown(res, " ".join(["python benchmarks/packing.py", *(argv or sys.argv[1:])])))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1, default=str)
    from archer_mcore.parallel.distributed import destroy_distributed

    destroy_distributed()
    return 0


def markdown(res: dict[str, Any], command: str) -> str:
    lines = [
        "## Packed micro-batches (`benchmarks/packing.py`)",
        "",
        f"Command: `{command}` (CPU, 1 process, torch threads 1; {res['machine']}).",
        f"{res['sequences']} sequences per batch. Forward = `MegatronPolicy.compute_logprobs`"
        " (median of "
        f"{res['repeats']}) on the demo's model shape (tiny, random weights, fp32, local spec:"
        " a packed row's attention runs per sequence). Times compare the two batchings on"
        " this CPU; they are not GPU figures.",
        "",
        "| mix | budget | batching | micro-batches | padded tokens | causal score entries"
        " (THD / padded kernel) | CPU forward s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in (("demo", "demo (mean len %.0f, max %d)"), ("lognormal_scaled", None)):
        r = res[name]
        if label:
            label = label % (r["mean_len"], r["max_len"])
        else:
            label = f"lognormal 4k/20k cap, lengths / {res['scale']}"
        for pack in (True, False):
            key = pack if pack in r else str(pack).lower()
            x = r[key]
            lines.append(
                f"| {label} | {r['budget']} | {'packed' if pack else 'padded rows'} | "
                f"{x['microbatches']} | {x['padded']:.1%} | {x['attn_entries']} | "
                f"{x['forward_s']:.3f} |"
            )
        p, q = r[True], r[False]
        lines.append(
            f"| | | padded / packed | {q['microbatches'] / p['microbatches']:.2f}x | | "
            f"{q['attn_entries'] / p['attn_entries']:.2f}x | {q['forward_s'] / p['forward_s']:.2f}x |"
        )
    lines += [
        "",
        f"Full-scale lognormal draw (mean {res['lognormal_full_mean_len']:.0f} tokens, no "
        "model run): micro-batches and padded share as the trainer forms them.",
        "",
        "| budget x multiple | packed: micro-batches, padded | padded rows: micro-batches, padded |",
        "|---|---|---|",
    ]
    for k, v in res["lognormal_full_scale"].items():
        a, b = v["packed"], v["padded"]
        lines.append(
            f"| {k} | {a['microbatches']}, {a['padded']:.1%} | {b['microbatches']}, {b['padded']:.1%} |"
        )
    lines.append("")
    lines.append(
        "Causal score entries: sum of len(len+1)/2 over the sequences for packed rows (what"
        " TE's THD attention computes on GPU, and the local spec's per-sequence attention"
        " here), b x s(s+1)/2 per padded micro-batch. The local spec pays one attention call"
        " per sequence and layer, a fixed cost that dominates for many short sequences (the"
        " demo mix) on this tiny model."
    )
    lines.append("")
    lines.append(
        "Log-probs packed vs padded, max |diff|: demo "
        f"{res['demo']['max_logp_diff']:.1e}, lognormal {res['lognormal_scaled']['max_logp_diff']:.1e}."
    )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
