"""Small standard-library helpers shared by the actor, the trainer and the CLI (no torch,
no megatron: any layer may import them)."""
