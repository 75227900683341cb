"""archer_mcore.parallel."""
