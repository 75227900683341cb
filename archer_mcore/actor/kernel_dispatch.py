"""The policy side's choice between the fused Triton kernels and the torch reference.

The kernels (`archer_mcore.kernels`, the repository's `kernels/` folder) are leaf code
that imports nothing of archer_mcore; the choice of which implementation runs lives
here, with their caller. `MegatronPolicy` resolves `kernels.mode` once
(`resolve_kernel_path`) and passes the resolved mode to these functions.

`mode` is one of:
- "auto":   the Triton kernel for CUDA tensors (when triton compiles for this process),
            the torch reference otherwise (CPU tensors, or TRITON_INTERPRET set);
- "triton": always the kernel (on CPU this needs TRITON_INTERPRET=1, set before triton
            is imported: the Triton interpreter, for tests);
- "torch":  always the torch reference.

Both paths take and return the same things, so callers never branch on the mode. The
torch references: `archer_mcore.algo.entropy.entropy_and_logprob`,
`archer_mcore.algo.entropy.vocab_parallel_entropy_and_logprob` and
`archer_mcore.algo.losses.token_terms`; the LM-head reference materialises the logits
(`output_layer_entropy_and_logprob`, which is also the unfused path: the output layer
on the selected rows, then the entropy/log-prob function with in-place backward).
Kernel modules are imported lazily, so the torch paths work without triton.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from archer_mcore.algo import entropy as torch_entropy
from archer_mcore.algo import losses as torch_losses

KernelMode = Literal["auto", "triton", "torch"]
KERNEL_MODES: tuple[str, ...] = ("auto", "triton", "torch")
log = logging.getLogger(__name__)
_SAID: set[str] = set()


def triton_compiles() -> bool:
    """True if triton is importable and builds compiled (not interpreted) kernels."""
    try:
        from triton.runtime.interpreter import InterpretedFunction

        from archer_mcore.kernels import entropy_logprob
    except ImportError:
        return False
    return not isinstance(entropy_logprob._stats_kernel, InterpretedFunction)


def use_triton(mode: str, device: torch.device) -> bool:
    """Whether `mode` selects the Triton kernel for tensors on `device`."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"unknown kernel mode {mode!r}; choose one of {KERNEL_MODES}")
    if mode == "auto":
        return device.type == "cuda" and triton_compiles()
    return mode == "triton"


@dataclass(frozen=True)
class KernelPath:
    """How the policy turns its last stage's output into entropies and log-probs.

    mode: "triton" or "torch" (resolved; never "auto").
    fused_lm_head: True: the model's last stage hands over its final hidden states and
        the (vocab-sharded) output weight goes to the fused LM-head function, so the
        logits are never materialised (with mode "torch" the reference of that
        function, which does materialise them). False: the model computes the
        vocab-parallel logits and the entropy/log-prob function reads them.
    reason: why auto picked what it picked ("" when the mode was explicit).
    """

    mode: Literal["triton", "torch"]
    fused_lm_head: bool
    reason: str = ""

    @property
    def name(self) -> str:
        """torch | triton | torch+lm_head | triton+lm_head (for logs and benchmarks)."""
        return self.mode + ("+lm_head" if self.fused_lm_head else "")


def resolve_kernel_path(
    mode: str, fused_lm_head: bool, cuda: bool, compiles: bool | None = None
) -> KernelPath:
    """Pure choice for `kernels.mode` / `kernels.fused_lm_head` on a machine with
    (`cuda`) or without CUDA; `compiles`: whether triton builds compiled kernels in this
    process (default: ask triton). auto: triton when CUDA is there and triton compiles,
    torch otherwise."""
    if mode not in KERNEL_MODES:
        raise ValueError(f"kernels.mode must be one of {KERNEL_MODES}; got {mode!r}")
    if mode != "auto":
        return KernelPath(mode, bool(fused_lm_head))  # type: ignore[arg-type]
    if not cuda:
        return KernelPath("torch", bool(fused_lm_head), "no CUDA device")
    if not (triton_compiles() if compiles is None else compiles):
        return KernelPath("torch", bool(fused_lm_head), "triton cannot compile kernels here")
    return KernelPath("triton", bool(fused_lm_head), "CUDA device with triton")


