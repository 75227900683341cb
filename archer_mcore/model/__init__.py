"""archer_mcore.model."""
