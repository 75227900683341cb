"""archer_mcore.metrics: Prometheus exporter (rank 0), Pushgateway push, response metrics."""

from archer_mcore.metrics.exporter import MetricsExporter
from archer_mcore.metrics.keys import ACCEPTED_KEYS, KEY_SPECS, PHASES, TOKEN_GROUPS
from archer_mcore.metrics.repetition import mean_ngram_repetition_rate, ngram_repetition_rate

__all__ = [
    "ACCEPTED_KEYS",
    "KEY_SPECS",
    "PHASES",
    "TOKEN_GROUPS",
    "MetricsExporter",
    "mean_ngram_repetition_rate",
    "ngram_repetition_rate",
]
