"""Compile every kernel for a CUDA architecture without a GPU (ptxas ships with triton).

The Triton interpreter accepts some programs that the compiler rejects, so CI runs this
(in a process without TRITON_INTERPRET) to check that the kernels build for Hopper:

    python -m archer_mcore.kernels.compile_check --arch 90

Prints one line per compiled variant and exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def _variants(
    dtypes: tuple[str, ...] = ("bf16", "fp32"),
) -> list[tuple[Any, dict[str, str], dict[str, Any], dict[str, int]]]:
    """(kernel, argument types, constexprs, options) for each variant we ship, for
    logits / hidden states of the given dtypes (the loss kernels are fp32)."""
    from archer_mcore.kernels import entropy_logprob as k1
    from archer_mcore.kernels import fused_lm_head as k2
    from archer_mcore.kernels import fused_loss as k3

    out = []
    for dt in dtypes:
        row = dict(tok_ptr="*i64", n_rows="i32", V="i32", vocab_start="i32", inv_t="fp32")
        out.append((
            k1._stats_kernel,
            dict(row, z_ptr=f"*{dt}", stats_ptr="*fp32", z_stride="i64"),
            {"BLOCK_V": k1._BLOCK_V_GPU},
            {"num_warps": 16},
        ))  # fmt: skip
        out.append((
            k1._grad_kernel,
            dict(row, z_ptr=f"*{dt}", g_ptr=f"*{dt}", row_ptr="*fp32", gh_ptr="*fp32",
                 gl_ptr="*fp32", z_stride="i64", g_stride="i64", n_valid="i32"),
            {"BLOCK_V": k1._BLOCK_V_GPU},
            {"num_warps": 16},
        ))  # fmt: skip
        precision = "tf32" if dt == "bf16" else "ieee"
        head = dict(h_ptr=f"*{dt}", w_ptr=f"*{dt}", tok_ptr="*i64", n_rows="i32", H="i32",
                    inv_t="fp32", h_stride="i32", w_stride="i32")  # fmt: skip
        for cfg in k2._GPU_CONFIGS:
            consts = dict(cfg.kwargs, UPCAST=False, PRECISION=precision)
            opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
            out.append((
                k2._lm_head_stats_kernel,
                dict(head, stats_ptr="*fp32", V="i32", vocab_start="i32", split_size="i32",
                     n_splits="i32"),
                consts, opts,
            ))  # fmt: skip
            out.append((
                k2._lm_head_grad_kernel,
                dict(head, row_ptr="*fp32", gh_ptr="*fp32", gl_ptr="*fp32", g_ptr=f"*{dt}",
                     C="i32", C_valid="i32", col_start="i32", g_stride="i32", C_TUNE="i32"),
                consts, opts,
            ))  # fmt: skip
    loss = dict(lp_ptr="*fp32", old_ptr="*fp32", adv_ptr="*fp32", lo_ptr="*fp32",
                hi_ptr="*fp32", ref_ptr="*fp32", lo_stride="i32", hi_stride="i32", n="i32",
                clip_c="fp32")  # fmt: skip
    for dual in (True, False):
        for has_ref in (True, False):
            for kl in (1, 2, 3) if has_ref else (3,):
                consts = {"HAS_DUAL": dual, "HAS_REF": has_ref, "KL": kl, "BLOCK": 1024}
                out.append((
                    k3._loss_fwd_kernel,
                    dict(loss, loss_ptr="*fp32", kl_ptr="*fp32", ratio_ptr="*fp32",
                         flags_ptr="*i8"),
                    consts, {"num_warps": 4},
                ))  # fmt: skip
                out.append((
                    k3._loss_bwd_kernel,
                    dict(loss, g_loss_ptr="*fp32", g_kl_ptr="*fp32", g_ratio_ptr="*fp32",
                         grad_ptr="*fp32"),
                    consts, {"num_warps": 4},
                ))  # fmt: skip
    return out


_ALIGNED_INTS = {"H", "h_stride", "w_stride", "g_stride", "z_stride", "split_size"}


def compile_all(arch: int, quick: bool = False, dtypes: tuple[str, ...] = ("bf16", "fp32")) -> int:
    """Compile the kernels for sm_<arch>; returns the number of variants built."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    seen: set[str] = set()
    built = 0
    for fn, types, consts, opts in _variants(dtypes):
        if quick and fn.__name__ in seen:
            continue
        seen.add(fn.__name__)
        signature = {name: "constexpr" if name in consts else types[name] for name in fn.arg_names}
        constexprs = {(fn.arg_names.index(k),): v for k, v in consts.items()}
        # As a real launch specialises them: 16-byte aligned pointers, and sizes and
        # strides that are multiples of 16 (H = 1536 / 5120, V_local), which is what
        # lets Triton pipeline the tl.dot loads.
        attrs = {
            (i,): [["tt.divisibility", 16]]
            for i, name in enumerate(fn.arg_names)
            if name not in consts and (types[name].startswith("*") or name in _ALIGNED_INTS)
        }
        src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(src, target=target, options=opts)
        shared = compiled.metadata.shared
        print(f"ok sm_{arch} {fn.__name__} {consts} {opts} shared={shared}B")
        built += 1
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--arch", type=int, default=90, help="compute capability, 90 = Hopper")
    parser.add_argument("--quick", action="store_true", help="one variant per kernel")
    parser.add_argument("--dtype", choices=["bf16", "fp32", "all"], default="all")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("unset TRITON_INTERPRET: the interpreter does not compile")
    dtypes = ("bf16", "fp32") if args.dtype == "all" else (args.dtype,)
    n = compile_all(args.arch, args.quick, dtypes)
    print(f"compiled {n} kernel variants for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
