"""Every quantity benchmarks/algorithms.py plots is a Prometheus series (metrics/keys.py)
and is drawn by a Grafana panel (monitoring/grafana/archer.json), so a cluster user sees
the same picture; and the keys the real trainer wrote are all accepted."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from archer_mcore.metrics.keys import resolve_key

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "monitoring" / "grafana" / "archer.json"


def panels(node: dict) -> list[dict]:
    out = []
    for p in node.get("panels", []):
        out.append(p)
        out += panels(p)
    return out


def selector_admits(expr: str, metric: str, labels: dict[str, str]) -> bool:
    """Whether `expr` selects `metric` with label matchers (=, !=, =~, !~) that the
    series' `labels` satisfy (template variables such as $run match anything)."""
    for m in re.finditer(rf"\b{re.escape(metric)}(?![\w:])(?:\{{([^}}]*)\}})?", expr):
        ok = True
        for name, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', m.group(1) or ""):
            if "$" in value or name not in labels:
                continue
            got = labels[name]
            hit = {
                "=": got == value,
                "!=": got != value,
                "=~": re.fullmatch(value, got) is not None,
                "!~": re.fullmatch(value, got) is None,
            }[op]
            ok &= hit
        if ok:
            return True
    return False


def test_every_plotted_key_is_a_series_with_a_panel(algorithms_bench):
    keys = algorithms_bench.plotted_metric_keys(16)
    # what the figures draw: avg@n, pass@1/4/16, entropy and clip per group of each rule
    for k in ("eval/accuracy", "eval/pass@16", "entropy/forking", "entropy/knowledge"):
        assert k in keys
    assert "clip/high/other" in keys and "clip/low/reasoning" in keys
    dash = json.loads(DASHBOARD.read_text())
    exprs = [(p.get("title", ""), t["expr"]) for p in panels(dash) for t in p.get("targets", [])]
    for key in keys:
        hit = resolve_key(key)
        assert hit is not None, f"{key}: not a Prometheus series (metrics/keys.py)"
        spec, labels = hit
        titles = [title for title, e in exprs if selector_admits(e, spec.metric, labels)]
        assert titles, f"{key} -> {spec.metric}{labels}: no Grafana panel draws it"


def test_selector_admits_is_a_label_filter():
    assert selector_admits('archer_x{run=~"$run"}', "archer_x", {"group": "a"})
    assert not selector_admits('archer_x{group!="all"}', "archer_x", {"group": "all"})
    assert selector_admits('archer_x{group!="all"}', "archer_x", {"group": "forking"})
    assert not selector_admits('archer_xy{run=~"$run"}', "archer_x", {})


@pytest.mark.parametrize("algo", ["grpo", "dapo", "archer", "forking"])
def test_keys_the_trainer_wrote_are_all_accepted(algo: str):
    """metrics.jsonl of real `archer train` runs (the committed demo benchmark runs):
    every key but `step` maps to a series, forking's `forking` / `other` groups included."""
    run = ROOT / "benchmarks/results/algorithms/demo_8d12d7c/runs" / f"{algo}_s1234"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    keys = set().union(*rows) - {"step"}
    assert {k for k in keys if resolve_key(k) is None} == set()
    if algo == "forking":
        assert {"entropy/forking", "entropy/other", "clip/low/other", "share/other"} <= keys