def say_once(path: KernelPath, logger: logging.Logger = log) -> bool:
    """Log, once per process, which path `kernels.mode: auto` took; True if logged now."""
    if not path.reason:
        return False
    line = f"kernels.mode auto: {path.mode} path ({path.reason})"
    if line in _SAID:
        return False
    _SAID.add(line)
    logger.info(line)
    return True


def entropy_and_logprob(
    logits: Tensor,
    tokens: Tensor,
    temperature: float = 1.0,
    *,
    inplace_backward: bool = False,
    mode: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Entropy of softmax(logits / T) and log-prob of `tokens`: logits [..., V],
    tokens [...] -> (entropy, logprob) [...] fp32 nats, differentiable w.r.t. logits.
    inplace_backward (Triton path): the logits' memory receives their gradient."""
    if use_triton(mode, logits.device):
        from archer_mcore.kernels import entropy_logprob

        return entropy_logprob.entropy_and_logprob(logits, tokens, temperature, inplace_backward)
    return torch_entropy.entropy_and_logprob(logits, tokens, temperature)


def vocab_parallel_entropy_and_logprob(
    logits_shard: Tensor,
    tokens: Tensor,
    vocab_start: int,
    tp_group: dist.ProcessGroup | None,
    *,
    temperature: float = 1.0,
    vocab_size: int | None = None,
    inplace_backward: bool = False,
    mode: str = "auto",
    chunk_rows: int = 4096,
) -> tuple[Tensor, Tensor]:
    """Entropy and log-prob over a vocabulary sharded across `tp_group`.

    Args:
        logits_shard: [N, V_local] this rank's columns (global ids from `vocab_start`).
        tokens: [N] global token ids.
        vocab_size: true vocabulary size; padding ids >= it are left out.
        inplace_backward: write the gradient into the logits' memory (either path;
            only when nothing reads those logits afterwards).
        chunk_rows: torch path: rows per chunk (bounds its fp32 scratch memory).
    Returns:
        (entropy [N], logprob [N]) fp32, the same on every rank; the backward gives this
        shard's gradient without communication.
    """
    if use_triton(mode, logits_shard.device):
        from archer_mcore.kernels import entropy_logprob

        return entropy_logprob.vocab_parallel_entropy_and_logprob(
            logits_shard,
            tokens,
            temperature=temperature,
            group=tp_group,
            vocab_start=vocab_start,
            vocab_size=vocab_size,
            inplace_backward=inplace_backward,
        )
    return torch_entropy.vocab_parallel_entropy_and_logprob(
        logits_shard,
        tokens,
        vocab_start,
        tp_group,
        temperature=temperature,
        vocab_size=vocab_size,
        chunk_rows=chunk_rows,
        inplace_backward=inplace_backward,
    )


class _AllReduceGrad(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient over `group` backward (the input is
    replicated over the group and each rank's use of it contributes a partial grad)."""

    @staticmethod
    def forward(ctx, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def output_layer_entropy_and_logprob(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    temperature: float = 1.0,
    *,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    mode: str = "auto",
    chunk_rows: int = 4096,
) -> tuple[Tensor, Tensor]:
    """The output layer on the given rows only, then entropy and log-prob of
    softmax(logits / T): the unfused path with one logits-sized buffer.

    Args:
        hidden: [N, H] final hidden states of the rows wanted (e.g. the response
            tokens', selected before the output layer), replicated over `tp_group`.
        weight: [V_local, H] output weight (this rank's vocab shard with `tp_group`).
        tokens: [N] global token ids.
        vocab_start: first global id of the shard; default rank * V_local.
        vocab_size: true vocabulary size; padding columns >= it are left out.
        mode: which entropy/log-prob implementation reads the logits (see the module).
        chunk_rows: torch path: rows per chunk (bounds its fp32 scratch memory).
    Returns:
        (entropy [N], logprob [N]) fp32. Gradients reach hidden (all-reduced over
        `tp_group`, as megatron's output layer all-reduces its input gradient: do not
        also wrap hidden in megatron's copy-to-TP region) and weight.

    Memory: the logits [N, V_local] in the weight's dtype are the one logits-sized
    buffer. The matmul's backward needs hidden and weight, not its output, so nothing
    reads the logits after the entropy function's backward, which therefore writes
    their gradient into their own memory (`inplace_backward`). Numerically this is
    megatron's output layer (`torch.matmul(input, weight.t())`) restricted to rows.
    """
    sharded = tp_group is not None and dist.get_world_size(tp_group) > 1
    if vocab_start is None:
        vocab_start = (dist.get_rank(tp_group) if sharded else 0) * weight.shape[0]
    if sharded:
        hidden = _AllReduceGrad.apply(hidden, tp_group)
    logits = hidden @ weight.t()
    return vocab_parallel_entropy_and_logprob(
        logits,
        tokens,
        vocab_start,
        tp_group,
        temperature=temperature,
        vocab_size=vocab_size,
        inplace_backward=True,
        mode=mode,
        chunk_rows=chunk_rows,
    )


def lm_head_entropy_and_logprob(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    temperature: float = 1.0,
    *,
    tp_group: dist.ProcessGroup | None = None,
    vocab_start: int | None = None,
    vocab_size: int | None = None,
    chunk_cols: int | None = None,
    recompute: str = "triton",
    mode: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Entropy and log-prob of softmax(hidden @ weight^T / T).

    Args:
        hidden: [N, H] final hidden states, replicated over `tp_group`.
        weight: [V_local, H] output weight (this rank's vocab shard with `tp_group`).
        tokens: [N] global token ids.
        vocab_start: first global id of the shard; default rank * V_local.
        vocab_size: true vocabulary size; padding rows >= it are left out.
        chunk_cols: Triton path: vocab columns recomputed at a time.
        recompute: Triton path: "triton" (tl.dot tiles) or "cublas" (torch.mm chunks).
    Returns:
        (entropy [N], logprob [N]) fp32. Gradients reach hidden (all-reduced over
        `tp_group`: do not also wrap hidden in megatron's copy-to-TP region) and weight.
        The Triton path never materialises the logits; the torch path does
        (`output_layer_entropy_and_logprob` with the torch reference).
    """
    if use_triton(mode, hidden.device):
        from archer_mcore.kernels import fused_lm_head

        return fused_lm_head.fused_lm_head_entropy_logprob(
            hidden,
            weight,
            tokens,
            temperature,
            group=tp_group,
            vocab_start=vocab_start,
            chunk_cols=chunk_cols,
            vocab_size=vocab_size,
            recompute=recompute,
        )
    return output_layer_entropy_and_logprob(
        hidden,
        weight,
        tokens,
        temperature,
        tp_group=tp_group,
        vocab_start=vocab_start,
        vocab_size=vocab_size,
        mode="torch",
    )


def token_terms(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    *,
    eps_low: Tensor | float,
    eps_high: Tensor | float,
    clip_c: float | None,
    ref_logp: Tensor | None = None,
    kl_estimator: str = "k3",
    mode: str = "auto",
) -> torch_losses.TokenTerms:
    """Per-token policy-loss terms (see `archer_mcore.algo.losses.token_terms`), from
    the fused elementwise kernel or the torch reference; gradients flow to logp only."""
    if use_triton(mode, logp.device):
        from archer_mcore.kernels import fused_loss

        t = fused_loss.fused_token_terms(
            logp,
            old_logp,
            advantages,
            eps_low=eps_low,
            eps_high=eps_high,
            clip_c=clip_c,
            ref_logp=ref_logp,
            kl_estimator=kl_estimator,
        )
        return torch_losses.TokenTerms(
            pg_loss=t.pg_loss,
            kl=t.kl,
            ratio=t.ratio,
            clipped_low=t.clipped_low,
            clipped_high=t.clipped_high,
            clipped_dual=t.clipped_dual,
        )
    return torch_losses.token_terms(
        logp,
        old_logp,
        advantages,
        eps_low=eps_low,
        eps_high=eps_high,
        clip_c=clip_c,
        ref_logp=ref_logp,
        kl_estimator=kl_estimator,
    )
