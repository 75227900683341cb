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
3. CUDA IPC by device UUID (item 3c): a CUDA tensor pickled for
   /update_weights_from_tensor under `rollout.cuda_ipc.uuid_device_reductions` carries
   this device's UUID (SGLang 0.5.23's contract), and a spawned process that maps the
   UUID to its own index, as SGLang's receiver does, opens the handle and reads the same
   values. (One GPU cannot show a server whose device numbering differs; the UUID is what
   makes that case work.)
5. Logits-path memory (item 6): peak GPU memory of one micro-batch's entropy/log-prob
   computation, forward + backward, from the [N, H] response rows to their gradients,
   at the 1.5B preset's head (H 1536, vocab 151,936, bf16, N = 8192 tokens), for the
   torch reference, the Triton kernels and the fused LM head, beside the planner's
   `plan.formulas.logits_bytes` for that path (on CPU: tests/actor/test_logits_memory.py
   measures the same with torch's profiler). The peak includes the output weight's
   gradient, which the planner counts there for the first two paths only.
4. TE FP8 parameters in the HF export (item 5): skipped without Transformer Engine (this
   machine has none); with TE, a te.pytorch.Linear built under fp8_model_init holds a TE
   quantized weight, `model.fp8.dequantized` gives `dequantize()`'s values and
   `load_param_` re-quantizes in place. On CPU: tests/fp8/test_fp8_param_export.py.

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


def _ipc_child(payload: str, queue: Any) -> None:
    """Receiver of check 3: maps a UUID device argument to this process's index (the
    contract of SGLang 0.5.23 `utils/patch_torch.py`, written here), then unpickles."""
    import base64
    import pickle

    from torch.multiprocessing import reductions

    original = reductions.rebuild_cuda_tensor

    def rebuild(*args: Any) -> Any:
        dev = args[6]
        if isinstance(dev, str):
            dev = next(i for i in range(torch.cuda.device_count())
                       if str(torch.cuda.get_device_properties(i).uuid) == dev)  # fmt: skip
        return original(*args[:6], dev, *args[7:])

    reductions.rebuild_cuda_tensor = rebuild
    try:
        named = pickle.loads(base64.b64decode(payload))
        queue.put({"sum": float(named[0][1].sum().item()), "device": str(named[0][1].device)})
    except Exception as e:  # reported, not raised: the parent prints the table
        queue.put({"error": f"{type(e).__name__}: {e}"})


def ipc_uuid(smoke: bool) -> dict[str, Any]:
    """Figures of check 3."""
    import base64
    import io
    import pickle

    import torch.multiprocessing as tmp

    from archer_mcore.rollout.cuda_ipc import DEVICE_ARG, device_uuid, uuid_device_reductions
    from archer_mcore.rollout.sglang_protocol import serialize_named_tensors

    if smoke:
        return {"note": "no CUDA tensor on the CPU smoke run (tests/rollout/test_cuda_ipc.py)"}
    t = torch.arange(4096, dtype=torch.float32, device="cuda")
    with uuid_device_reductions():
        payload = serialize_named_tensors([("w", t)])
    seen: list[Any] = []

    class Peek(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if name == "rebuild_cuda_tensor":
                return lambda *a: seen.append(a[DEVICE_ARG])
            return super().find_class(module, name)

    Peek(io.BytesIO(base64.b64decode(payload))).load()
    here = device_uuid(torch.cuda.current_device())
    out: dict[str, Any] = {"device_arg": seen[0] if seen else "none",
                           "is_this_uuid": bool(seen) and seen[0] == here}  # fmt: skip
    ctx = tmp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_ipc_child, args=(payload, queue))
    proc.start()
    try:
        got = queue.get(timeout=40)
    finally:
        proc.join(timeout=30)
    out["receiver"] = got.get("error") or f"sum {got['sum']:.0f} on {got['device']}"
    out["values_equal"] = "error" not in got and got["sum"] == float(t.sum().item())
    return out


def te_fp8_export(smoke: bool) -> dict[str, Any]:
    """Figures of check 4 (needs Transformer Engine)."""
    from archer_mcore.model.fp8 import dequantized, is_quantized_param, load_param_

    try:
        import transformer_engine.pytorch as te
    except ImportError:
        return {
            "skipped": "no Transformer Engine here; CPU stand-in: tests/fp8/test_fp8_param_export.py"
        }
    if smoke:
        return {"skipped": "needs a GPU"}
    try:
        with te.fp8_model_init(enabled=True):
            lin = te.Linear(256, 256, params_dtype=torch.bfloat16)
        w = lin.weight
        out: dict[str, Any] = {"weight_type": type(w).__name__, "quantized": is_quantized_param(w)}
        plain = dequantized(w, torch.bfloat16)
        out["dequantized_plain"] = type(plain) is torch.Tensor
        out["equals_dequantize"] = bool(torch.equal(plain, w.dequantize(dtype=torch.bfloat16)))
        new = torch.randn(256, 256, device=plain.device, dtype=torch.bfloat16)
        load_param_(w, new)
        back = dequantized(w, torch.float32)
        out["reload_max_rel_err"] = float(
            ((back - new.float()).abs().max() / new.float().abs().max()).item()
        )
        out["still_quantized"] = is_quantized_param(lin.weight) and lin.weight is w
        return out
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}


