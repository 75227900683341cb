"""Evaluation metrics: avg@k and the unbiased pass@k, per data source."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al., 2021).

    pass@k = 1 - C(n - c, k) / C(n, k); needs k <= n.
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    # Product form of C(n-c, k) / C(n, k), stable for large n.
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


#: the pass@k values the trainer's periodic evaluation reports besides pass@n (those <= n)
EVAL_PASS_KS: tuple[int, ...] = (1, 4, 16)


def summarize(
    records: Iterable[tuple[str, Sequence[bool]]],
    k: int | None = None,
    extra_ks: Sequence[int] = (),
) -> dict[str, dict[str, float]]:
    """Per data source (and ``all``): avg@k (mean accuracy over samples) and pass@k.

    Args:
        records: (data_source, correctness of each of the n samples of one prompt).
        k: for pass@k; default n.
        extra_ks: further k values whose pass@k is reported too (those <= n).
    Returns:
        {source: {"prompts", "samples_per_prompt", "avg@n", "pass@k", "pass@<extra k>"}}.
    """
    by_source: dict[str, list[Sequence[bool]]] = defaultdict(list)
    for source, correct in records:
        by_source[source].append(correct)
        by_source["all"].append(correct)
    out: dict[str, dict[str, float]] = {}
    for source, rows in by_source.items():
        n = min(len(r) for r in rows)
        kk = n if k is None else min(k, n)
        out[source] = {
            "prompts": float(len(rows)),
            "samples_per_prompt": float(n),
            f"avg@{n}": sum(sum(r[:n]) / n for r in rows) / len(rows),
        }
        for j in sorted({kk, *(x for x in extra_ks if 1 <= x <= n)}):
            out[source][f"pass@{j}"] = sum(pass_at_k(n, sum(r[:n]), j) for r in rows) / len(rows)
    return out


def format_table(summary: dict[str, dict[str, float]]) -> str:
    """A markdown table of `summarize`'s output, one row per data source."""
    cols = sorted({c for row in summary.values() for c in row})
    lines = ["| source | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for source, row in sorted(summary.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        cells = [f"{row[c]:.4f}" if c in row and "@" in c else f"{row.get(c, 0):g}" for c in cols]
        lines.append(f"| {source} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
