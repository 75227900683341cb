#!/usr/bin/env python
"""Benchmark the fused kernels against torch eager, torch.compile and Liger-Kernel.

Kernel 1 (entropy + log-prob from logits [N, V]) and kernel 2 (the same from hidden
states [N, H] and the output weight [V, H]), bf16 inputs, Qwen's vocabulary of 151,936.
For every shape and implementation: forward time (the no-grad old/reference log-prob
passes), forward+backward time, and peak extra memory (max allocated during the call
minus what was allocated before it: inputs excluded, outputs and gradients included).

Floors printed beside them:
- kernel 1: bytes it must move (forward: read the logits; backward: read them again and
  write their gradient) / the measured device copy bandwidth;
- kernel 2: the bare LM-head matmuls (forward h @ W^T; backward the two gradient
  matmuls) with cuBLAS.

Targets: kernel 1 >= 80% of copy bandwidth; kernel 2 <= 1.15x the bare matmul time with
peak extra memory < 10% of the materialised-logits path (torch eager).

Usage (GPU):   python benchmarks/kernel_bench.py [--tokens 16384 32768 65536] [--hidden 1536 5120]
Smoke (CPU):   python benchmarks/kernel_bench.py --smoke   (tiny shapes, Triton interpreter)

Liger-Kernel is used if `liger_kernel` imports; it computes the log-prob (cross entropy)
only, no entropy, so its rows do less work than the others.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

if "--smoke" in sys.argv:
    # The Triton interpreter must be chosen before triton is first imported.
    os.environ["TRITON_INTERPRET"] = "1"

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from archer_mcore.kernels.entropy_logprob import entropy_and_logprob
from archer_mcore.kernels.fused_lm_head import fused_lm_head_entropy_logprob

QWEN_VOCAB = 151_936
GiB = 1 << 30


# ---------------------------------------------------------------- implementations


def eager_entropy_logprob(logits: torch.Tensor, tokens: torch.Tensor, temperature: float):
    """The materialised reference: fp32 log_softmax over the whole vocabulary."""
    logp_all = torch.log_softmax(logits.float() / temperature, dim=-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    logprob = logp_all.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return entropy, logprob


def eager_lm_head(hidden, weight, tokens, temperature: float):
    return eager_entropy_logprob(hidden @ weight.t(), tokens, temperature)


def _liger():
    try:
        from liger_kernel.transformers import (
            LigerCrossEntropyLoss,
            LigerFusedLinearCrossEntropyLoss,
        )
    except Exception as exc:  # optional dependency; any import failure means "absent"
        return None, f"liger_kernel unavailable ({type(exc).__name__})"
    return (LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss), ""


# ---------------------------------------------------------------- measurement


@dataclass
class Row:
    case: str
    impl: str
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    peak_fwd: int | None = None  # bytes
    peak_fwd_bwd: int | None = None  # bytes
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, repeat: int) -> float:
    """Median wall time of fn() in milliseconds (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_bytes(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak allocated memory during fn() above what was allocated before (CUDA only)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    _sync(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak


def measure(
    row: Row,
    forward: Callable[[], object],
    forward_backward: Callable[[], object],
    device: torch.device,
    warmup: int,
    repeat: int,
) -> Row:
    """Fill the row's times and memory; OOM or other failures become a note."""
    try:
        with torch.no_grad():
            row.fwd_ms = time_ms(forward, device, warmup, repeat)
            row.peak_fwd = peak_extra_bytes(forward, device)
        row.fwd_bwd_ms = time_ms(forward_backward, device, warmup, repeat)
        row.peak_fwd_bwd = peak_extra_bytes(forward_backward, device)
    except torch.OutOfMemoryError:
        row.note = (row.note + " OOM").strip()
    except Exception as exc:  # a failing baseline must not end the benchmark
        row.note = (row.note + f" failed: {type(exc).__name__}: {str(exc)[:80]}").strip()
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def copy_bandwidth(device: torch.device, nbytes: int, warmup: int, repeat: int) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, warmup, repeat)
    return 2 * nbytes / (ms / 1e3)


# ---------------------------------------------------------------- kernel 1


def bench_logits(n: int, v: int, device: torch.device, args, compile_ok: bool) -> list[Row]:
    case = f"K1 logits N={n} V={v}"
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(n, v, device=device, dtype=torch.bfloat16, generator=gen)
    tokens = torch.randint(0, v, (n,), device=device, generator=gen)
    t = 1.0

    def fwd_bwd(fn):
        def run():
            z = logits.detach().requires_grad_()
            h, lp = fn(z, tokens, t)
            (h.sum() + lp.sum()).backward()
            return z.grad

        return run

    rows = []
    impls: list[tuple[str, Callable, str]] = [
        ("torch eager (log_softmax)", eager_entropy_logprob, "")
    ]
    if compile_ok:
        impls.append(("torch.compile", torch.compile(eager_entropy_logprob, dynamic=False), ""))
    impls.append(("ours (Triton)", entropy_and_logprob, ""))
    for name, fn, note in impls:
        row = Row(case, name, note=note)
        rows.append(
            measure(
                row,
                lambda fn=fn: fn(logits, tokens, t),
                fwd_bwd(fn),
                device,
                args.warmup,
                args.repeat,
            )
        )
    liger, why = _liger()
    row = Row(case, "Liger cross entropy", note="log-prob only (no entropy)")
    if liger is None:
        row.note = why
    else:
        ce = liger[0](reduction="sum")

        def liger_fwd():
            return ce(logits, tokens)

        def liger_fwd_bwd():
            z = logits.detach().clone().requires_grad_()
            ce(z, tokens).backward()
            return z.grad

        measure(row, liger_fwd, liger_fwd_bwd, device, args.warmup, args.repeat)
    rows.append(row)

    # Floor: bytes that must move / copy bandwidth.
    elt = logits.element_size()
    floor = Row(case, "floor: bytes / copy BW")
    if device.type == "cuda":
        bw = copy_bandwidth(device, min(2 * GiB, n * v * elt), args.warmup, args.repeat)
        floor.fwd_ms = n * v * elt / bw * 1e3
        floor.fwd_bwd_ms = 3 * n * v * elt / bw * 1e3
        floor.note = f"copy BW {bw / 1e9:.0f} GB/s"
    else:
        floor.note = "needs a GPU"
    rows.append(floor)
    ours = next(r for r in rows if r.impl.startswith("ours"))
    if floor.fwd_ms and ours.fwd_ms and ours.fwd_bwd_ms:
        ours.extra["fwd_bw_frac"] = floor.fwd_ms / ours.fwd_ms
        ours.extra["fwd_bwd_bw_frac"] = floor.fwd_bwd_ms / ours.fwd_bwd_ms
    return rows


# ---------------------------------------------------------------- kernel 2


def bench_lm_head(
    n: int, h: int, v: int, device: torch.device, args, compile_ok: bool
) -> list[Row]:
    case = f"K2 LM head N={n} H={h} V={v}"
    gen = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(n, h, device=device, dtype=torch.bfloat16, generator=gen)
    weight = (torch.randn(v, h, device=device, generator=gen) / h**0.5).to(torch.bfloat16)
    tokens = torch.randint(0, v, (n,), device=device, generator=gen)
    t = 1.0

    def fwd_bwd(fn):
        def run():
            hd = hidden.detach().requires_grad_()
            wd = weight.detach().requires_grad_()
            ent, lp = fn(hd, wd, tokens, t)
            (ent.sum() + lp.sum()).backward()
            return hd.grad, wd.grad

        return run

    rows = []
    impls: list[tuple[str, Callable]] = [("torch eager (matmul + log_softmax)", eager_lm_head)]
    if compile_ok:
        impls.append(("torch.compile", torch.compile(eager_lm_head, dynamic=False)))
    impls.append(("ours (Triton, tl.dot tiles)", fused_lm_head_entropy_logprob))
    impls.append(
        (
            "ours (Triton + cuBLAS chunks)",
            partial(fused_lm_head_entropy_logprob, recompute="cublas"),
        )
    )
    for name, fn in impls:
        row = Row(case, name)
        rows.append(
            measure(
                row,
                lambda fn=fn: fn(hidden, weight, tokens, t),
                fwd_bwd(fn),
                device,
                args.warmup,
                args.repeat,
            )
        )
    liger, why = _liger()
    row = Row(case, "Liger fused linear CE", note="log-prob only (no entropy)")
    if liger is None:
        row.note = why
    else:
        flce = liger[1](reduction="sum")

        def liger_fwd():
            return flce(weight, hidden, tokens)

        def liger_fwd_bwd():
            hd = hidden.detach().requires_grad_()
            wd = weight.detach().requires_grad_()
            flce(wd, hd, tokens).backward()
            return hd.grad, wd.grad

        measure(row, liger_fwd, liger_fwd_bwd, device, args.warmup, args.repeat)
    rows.append(row)

    floor = matmul_floor(case, hidden, weight, device, args)
    rows.append(floor)

    eager = rows[0]
    for ours in (r for r in rows if r.impl.startswith("ours")):
        if floor.fwd_ms and ours.fwd_ms and ours.fwd_bwd_ms:
            ours.extra["fwd_vs_matmul"] = ours.fwd_ms / floor.fwd_ms
            ours.extra["fwd_bwd_vs_matmul"] = ours.fwd_bwd_ms / floor.fwd_bwd_ms
        if ours.peak_fwd_bwd is not None:
            # Against eager's measured peak, or (if eager ran out of memory) the bf16
            # logits alone, a lower bound on the materialised path.
            materialised = eager.peak_fwd_bwd or n * v * hidden.element_size()
            ours.extra["mem_vs_materialised"] = ours.peak_fwd_bwd / materialised
    return rows


def matmul_floor(case: str, hidden, weight, device: torch.device, args) -> Row:
    """cuBLAS time of the LM head's forward matmul and its two backward matmuls."""
    floor = Row(case, "floor: bare LM-head matmuls")
    try:
        logits = hidden @ weight.t()
        grad_h = torch.empty_like(hidden)
        grad_w = torch.empty_like(weight)
    except torch.OutOfMemoryError:
        floor.note = "OOM"
        return floor

    def forward_mm():
        torch.mm(hidden, weight.t(), out=logits)

    def backward_mms():
        torch.mm(logits, weight, out=grad_h)
        torch.mm(logits.t(), hidden, out=grad_w)

    floor.fwd_ms = time_ms(forward_mm, device, args.warmup, args.repeat)
    floor.fwd_bwd_ms = floor.fwd_ms + time_ms(backward_mms, device, args.warmup, args.repeat)
    return floor


# ---------------------------------------------------------------- report


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _mem(x: int | None) -> str:
    return "-" if x is None else f"{x / GiB:.2f}"


def markdown(rows: list[Row]) -> str:
    lines = [
        "| case | implementation | fwd ms | fwd+bwd ms | peak extra fwd GiB | peak extra fwd+bwd GiB | vs floor | note |",
        "|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        vs = []
        if "fwd_bw_frac" in r.extra:
            vs.append(
                f"fwd {r.extra['fwd_bw_frac']:.0%} / fwd+bwd {r.extra['fwd_bwd_bw_frac']:.0%} of copy BW"
            )
        if "fwd_vs_matmul" in r.extra:
            vs.append(
                f"fwd {r.extra['fwd_vs_matmul']:.2f}x / fwd+bwd {r.extra['fwd_bwd_vs_matmul']:.2f}x matmul"
            )
        if "mem_vs_materialised" in r.extra:
            vs.append(f"mem {r.extra['mem_vs_materialised']:.1%} of materialised")
        lines.append(
            f"| {r.case} | {r.impl} | {_ms(r.fwd_ms)} | {_ms(r.fwd_bwd_ms)} | {_mem(r.peak_fwd)} | "
            f"{_mem(r.peak_fwd_bwd)} | {'; '.join(vs) or '-'} | {r.note or '-'} |"
        )
    return "\n".join(lines)


def targets(rows: list[Row]) -> list[str]:
    """One line per checked target: PASS / FAIL with the measured value."""
    out = []
    for r in rows:
        if "fwd_bw_frac" in r.extra:
            ok = r.extra["fwd_bw_frac"] >= 0.8 and r.extra["fwd_bwd_bw_frac"] >= 0.8
            out.append(
                f"{'PASS' if ok else 'FAIL'} {r.case}, {r.impl}: >= 80% of copy BW "
                f"(fwd {r.extra['fwd_bw_frac']:.0%}, fwd+bwd {r.extra['fwd_bwd_bw_frac']:.0%})"
            )
        if "fwd_vs_matmul" in r.extra:
            ok = r.extra["fwd_vs_matmul"] <= 1.15
            out.append(
                f"{'PASS' if ok else 'FAIL'} {r.case}, {r.impl}: fwd <= 1.15x bare matmul "
                f"({r.extra['fwd_vs_matmul']:.2f}x; fwd+bwd {r.extra['fwd_bwd_vs_matmul']:.2f}x, "
                "which recomputes the logits once)"
            )
        if "mem_vs_materialised" in r.extra:
            ok = r.extra["mem_vs_materialised"] < 0.10
            out.append(
                f"{'PASS' if ok else 'FAIL'} {r.case}, {r.impl}: peak extra memory < 10% of materialised "
                f"({r.extra['mem_vs_materialised']:.1%})"
            )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny shapes on CPU under the Triton interpreter"
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 32768, 65536])
    parser.add_argument("--hidden", type=int, nargs="+", default=[1536, 5120])
    parser.add_argument("--vocab", type=int, default=QWEN_VOCAB)
    parser.add_argument("--kernels", type=int, nargs="+", choices=[1, 2], default=[1, 2])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument(
        "--compile", action="store_true", help="keep the torch.compile rows in --smoke mode"
    )
    args = parser.parse_args(argv)

    if args.smoke:
        device = torch.device("cpu")
        args.tokens, args.hidden, args.vocab = [16], [32], 300
        args.warmup, args.repeat = 0, 1
        # Inductor's CPU build takes about a minute per function on a small machine.
        args.no_compile = args.no_compile or not args.compile
    elif torch.cuda.is_available():
        device = torch.device("cuda")
    else:
        parser.error("no GPU: run with --smoke for the CPU interpreter check")

    name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    )
    print(f"# Fused kernel benchmark on {name}, torch {torch.__version__}, bf16\n")
    rows: list[Row] = []
    for n in args.tokens:
        if 1 in args.kernels:
            rows += bench_logits(n, args.vocab, device, args, not args.no_compile)
        if 2 in args.kernels:
            for h in args.hidden:
                rows += bench_lm_head(n, h, args.vocab, device, args, not args.no_compile)
    print(markdown(rows))
    print()
    if args.smoke:
        print("(smoke run: CPU interpreter timings say nothing about GPU targets)")
    for line in targets(rows):
        print(f"- {line}")
    ours = [r for r in rows if r.impl.startswith("ours")]
    return 0 if all(r.fwd_ms is not None and r.fwd_bwd_ms is not None for r in ours) else 1


if __name__ == "__main__":
    sys.exit(main())