def _guarded(check: Any, smoke: bool) -> dict[str, Any]:
    """A check's figures, or its error as a figure (the table is printed either way)."""
    try:
        return check(smoke)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e)[:200]}"}


def logits_memory(smoke: bool) -> dict[str, Any]:
    """Check 5: peak bytes of the logits path per kernel path vs the planner's figure."""
    from functools import partial

    from archer_mcore.actor import kernel_dispatch as kd
    from archer_mcore.model.hf_config import ModelShape
    from archer_mcore.plan.formulas import logits_bytes
    from archer_mcore.plan.specs import Assumptions

    hidden_size, vocab, n = (64, 1024, 256) if smoke else (1536, 151_936, 8192)
    cuda = not smoke
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    shape = ModelShape(model_type="qwen3", vocab_size=vocab, hidden_size=hidden_size,
                       ffn_hidden_size=4 * hidden_size, num_layers=1, num_heads=16,
                       num_kv_heads=8, head_dim=128, rope_theta=1e6, rms_eps=1e-6,
                       tie_embeddings=False, qkv_bias=False, qk_norm=True,
                       max_position_embeddings=4096)  # fmt: skip
    v_pad = shape.padded_vocab_size(1)
    paths = (
        ("torch", partial(kd.output_layer_entropy_and_logprob, mode="torch"), "chunked"),
        ("triton", partial(kd.output_layer_entropy_and_logprob, mode="triton"), "fused"),
        ("triton_lm_head", partial(kd.lm_head_entropy_and_logprob, mode="triton"),
         "fused_lm_head"),
    )  # fmt: skip
    g = torch.Generator(device=dev).manual_seed(0)
    out: dict[str, Any] = {"tokens": n, "vocab_padded": v_pad}
    for label, fn, planned_path in paths:
        hidden = torch.randn(n, hidden_size, generator=g, device=dev).to(dtype).requires_grad_()
        weight = (0.02 * torch.randn(v_pad, hidden_size, generator=g, device=dev)).to(dtype)
        weight.requires_grad_()
        tokens = torch.randint(0, vocab, (n,), generator=g, device=dev)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        ent, lp = fn(hidden, weight, tokens, 1.0, vocab_start=0, vocab_size=vocab)
        (ent.float().sum() + lp.float().sum()).backward()
        planned = logits_bytes(shape, n, 1, path=planned_path, assume=Assumptions(),
                               element_bytes=torch.finfo(dtype).bits // 8)  # fmt: skip
        out[f"{label}_planned_GB"] = planned / 1e9
        if cuda:
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            out[f"{label}_peak_GB"] = peak / 1e9
            out[f"{label}_peak_over_planned"] = peak / planned
        else:
            out[f"{label}_peak_GB"] = "not measured on CPU (tests/actor/test_logits_memory.py)"
        del hidden, weight, tokens, ent, lp
    return out


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
        "ipc_uuid": _guarded(ipc_uuid, args.smoke),
        "te_fp8_export": te_fp8_export(args.smoke),
        "logits_memory": _guarded(logits_memory, args.smoke),
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
          and str(res["device_rule"]["cpu_tensor_on_default"]).startswith("refused")
          and (args.smoke or (res["ipc_uuid"].get("is_this_uuid") and res["ipc_uuid"].get("values_equal")))
          and "error" not in res["te_fp8_export"]
          and "error" not in res["logits_memory"])  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
