"""Triton kernels (installed as archer_mcore.kernels); a torch reference beside each.

Use the dispatcher, which picks the kernel on CUDA and the torch reference elsewhere
(`mode` "auto" | "triton" | "torch"):

- `entropy_and_logprob`, `vocab_parallel_entropy_and_logprob`: kernel 1, from logits;
- `lm_head_entropy_and_logprob`: kernel 2, from hidden states and the output weight;
- `token_terms`: kernel 3, the per-token policy-loss terms.
"""

from archer_mcore.kernels.dispatch import (
    KERNEL_MODES,
    entropy_and_logprob,
    lm_head_entropy_and_logprob,
    token_terms,
    use_triton,
    vocab_parallel_entropy_and_logprob,
)

__all__ = [
    "KERNEL_MODES",
    "entropy_and_logprob",
    "lm_head_entropy_and_logprob",
    "token_terms",
    "use_triton",
    "vocab_parallel_entropy_and_logprob",
]
