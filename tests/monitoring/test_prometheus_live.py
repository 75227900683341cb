"""A real Prometheus scrapes stand-in runs; every dashboard and alert expression must
return data from it. promtool checks the config and rules and runs the rule unit tests.

STAND-IN: the runs are fed by tests/monitoring/standin_producer.py until the trainer
lands; then a short real demo run replaces the "healthy" producer.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from services import (
    REPO_ROOT,
    Prometheus,
    Pushgateway,
    free_port,
    prometheus_config_for_test,
    require_binary,
    wait_until,
)
from standin_producer import StandinProducer

from archer_mcore.metrics.exporter import MetricsExporter

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

PROM_DIR = REPO_ROOT / "monitoring/prometheus"
DASHBOARD = REPO_ROOT / "monitoring/grafana/archer.json"
HEALTHY, DEGRADED, BATCH = "standin-healthy", "standin-degraded", "standin-batch"
BATCH_JOB_ID = "777"
# Grafana's template variables, as Grafana would expand them for one selected run.
RATE_INTERVAL = "1m"
# Series that only exist on a GPU host (the exporter reads torch.cuda).
GPU_ONLY_METRICS = ("archer_gpu_memory_bytes",)
# Series that only a MoE policy emits (actor/moe_load.py): none from the dense demo.
MOE_ONLY_METRICS = ("archer_moe_expert_load_max_over_mean", "archer_moe_tokens_dropped_fraction")


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


CUDA = _cuda_available()  # decided before any producer thread starts


@dataclass
class LiveStack:
    prometheus: Prometheus
    pushgateway: Pushgateway
    batch: MetricsExporter
    dead_target: str


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) for every query target of every panel."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((panel["title"], target["expr"]))
    return out


def alert_rules() -> list[dict]:
    rules = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return [r for g in rules["groups"] for r in g["rules"] if "alert" in r]


def expand_grafana(expr: str, run: str) -> str:
    return expr.replace("$__rate_interval", RATE_INTERVAL).replace(
        "$run", run
    )  # Grafana substitutes the selected value


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    require_binary("prometheus")
    require_binary("prometheus-pushgateway")
    work = tmp_path_factory.mktemp("prom")
    pushgateway = Pushgateway(work / "pushgateway")
    exporters: list[MetricsExporter] = []
    producers: list[StandinProducer] = []
    prometheus = None
    try:
        for run in (HEALTHY, DEGRADED):
            exp = MetricsExporter(run=run, job="archer", slurm_job_id="none")
            exp.start()
            exporters.append(exp)
        # A batch job: pushes only (no HTTP server), grouped by its Slurm job id.
        batch = MetricsExporter(
            run=BATCH, job="archer", pushgateway=pushgateway.url, slurm_job_id=BATCH_JOB_ID
        )
        dead_target = f"127.0.0.1:{free_port()}"  # nothing listens: ArcherExporterDown
        targets = [f"127.0.0.1:{e.port}" for e in exporters] + [dead_target]
        config = prometheus_config_for_test(
            targets, f"127.0.0.1:{pushgateway.port}", [PROM_DIR / "alerts.yml"]
        )
        prometheus = Prometheus(work / "prometheus", config)
        producers = [
            StandinProducer(exporters[0], "healthy", seed=1).start(),
            StandinProducer(exporters[1], "degraded", seed=2).start(),
            StandinProducer(batch, "healthy", period=0.5, seed=3).start(),
        ]
        prom = prometheus

        def scraped_enough() -> bool:
            # >= 4 scrapes of the degraded run's collapsed state, and the batch run seen
            bad = prom.query(
                f'count_over_time(archer_loss{{run="{DEGRADED}"}}[1m] ) '
                f'and archer_loss{{run="{DEGRADED}"}} != archer_loss{{run="{DEGRADED}"}}'
            )
            rate_ok = prom.query(f'rate(archer_steps_total{{run="{BATCH}"}}[1m]) > 0')
            return bool(bad) and int(float(bad[0]["value"][1])) >= 8 and bool(rate_ok)

        wait_until(scraped_enough, 90, "prometheus to scrape the stand-in runs")
        yield LiveStack(prometheus, pushgateway, batch, dead_target)
    finally:
        for p in producers:
            p.stop()
        for e in exporters:
            e.close()
        if prometheus is not None:
            prometheus.stop()
        pushgateway.stop()


def test_every_dashboard_expression_returns_data(stack: LiveStack) -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 25
    gpu = CUDA
    for title, expr in exprs:
        q = expand_grafana(expr, HEALTHY)
        result = stack.prometheus.query(q)  # raises on a PromQL error
        if any(m in expr for m in GPU_ONLY_METRICS) and not gpu:
            assert result == [], f"{title}: GPU series on a CPU host: {result}"
            continue
        assert result, f"panel {title!r}: no data for {q}"
        values = [float(s["value"][1]) for s in result]
        assert any(math.isfinite(v) for v in values), f"panel {title!r}: {q} -> {values}"
        runs = {s["metric"].get("run") for s in result}
        assert runs <= {HEALTHY, None}, f"panel {title!r}: $run filter leaked {runs}"


def test_run_variable_lists_the_runs(stack: LiveStack) -> None:
    dash = json.loads(DASHBOARD.read_text())
    run_var = next(v for v in dash["templating"]["list"] if v["name"] == "run")
    m = re.fullmatch(r"label_values\((\w+), (\w+)\)", run_var["query"]["query"])
    assert m, run_var
    values = stack.prometheus.api("label/" + m.group(2) + "/values", **{"match[]": m.group(1)})
    assert {HEALTHY, DEGRADED, BATCH} <= set(values)


def test_every_alert_expression_returns_data_for_the_degraded_run_only(stack: LiveStack) -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "ArcherEntropyCollapse",
        "ArcherRewardStall",
        "ArcherNonFiniteLoss",
        "ArcherSkippedSteps",
        "ArcherThroughputDrop",
        "ArcherExporterDown",
    }
    for rule in rules:
        result = stack.prometheus.query(rule["expr"])
        assert result, f"{rule['alert']}: no data for {rule['expr']}"
        if rule["alert"] == "ArcherExporterDown":
            assert {s["metric"]["instance"] for s in result} == {stack.dead_target}
        else:
            runs = {s["metric"].get("run") for s in result}
            assert runs == {DEGRADED}, f"{rule['alert']} fired for {runs}"


def test_rules_loaded_healthy_and_alerts_pending(stack: LiveStack) -> None:
    groups = stack.prometheus.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert len(rules) == len(alert_rules())
    for r in rules:
        assert r["health"] == "ok", (r["name"], r.get("lastError"))

    def pending() -> set[str]:
        alerts = stack.prometheus.api("alerts")["alerts"]
        return {a["labels"]["alertname"] for a in alerts if a["state"] in ("pending", "firing")}

    # the 'for: 0m' rules fire at once; the others are pending (for: 5m .. 30m)
    wait_until(lambda: len(pending()) == len(rules), 30, "every alert pending or firing")


def test_pushed_batch_metrics_reach_prometheus_and_group_is_deleted(stack: LiveStack) -> None:
    result = stack.prometheus.query(f'archer_steps_total{{run="{BATCH}"}}')
    assert len(result) == 1
    labels = result[0]["metric"]
    # honor_labels keeps the pushed job and grouping key
    assert labels["job"] == "archer" and labels["slurm_job_id"] == BATCH_JOB_ID
    assert float(result[0]["value"][1]) >= 2
    assert {"job": "archer", "slurm_job_id": BATCH_JOB_ID} in stack.pushgateway.groups()
    stack.batch.close(delete_push_group=True)  # a clean exit
    assert all(g.get("slurm_job_id") != BATCH_JOB_ID for g in stack.pushgateway.groups())


def test_promtool_check_config_and_rules() -> None:
    promtool = require_binary("promtool")
    for args in (
        ["check", "config", str(PROM_DIR / "prometheus.yml")],
        ["check", "rules", str(PROM_DIR / "alerts.yml")],
        ["test", "rules", str(PROM_DIR / "alerts_test.yml")],
    ):
        proc = subprocess.run(
            [promtool, *args], capture_output=True, text=True, timeout=120, cwd=PROM_DIR
        )
        assert proc.returncode == 0, f"promtool {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        assert "SUCCESS" in proc.stdout + proc.stderr


def test_dashboard_expressions_parse_in_prometheus_with_any_run(stack: LiveStack) -> None:
    """The 'All' selection of the run variable (regex .*) is valid PromQL too."""
    for title, expr in dashboard_exprs():
        q = expr.replace("$__rate_interval", RATE_INTERVAL).replace("$run", ".*")
        stack.prometheus.query(q)  # raises on error
        del title


# ----------------------------------------------------------------------------------
# A short real demo run (`archer train configs/demo_cpu.yaml`), scraped by Prometheus.
DEMO = REPO_ROOT / "configs" / "demo_cpu.yaml"
DEMO_RUN = "demo_cpu"  # train.run_name of the demo config


@pytest.mark.timeout(1500)  # a fresh clone first runs (and caches) the demo's warm start
def test_real_demo_run_feeds_every_dashboard_expression(tmp_path: Path) -> None:
    """Prometheus scrapes the trainer's own exporter during a 6-step demo run; every
    dashboard expression is then evaluated at the run's last scrape (its series go stale
    when the run exits) and must return finite data, GPU memory aside on a CPU host."""
    require_binary("prometheus")
    port = free_port()
    prom = Prometheus(
        tmp_path / "prom",
        prometheus_config_for_test([f"127.0.0.1:{port}"], None, [PROM_DIR / "alerts.yml"]),
    )
    try:
        argv = [
            sys.executable, "-m", "archer_mcore.cli", "train", str(DEMO),
            "-o", f"metrics.port={port}", "-o", "train.steps=6", "-o", "eval.every=2",
            "-o", "checkpoint.save_every=3", "-o", f"train.output_dir={tmp_path / 'run'}",
        ]  # fmt: skip
        proc = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        # the last moment Prometheus saw the run alive
        scraped = prom.api("query", query=f'archer_step{{run="{DEMO_RUN}"}}[30m]')["result"]
        assert scraped, "Prometheus never scraped the demo's exporter"
        last = max(float(t) for s in scraped for t, _ in s["values"])
        assert max(float(v) for s in scraped for _, v in s["values"]) >= 5  # steps seen
        for title, expr in dashboard_exprs():
            q = expand_grafana(expr, DEMO_RUN)
            result = prom.api("query", query=q, time=str(last))["result"]
            if any(m in expr for m in GPU_ONLY_METRICS) and not CUDA:
                assert result == [], f"{title}: GPU series on a CPU host: {result}"
                continue
            if any(m in expr for m in MOE_ONLY_METRICS):
                assert result == [], f"{title}: MoE series from the dense demo: {result}"
                continue
            assert result, f"panel {title!r}: no data for {q}"
            values = [float(s["value"][1]) for s in result]
            assert any(math.isfinite(v) for v in values), f"panel {title!r}: {q} -> {values}"
    finally:
        prom.stop()
