"""Prometheus exporter for the trainer (rank 0), with optional Pushgateway push.

The trainer calls `record_step(step, metrics)` once per step with a flat dict whose
keys are listed in `archer_mcore.metrics.keys` (and docs/metrics.md). Every series
carries the labels `run` (the run name) and `slurm_job_id` (from $SLURM_JOB_ID, or
"none"); Prometheus adds `job` and `instance` at scrape time (for pushed metrics the
Pushgateway grouping key gives `job` and `slurm_job_id`).

Bad input never raises out of `record_step`: an unknown key, a value that is not a
number, or a non-finite / negative counter increment is counted in
`archer_exporter_rejected_values_total{reason}` and logged once per key.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import delete_from_gateway, push_to_gateway, start_http_server

from archer_mcore.metrics.keys import ACCEPTED_KEYS, IGNORED_KEYS, KEY_SPECS, KeySpec, resolve_key
from archer_mcore.utils.safe_files import write_atomic

log = logging.getLogger(__name__)

BASE_LABELS: tuple[str, ...] = ("run", "slurm_job_id")

#: Histogram buckets by histogram name (upper bounds, in the metric's unit).
HISTOGRAM_BUCKETS: dict[str, tuple[float, ...]] = {
    "archer_phase_duration_seconds": (
        0.01,
        0.05,
        0.1,
        0.25,
        0.5,
        1,
        2.5,
        5,
        10,
        30,
        60,
        120,
        300,
        600,
        1200,
        1800,
        3600,
    ),
    "archer_step_reward": tuple(round(-1.0 + 0.1 * i, 1) for i in range(21)),
    "archer_step_accuracy_ratio": tuple(round(0.1 * i, 1) for i in range(11)),
    "archer_step_response_length_tokens": tuple(float(2**i) for i in range(4, 16)),
}


def bind_host(host: str) -> str:
    """metrics.host as an address: "auto" is this host's own (`this_host_address`: the
    NCCL_SOCKET_IFNAME / GLOO_SOCKET_IFNAME interface, else the host name's address)."""
    if host != "auto":
        return host
    from archer_mcore.parallel.host_address import this_host_address

    return this_host_address()


def _label_names(spec: KeySpec) -> tuple[str, ...]:
    return BASE_LABELS + tuple(lab.split("=", 1)[0] for lab in spec.labels)


