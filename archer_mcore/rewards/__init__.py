"""archer_mcore.rewards."""
