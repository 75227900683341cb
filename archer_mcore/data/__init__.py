"""archer_mcore.data."""
