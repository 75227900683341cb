"""archer_mcore.train."""
