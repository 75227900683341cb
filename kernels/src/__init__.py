"""Triton kernels (installed as archer_mcore.kernels); leaf code.

Nothing here imports archer_mcore outside this package: which implementation runs
(kernel or torch reference) is chosen by the caller, `archer_mcore.actor.kernel_dispatch`.

- `entropy_logprob`: kernel 1, entropy + log-prob from (vocab-parallel) logits;
- `fused_lm_head`: kernel 2, the same from hidden states and the output weight;
- `fused_loss`: kernel 3, the per-token policy-loss terms.
"""
