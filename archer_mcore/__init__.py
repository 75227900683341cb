"""archer-mcore: an RLVR trainer on megatron-core (Archer, forking tokens, DAPO, GRPO)."""

__version__ = "0.1.0"
