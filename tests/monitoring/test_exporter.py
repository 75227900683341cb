"""MetricsExporter over real HTTP, read back with prometheus_client's text parser."""

from __future__ import annotations

import math
import re
import socket
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from archer_mcore.metrics.exporter import MetricsExporter
from archer_mcore.metrics.keys import ACCEPTED_KEYS, PHASES, TOKEN_GROUPS, resolve_key

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(exporter: MetricsExporter) -> Samples:
    with urllib.request.urlopen(exporter.url, timeout=10) as resp:
        text = resp.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    want = {"run": "r", "slurm_job_id": "none", **labels}
    return samples[(name, frozenset(want.items()))]


@pytest.fixture
def exporter(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    exp = MetricsExporter(run="r", job="archer")
    exp.start()
    yield exp
    exp.close()


def test_every_key_reaches_its_series(exporter: MetricsExporter) -> None:
    # Give each key a distinct value so a mix-up between keys would show.
    concrete = {**ACCEPTED_KEYS, "eval/pass@4": resolve_key("eval/pass@4")}
    assert concrete["eval/pass@4"] is not None
    metrics = {key: 0.5 + i for i, key in enumerate(sorted(concrete))}
    exporter.record_step(7, metrics)
    samples = scrape(exporter)
    for key, (spec, labels) in concrete.items():
        v = metrics[key]
        if spec.kind in ("gauge", "gauge+histogram"):
            assert value(samples, spec.metric, **labels) == v, key
        if spec.kind == "counter":
            assert value(samples, spec.metric + "_total", **labels) == v, key
        if spec.kind == "histogram":
            assert value(samples, spec.metric + "_sum", **labels) == v, key
            assert value(samples, spec.metric + "_count", **labels) == 1.0, key
    assert value(samples, "archer_step") == 7
    assert value(samples, "archer_steps_total") == 1
    assert value(samples, "archer_eval_pass_ratio", k="4") == metrics["eval/pass@4"]


def test_counters_add_increments_and_histograms_bucket(exporter: MetricsExporter) -> None:
    exporter.record_step(1, {"sync/bytes": 1000, "time/rollout": 0.3, "reward/failures": 2})
    exporter.record_step(2, {"sync/bytes": 500, "time/rollout": 7.0, "reward/failures": 0})
    s = scrape(exporter)
    assert value(s, "archer_weight_sync_bytes_total") == 1500  # 1000 + 500
    assert value(s, "archer_reward_failures_total") == 2
    assert value(s, "archer_steps_total") == 2
    h = "archer_phase_duration_seconds"
    # 0.3 s falls in le=0.5 and above; 7.0 s first in le=10.
    assert value(s, h + "_bucket", phase="rollout", le="0.25") == 0
    assert value(s, h + "_bucket", phase="rollout", le="0.5") == 1
    assert value(s, h + "_bucket", phase="rollout", le="5.0") == 1
    assert value(s, h + "_bucket", phase="rollout", le="10.0") == 2
    assert value(s, h + "_sum", phase="rollout") == pytest.approx(7.3)
    # never-reported phases have no histogram series; counters exist at 0 from the start
    assert (
        h + "_count",
        frozenset({"run": "r", "slurm_job_id": "none", "phase": "eval"}.items()),
    ) not in s
    assert value(s, "archer_skipped_steps_total") == 0


def test_bad_values_are_counted_not_raised(exporter: MetricsExporter) -> None:
    exporter.record_step(
        3,
        {
            "no/such_key": 1.0,
            "reward/mean": "high",  # type: ignore[dict-item]
            "entropy/all": None,  # type: ignore[dict-item]
            "sync/bytes": -5.0,
            "reward/failures": math.nan,
            "time/update": math.inf,
            "train/loss": math.nan,  # a gauge keeps NaN: the NonFiniteLoss alert needs it
            "kl/knowledge": 0.01,
            "eval/pass@0": 0.5,  # k must be a positive integer
            "step": 3.0,  # the step number: ignored, not rejected
        },
    )
    s = scrape(exporter)
    rej = "archer_exporter_rejected_values_total"
    assert value(s, rej, reason="unknown_key") == 2
    assert value(s, rej, reason="not_a_number") == 2
    assert value(s, rej, reason="negative_increment") == 1
    assert value(s, rej, reason="nonfinite") == 2
    assert math.isnan(value(s, "archer_loss"))
    assert value(s, "archer_kl_nats", group="knowledge") == 0.01
    assert value(s, "archer_weight_sync_bytes_total") == 0
    assert value(s, "archer_steps_total") == 1


def test_names_and_labels_follow_conventions(exporter: MetricsExporter) -> None:
    exporter.record_step(1, {key: 1.0 for key in ACCEPTED_KEYS})
    with urllib.request.urlopen(exporter.url, timeout=10) as resp:
        families = list(text_string_to_metric_families(resp.read().decode()))
    names = {f.name for f in families if not f.name.endswith("_created")}
    assert names, "nothing exported"
    for f in families:
        if f.name.endswith("_created"):
            continue
        assert re.fullmatch(r"archer_[a-z0-9_]+", f.name), f.name
        if f.type == "counter":
            assert all(s.name.endswith("_total") for s in f.samples), f.name
        for s in f.samples:
            assert s.labels["run"] == "r" and s.labels["slurm_job_id"] == "none", s
    # time histograms are in seconds, entropy per group present
    assert "archer_phase_duration_seconds" in names
    s = scrape(exporter)
    for g in TOKEN_GROUPS:
        assert value(s, "archer_token_entropy_nats", group=g) == 1.0
    for p in PHASES:
        assert value(s, "archer_phase_duration_seconds_count", phase=p) == 1.0


def test_slurm_job_id_label_and_grouping_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    exp = MetricsExporter(run="r", job="archer")
    assert exp.slurm_job_id == "4242"
    assert exp.grouping_key == {"slurm_job_id": "4242"}
    monkeypatch.delenv("SLURM_JOB_ID")
    assert MetricsExporter(run="r", job="archer").grouping_key == {"run": "r"}


def test_free_port_and_two_exporters_side_by_side() -> None:
    a, b = MetricsExporter(run="a", job="archer"), MetricsExporter(run="b", job="archer")
    try:
        pa, pb = a.start(), b.start()
        assert pa != pb and pa > 0 and pb > 0
        a.record_step(1, {"reward/mean": 0.25})
        b.record_step(1, {"reward/mean": -0.5})
        assert (
            scrape(a)[
                (
                    "archer_reward_mean",
                    frozenset({"run": "a", "slurm_job_id": a.slurm_job_id}.items()),
                )
            ]
            == 0.25
        )
        assert (
            scrape(b)[
                (
                    "archer_reward_mean",
                    frozenset({"run": "b", "slurm_job_id": b.slurm_job_id}.items()),
                )
            ]
            == -0.5
        )
    finally:
        a.close()
        b.close()
    # nothing listens on the port after close
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", pa), timeout=5).close()


def test_push_failure_is_counted(exporter: MetricsExporter) -> None:
    assert exporter.push() is False  # no pushgateway configured
    with socket.socket() as sock:  # a port with nothing listening
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    pushing = MetricsExporter(run="r", job="archer", pushgateway=f"http://127.0.0.1:{dead}")
    pushing.start()
    try:
        pushing.record_step(1, {"reward/mean": 0.1})  # pushes, fails, must not raise
        assert pushing.push() is False
        assert value(scrape(pushing), "archer_exporter_push_failures_total") == 2
    finally:
        pushing.close()  # the failing group delete is logged, not raised


def test_bad_construction() -> None:
    with pytest.raises(ValueError, match="run name"):
        MetricsExporter(run="", job="archer")
    with pytest.raises(RuntimeError, match="start"):
        _ = MetricsExporter(run="x", job="archer").port


def test_docs_table_lists_every_key() -> None:
    from pathlib import Path

    from archer_mcore.metrics.keys import KEY_SPECS

    doc = (Path(__file__).resolve().parents[2] / "docs/metrics.md").read_text()
    rows = {
        line.split("|")[1].strip().strip("`") for line in doc.splitlines() if line.startswith("| `")
    }
    assert {s.pattern for s in KEY_SPECS} <= rows
    for s in KEY_SPECS:
        assert f"`{s.metric}" in doc, s.metric
