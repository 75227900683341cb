"""archer_mcore.metrics."""