class MetricsExporter:
    """Per-step training metrics as Prometheus series, served over HTTP and/or pushed.

    Args:
        run: run name (label `run` on every series).
        job: Prometheus job name; used as the Pushgateway `job` and should equal the
            scrape config's `job_name` (monitoring/prometheus/prometheus.yml: "archer").
        host, port: HTTP bind address; port 0 picks a free port (see `port` after start()).
        pushgateway: Pushgateway URL (e.g. "http://127.0.0.1:9091") for batch jobs, or
            None. When set, every `record_step` pushes the registry (PUT, replacing the
            group), grouped by `slurm_job_id` (or by `run` outside Slurm).
        registry: registry to register into; a fresh one by default, so several
            exporters can live in one process.
        slurm_job_id: defaults to $SLURM_JOB_ID.
        targets_dir: a Prometheus file_sd folder, or None. When set, `start()` writes
            ``<slurm_job_id, else run>.json`` there (atomically) naming host:port as bound,
            with labels run and slurm_job_id; `close()` removes it.
    """

    def __init__(
        self,
        run: str,
        job: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        pushgateway: str | None = None,
        registry: CollectorRegistry | None = None,
        slurm_job_id: str | None = None,
        targets_dir: str | None = None,
    ) -> None:
        if not run:
            raise ValueError("MetricsExporter: run name must be non-empty")
        if not job:
            raise ValueError("MetricsExporter: job name must be non-empty")
        self.run = run
        self.job = job
        self.host = host
        self._requested_port = port
        self.pushgateway = pushgateway or None
        self.registry = registry if registry is not None else CollectorRegistry()
        self.slurm_job_id = slurm_job_id or os.environ.get("SLURM_JOB_ID", "") or "none"
        self._base = {"run": run, "slurm_job_id": self.slurm_job_id}
        self.targets_dir = targets_dir or None
        self._target_file: Path | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None
        self._closed = False
        self._warned: set[str] = set()
        self._build_metrics()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, metrics_cfg: Any, run: str) -> MetricsExporter:
        """Build from a `MetricsConfig`-like object (host, port, pushgateway, job,
        targets_dir); host "auto" becomes this host's own address (`this_host_address`)."""
        return cls(
            run=run,
            job=metrics_cfg.job,
            host=bind_host(metrics_cfg.host),
            port=metrics_cfg.port,
            pushgateway=metrics_cfg.pushgateway or None,
            targets_dir=metrics_cfg.targets_dir or None,
        )

    def _build_metrics(self) -> None:
        r = self.registry
        self._gauges: dict[str, Gauge] = {}
        self._counters: dict[str, Counter] = {}
        self._histograms: dict[str, Histogram] = {}
        for spec in KEY_SPECS:
            names = _label_names(spec)
            doc = f"{spec.description} [{spec.unit}] (key {spec.pattern})"
            if spec.kind in ("gauge", "gauge+histogram") and spec.metric not in self._gauges:
                self._gauges[spec.metric] = Gauge(spec.metric, doc, names, registry=r)
            if spec.kind == "counter" and spec.metric not in self._counters:
                self._counters[spec.metric] = Counter(spec.metric, doc, names, registry=r)
            hist = spec.histogram or (spec.metric if spec.kind == "histogram" else "")
            if hist and hist not in self._histograms:
                self._histograms[hist] = Histogram(
                    hist, doc, names, buckets=HISTOGRAM_BUCKETS[hist], registry=r
                )
        self._step = Gauge("archer_step", "last recorded training step", BASE_LABELS, registry=r)
        self._steps_total = Counter(
            "archer_steps", "steps recorded by this process", BASE_LABELS, registry=r
        )
        self._last_step_time = Gauge(
            "archer_last_step_timestamp_seconds",
            "unix time of the last recorded step",
            BASE_LABELS,
            registry=r,
        )
        self._rejected = Counter(
            "archer_exporter_rejected_values",
            "metric values rejected by the exporter, by reason",
            (*BASE_LABELS, "reason"),
            registry=r,
        )
        self._push_failures = Counter(
            "archer_exporter_push_failures",
            "failed pushes to the Pushgateway",
            BASE_LABELS,
            registry=r,
        )
        self._gpu_memory = Gauge(
            "archer_gpu_memory_bytes",
            "CUDA memory of this process's current device: allocated, reserved, peak allocated",
            (*BASE_LABELS, "device", "kind"),
            registry=r,
        )
        # Create the counters' children up front: a counter that has never been
        # incremented then reads 0 instead of being absent (so increase() and alerts work).
        for reason in ("unknown_key", "not_a_number", "nonfinite", "negative_increment"):
            self._rejected.labels(**self._base, reason=reason)
        self._push_failures.labels(**self._base)
        for spec, labels in ACCEPTED_KEYS.values():
            if spec.kind == "counter":
                self._counters[spec.metric].labels(**self._base, **labels)

    # ------------------------------------------------------------------ HTTP server
    def start(self) -> int:
        """Serve /metrics on host:port; return the bound port."""
        if self._server is not None:
            return self.port
        self._server, self._thread = start_http_server(
            self._requested_port, addr=self.host, registry=self.registry
        )
        self._port = int(self._server.server_address[1])
        log.info(
            "metrics exporter for run %s on http://%s:%d/metrics", self.run, self.host, self._port
        )
        if self.targets_dir:
            self._write_target(Path(self.targets_dir))
        return self._port

    def _write_target(self, folder: Path) -> None:
        """The file_sd target Prometheus scrapes this exporter through (see targets_dir)."""
        name = self.slurm_job_id if self.slurm_job_id != "none" else self.run
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"metrics.targets_dir: cannot name a target file after {name!r}")
        folder.mkdir(parents=True, exist_ok=True)
        target = [{"targets": [f"{self.host}:{self._port}"], "labels": dict(self._base)}]
        path = folder / f"{name}.json"
        write_atomic(path, json.dumps(target) + "\n", durable=False)
        self._target_file = path

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("MetricsExporter.port: call start() first")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    # ------------------------------------------------------------------ recording
    def _reject(self, key: str, reason: str, value: Any) -> None:
        self._rejected.labels(**self._base, reason=reason).inc()
        if key not in self._warned:
            self._warned.add(key)
            log.warning(
                "metrics: dropped %s=%r (%s); further drops of this key are counted "
                "in archer_exporter_rejected_values_total",
                key,
                value,
                reason,
            )

    def record_step(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record one step's flat metrics (see keys.py); push if a Pushgateway is set."""
        self.record_values(metrics)
        self._step.labels(**self._base).set(step)
        self._steps_total.labels(**self._base).inc()
        self._last_step_time.labels(**self._base).set(time.time())
        self._record_gpu_memory()
        if self.pushgateway:
            self.push()

    def record_values(self, metrics: Mapping[str, float]) -> None:
        """Record flat metrics that belong to no step (e.g. the start-up data counters
        `DataReport.metrics()`): like `record_step`, without the step bookkeeping."""
        for key, raw in metrics.items():
            if key in IGNORED_KEYS:
                continue
            entry = resolve_key(key)
            if entry is None:
                self._reject(key, "unknown_key", raw)
                continue
            spec, labels = entry
            try:
                if isinstance(raw, bool | str | bytes):
                    raise TypeError
                value = float(raw)
            except (TypeError, ValueError):
                self._reject(key, "not_a_number", raw)
                continue
            finite = math.isfinite(value)
            if spec.kind in ("gauge", "gauge+histogram"):
                self._gauges[spec.metric].labels(**self._base, **labels).set(value)
            if spec.kind == "counter":
                if not finite:
                    self._reject(key, "nonfinite", raw)
                elif value < 0:
                    self._reject(key, "negative_increment", raw)
                else:
                    self._counters[spec.metric].labels(**self._base, **labels).inc(value)
            hist = spec.histogram or (spec.metric if spec.kind == "histogram" else "")
            if hist:
                if finite:
                    self._histograms[hist].labels(**self._base, **labels).observe(value)
                elif spec.kind == "histogram":  # a gauge+histogram already kept the value
                    self._reject(key, "nonfinite", raw)

    def _record_gpu_memory(self) -> None:
        torch = sys.modules.get("torch")  # never import torch just for this
        try:
            if torch is None or not torch.cuda.is_available():
                return
            dev = torch.cuda.current_device()
            values = {
                "allocated": torch.cuda.memory_allocated(dev),
                "reserved": torch.cuda.memory_reserved(dev),
                "peak": torch.cuda.max_memory_allocated(dev),
            }
        except Exception as exc:  # e.g. torch half-imported by another thread
            if "gpu_memory" not in self._warned:
                self._warned.add("gpu_memory")
                log.warning("metrics: GPU memory not recorded: %s", exc)
            return
        for kind, value in values.items():
            self._gpu_memory.labels(**self._base, device=str(dev), kind=kind).set(value)

    # ------------------------------------------------------------------ Pushgateway
    @property
    def grouping_key(self) -> dict[str, str]:
        """Pushgateway group: the Slurm job id, or the run name outside Slurm."""
        if self.slurm_job_id != "none":
            return {"slurm_job_id": self.slurm_job_id}
        return {"run": self.run}

    def push(self) -> bool:
        """Push the registry to the Pushgateway (replacing the group); False on failure."""
        if not self.pushgateway:
            return False
        try:
            push_to_gateway(
                self.pushgateway,
                job=self.job,
                registry=self.registry,
                grouping_key=self.grouping_key,
                timeout=10,
            )
            return True
        except Exception as exc:  # a monitoring outage must not stop training
            self._push_failures.labels(**self._base).inc()
            log.warning("metrics: push to %s failed: %s", self.pushgateway, exc)
            return False

    # ------------------------------------------------------------------ shutdown
    def close(self, delete_push_group: bool = True) -> None:
        """Stop the HTTP server; delete the Pushgateway group (clean exit) or push a last
        time (delete_push_group=False, e.g. pre-emption, so the last values stay visible)."""
        if self._closed:
            return
        self._closed = True
        if self._target_file is not None:
            self._target_file.unlink(missing_ok=True)
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._server = None
        if self.pushgateway:
            if delete_push_group:
                try:
                    delete_from_gateway(
                        self.pushgateway, job=self.job, grouping_key=self.grouping_key, timeout=10
                    )
                except Exception as exc:
                    log.warning("metrics: deleting group at %s failed: %s", self.pushgateway, exc)
            else:
                self.push()

    def __enter__(self) -> MetricsExporter:
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        self.close(delete_push_group=exc_type is None)
