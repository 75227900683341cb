"""The Megatron actor: the policy the RL loop scores and updates (`policy`), its batch
format and micro-batching (`policy_batch`), the kernel choice of its scoring passes
(`kernel_dispatch`) and its checkpoints (`checkpoint_store`: files, names, checksums,
resolution; `checkpoint`: the sharded state saved and loaded, resharding).

Imports run one way: train/ (the RL loop) -> actor -> model/, algo/, parallel/; nothing
here imports train/. The loop sees the policy through `actor.protocol.Policy`.
"""
