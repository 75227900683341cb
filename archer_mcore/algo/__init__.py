"""archer_mcore.algo."""
