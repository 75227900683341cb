"""archer_mcore.rollout."""
