"""Pure-torch RLVR math: entropy, token groups, losses, KL, advantages, presets.

Nothing here imports Megatron; the trainer composes these functions.
"""
